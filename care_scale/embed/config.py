"""The embedding job's one typed configuration.

Loaded with :func:`care_scale.config.load_config` from a YAML file plus ``--set key=value``
overrides; unknown keys are rejected. Every field has a default that runs on a laptop CPU
with the tiny demo models, except ``source`` and ``warehouse`` which the user must give.

Example (``configs/embed_example.yaml``)::

    source: s3://my-bucket/cohort-a/*.svs
    warehouse: s3://my-bucket/warehouse
    patch_encoder: {name: vit_small_patch16_224, checkpoint: s3://my-bucket/models/patch}
    slide_encoder: {name: care, checkpoint: s3://my-bucket/models/care}
    backend: auto
    concurrency: {decode_tasks: 8, encoder_actors: 2, num_gpus_per_actor: 1}
    storage_options: {aws_region: eu-west-1}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from care_scale.choices import Precision, TilingMode
from care_scale.exceptions import ConfigError
from care_scale.tissue import TissueParams


@dataclass
class AnnotationConfig:
    """Annotations that restrict tiling (``care_scale.annotations``): one QuPath / GeoJSON
    file per slide, from the manifest's ``annotations`` column or ``dir/<slide_id>.geojson``;
    features of ``exclude_classes`` (e.g. ``[Pen]``) mark areas to leave out."""

    dir: str | None = None
    exclude_classes: list[str] = field(default_factory=list)

    @property
    def used(self) -> bool:
        return bool(self.dir or self.exclude_classes)


@dataclass
class ModelRef:
    """A registry name plus an optional checkpoint directory (local path or fsspec URI)."""

    name: str = ""
    checkpoint: str | None = None
    # Architecture overrides (slide encoder only), e.g. {in_dim: 64} for another patch encoder.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Slide encoder only: run the modeling code a transformers snapshot ships (the official
    # hf:Zipper-1/CARE). It is Python from the snapshot, so never without the user's say-so.
    trust_remote_code: bool = False


@dataclass
class Concurrency:
    """How many Ray workers each stage gets, and where they may run.

    ``decode_tasks`` CPU tasks open, tile and decode slides in parallel and send the tiles
    to the ``encoder_actors`` actors, each holding one patch-encoder copy
    (``num_gpus_per_actor`` GPUs each on a GPU cluster, 0 on CPU); ``slide_encoder_actors``
    actors each hold CARE and write the slides' rows (``num_gpus_per_slide_actor`` puts them
    on GPUs). ``decode_num_workers`` threads
    decode tiles inside one task. Thread pools left unset (None) follow the CPUs Ray gives
    the worker (``care_scale.embed.node_threads``): an encoder actor runs one intra-op thread
    per CPU of ``num_cpus_per_actor`` (on a one-node run: its share of the node's cores), a
    decode task one reader per CPU of
    ``decode_num_cpus`` (at least 2). ``*_resources``: custom Ray resources a stage's workers
    need (``{decode: 1}``), to pin stages to node groups.
    """

    decode_tasks: int = 2
    # Tile-reader threads of one decode task; None: from decode_num_cpus (at least 2).
    decode_num_workers: int | None = None
    # Logical CPUs reserved per decode task. With the encoder actor's 1 and a slide-encoder
    # actor's 0.5, one decode task still fits on a 2-CPU machine.
    decode_num_cpus: float = 0.5
    # Logical memory reserved per decode task (scheduling only).
    decode_memory_bytes: int = 1 << 30
    decode_resources: dict[str, float] = field(default_factory=dict)
    encoder_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    encoder_resources: dict[str, float] = field(default_factory=dict)
    # Tile batches one decode task keeps at the encoder actors while it decodes the next:
    # enough to keep them busy, few enough to bound the pixels in the object store.
    encode_in_flight: int = 2
    # Intra-op threads of one encoder actor (torch or ONNX Runtime); None: one per CPU Ray
    # gives the actor (num_cpus_per_actor), capped by the cores present; on a one-node run
    # the node's cores shared among the encoder actors (at least that).
    torch_threads: int | None = None
    slide_encoder_actors: int = 1
    num_cpus_per_slide_actor: float = 0.5
    num_gpus_per_slide_actor: float = 0.0
    slide_encoder_resources: dict[str, float] = field(default_factory=dict)
    # torch intra-op threads of one slide-encoder actor.
    slide_encoder_threads: int = 1


@dataclass
class EmbedConfig:
    """Configuration of ``care-scale embed`` / ``jobs/embed_cohort.py``."""

    source: str = ""
    warehouse: str = ""
    # SOURCE holds patch-feature files (.h5 / .parquet / CARE .npy) instead of slides.
    features: bool = False
    # Tiling; None: the slide encoder's preset (its registry entry: CARE 512 px at 0.5 um/px,
    # tiled as TRIDENT does). tiling: native (care-scale's grid) | trident (TRIDENT's grid,
    # Otsu mask and keep rule; see care_scale/tiling.py).
    target_mpp: float | None = None
    patch_size: int | None = None
    tiling: TilingMode | None = None
    # Share of a tile that must be tissue; None: the tiling mode's default (native 0.5,
    # trident 0: a tile touching tissue is kept, TRIDENT's default).
    min_tissue_fraction: float | None = None
    tissue: TissueParams = field(default_factory=TissueParams)
    annotations: AnnotationConfig = field(default_factory=AnnotationConfig)
    # Used when a slide has no MPP metadata (a manifest's per-slide mpp column wins).
    mpp_override: float | None = None
    # An empty name means "the patch encoder the slide encoder's registry entry pairs with".
    patch_encoder: ModelRef = field(default_factory=lambda: ModelRef(""))
    slide_encoder: ModelRef = field(default_factory=lambda: ModelRef("care_tiny"))
    # auto: TensorRT (GPU + engine in artifacts), else ONNX Runtime, else torch.
    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = "auto"
    # Patch-encoder precision: fp32 everywhere; bf16 / fp16 autocast on torch (bf16 pays on
    # CPUs with AVX-512 BF16 or AMX, fp16 on CUDA); int8 the dynamically quantised ONNX graph
    # (VNNI CPUs). Not fp32 changes the embeddings, so it is part of the model version.
    # auto: the fastest one this CPU has whose features stay within cosine 0.999 of fp32 on
    # the run's first slide (care_scale.inference.precision); recorded in the runs table.
    precision: Literal["auto", Precision] = "fp32"
    # Where exported ONNX files / TensorRT engines live (create_patch_backend's artifacts).
    artifacts: str | None = None
    # Tiles per decoded batch, and per call to an encoder actor (decode batches are joined up
    # to it; the actor runs its backend on chunks of it). CPU-sized: a 512 px tile is 768 KiB
    # of uint8 and 3 MiB as the float input the graph resizes, so a 64-tile call held 1,070
    # MiB in the encoder actor and 520 in the decode task on one 16,384^2 slide (ViT-Ti int8),
    # 16 held 391 and 291, and ran as fast or faster (16.7 vs 21.3 s; 8 micro-encoder slides
    # 12.4-13.8 vs 15.6-16.8 s; 2-core AVX-512 EPYC, issue 20). GPU actors want 256 per call:
    # the shipped GPU configs set it.
    decode_batch_size: int = 16
    encode_batch_size: int = 16
    concurrency: Concurrency = field(default_factory=Concurrency)
    keep_patches: bool = False
    # Pictures and QuPath GeoJSON of every embedded slide in <warehouse>/overlays/<slide_id>/
    # (care_scale.overlays.files), made by the workers that have the slide and the regions.
    overlays: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Local staging cache for remote slides (bounded; per node).
    cache_dir: str | None = None
    cache_max_bytes: int = 20 * 2**30
    # Slides buffered before one warehouse commit (few, large commits).
    commit_every: int = 16
    slide_backend: Literal["auto", "cucim", "openslide", "tifffile"] = "auto"
    # None: RAY_ADDRESS when set (ray job submit), else a fresh local cluster.
    ray_address: str | None = None
    # Only used when this job starts its own local cluster.
    num_cpus: int | None = None
    object_store_memory: int | None = 512 * 2**20
    run_id: str | None = None
    progress: Literal["auto", "line", "log", "none"] = "auto"

    def validate(self) -> None:
        if self.target_mpp is not None and self.target_mpp <= 0:
            raise ConfigError(f"target_mpp must be > 0, got {self.target_mpp}")
        if self.patch_size is not None and self.patch_size < 8:
            raise ConfigError(f"patch_size must be >= 8, got {self.patch_size}")
        if self.min_tissue_fraction is not None and not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(
                f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}"
            )
        if self.mpp_override is not None and self.mpp_override <= 0:
            raise ConfigError(f"mpp_override must be > 0, got {self.mpp_override}")
        for name in ("decode_batch_size", "encode_batch_size", "commit_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_encoder.trust_remote_code:
            raise ConfigError("patch_encoder.trust_remote_code: patch encoders never run "
                              "snapshot code (only slide_encoder.trust_remote_code exists)")
        c = self.concurrency
        for name in ("decode_tasks", "encoder_actors", "decode_num_workers", "encode_in_flight",
                     "slide_encoder_actors", "slide_encoder_threads", "torch_threads"):
            if getattr(c, name) is not None and getattr(c, name) < 1:
                raise ConfigError(f"concurrency.{name} must be >= 1, got {getattr(c, name)}")
        for name in ("num_gpus_per_actor", "num_cpus_per_actor", "num_cpus_per_slide_actor",
                     "num_gpus_per_slide_actor", "decode_num_cpus"):
            if getattr(c, name) < 0:
                raise ConfigError(f"concurrency.{name} must be >= 0, got {getattr(c, name)}")

    def require_io(self) -> None:
        """Source and warehouse are required to run (not to build a config object)."""
        missing = [n for n in ("source", "warehouse") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"embedding job needs {' and '.join(missing)} (none given)")
        from care_scale.storage import check_no_userinfo

        check_no_userinfo(self.source, "source")
        check_no_userinfo(self.warehouse, "warehouse")
