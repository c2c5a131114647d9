"""Typed configurations of the two pretraining stages (YAML + ``--set`` overrides).

Load with ``care_scale.config.load_config(Stage1Config, "stage1.yaml", ["optim.lr=1e-4"])``.
Every field has a default that runs the small demo; real runs override data and model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from care_scale.exceptions import ConfigError


@dataclasses.dataclass
class DataConfig:
    """Where patch features come from (exactly one of ``feature_uris`` / ``patches_table``
    / ``synthetic``)."""

    # Feature files (h5 / Parquet / CARE .npy): a list of URIs, directories or glob patterns.
    feature_uris: list[str] = dataclasses.field(default_factory=list)
    # The ``patches`` Delta table written by the embedding job (needs patch features kept).
    patches_table: str | None = None
    # Only rows of this model version of the ``patches`` table (None: the table must hold one).
    model_version: str | None = None
    # Generate a known-answer cohort instead (care_scale.synthetic.COHORTS): which, its size.
    synthetic: bool = False
    synthetic_cohort: Literal["composition", "arrangement"] = "composition"
    synthetic_slides: int = 96
    synthetic_seed: int = 0
    # Slides held out of training (for the probes / retrieval the demo prints).
    holdout_fraction: float = 0.0
    storage_options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelConfig:
    name: str = "care_tiny"  # a create_slide_encoder registry name
    checkpoint: str | None = None  # initial CARE weights (e.g. the stage I result)
    init_seed: int | None = None  # seed of the random initialisation (None: the registry's)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimConfig:
    batch_size: int = 8  # per worker
    grad_accum_steps: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.04
    warmup_steps: int = 10
    steps: int = 200  # optimizer steps in total (the schedule's length)
    grad_clip: float = 3.0
    # lr multiplier of CARE's two region-construction scalars (log sigma, log tau): see
    # care_scale/training/optim.py for why they need one
    region_lr_scale: float = 20.0
    mixed_precision: bool = True  # bf16 autocast; only ever used on GPU


@dataclasses.dataclass
class RunConfig:
    name: str = "care-train"
    storage_path: str = "./care_runs"  # local directory or s3://bucket/prefix
    storage_options: dict[str, str] = dataclasses.field(default_factory=dict)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps
    keep_last: int = 2
    log_every: int = 5
    output: str | None = None  # final CARE checkpoint dir; default <storage>/<name>/final
    torch_threads: int = 1


@dataclasses.dataclass
class SSLConfig:
    max_patches: int = 360  # sub-WSI bound (DBSCAN split), the paper's rule
    dbscan_eps: float = 1.5  # in grid steps: neighbouring patches are density-connected
    global_crop_scale: tuple[float, float] = (0.6, 1.0)  # share of the sub-WSI's extent
    # iBOT's multi-crop: small crops the student alone sees; each predicts both teacher views.
    local_crops: int = 2
    local_crop_scale: tuple[float, float] = (0.3, 0.5)
    feature_noise: float = 0.5  # std of additive patch noise (relative to feature std)
    feature_dropout: float = 0.1
    global_shift: float = 1.0  # whole-view offset (isotropic: in units of the patch std)
    # >0: move views along the top principal directions of the cohort's slide means instead
    # (a prior neither iBOT nor the paper has; off by default, see the README's figures).
    shift_rank: int = 0
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: share of student tokens masked
    # which tokens: "random" (independent tokens) or "block" (iBOT's blockwise masking: square
    # blocks of the grid, so a masked token's neighbours are often masked too)
    mask_mode: Literal["random", "block"] = "random"
    out_dim: int = 256  # prototypes of the projection heads
    patch_out_dim: int = 256
    head_hidden: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99  # EMA, cosine-increased to 1.0
    loss_weight_slide: float = 1.0
    loss_weight_patch: float = 1.0
    # Region-level target (ssl.py, "Region-level loss"): every student view's patch predicts
    # the region that holds the same patch in the other global teacher view. "dino": DINO
    # cross-entropy on a region head's prototypes; "contrast": InfoNCE among the teacher
    # view's regions of the same sub-WSI (negatives share the slide's stain offset, so only
    # region content tells them apart); "none": off.
    # "bow": "dino" plus, OBoW-style, each view's slide embedding read by the region head
    # predicts the other teacher view's bag of region words (histogram of its regions').
    region_loss: Literal["none", "dino", "contrast", "bow"] = "none"
    loss_weight_region: float = 1.0
    region_out_dim: int = 64  # prototypes of the region head ("dino")
    region_temp: float = 0.1  # InfoNCE temperature ("contrast")
    lambda_rsl: float | None = None  # None: the CARE config's lambda_rsl
    collapse_std: float = 1e-3  # warn when the embedding std across a batch drops below


@dataclasses.dataclass
class Stage1Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ssl: SSLConfig = dataclasses.field(default_factory=SSLConfig)

    def validate(self) -> None:
        _validate_common(self)
        if self.ssl.max_patches < 16:
            raise ConfigError(f"ssl.max_patches={self.ssl.max_patches} must be >= 16")
        lo, hi = self.ssl.mask_ratio
        if not 0 <= lo <= hi < 1:
            raise ConfigError(f"ssl.mask_ratio={self.ssl.mask_ratio} must satisfy 0<=lo<=hi<1")


@dataclasses.dataclass
class MolecularConfig:
    rna: str | None = None  # sample x gene table (CSV / Parquet); first column = sample id
    protein: str | None = None  # sample x protein table
    mapping: str | None = None  # slide_id,sample_id table when ids differ
    sample_id_column: str = "sample_id"
    gene_list: str | None = None  # a text file (one gene a line) or an MSigDB .gmt file
    n_genes: int = 3999  # most variable genes when no gene list is given
    log1p: bool = False  # apply log1p to expression (raw counts)
    n_proteins: int = 10  # most abundant proteins per sample
    protein_embeddings: str | None = None  # protein_id x dim table (e.g. ESM-2); else learned
    allow_unpaired: bool = False  # drop (and log counts of) slides/samples without a partner
    storage_options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AlignConfig:
    phases: list[Literal["rna", "protein"]] = dataclasses.field(
        default_factory=lambda: ["rna", "protein"])
    phase_steps: list[int] = dataclasses.field(default_factory=list)  # default: split evenly
    embed_dim: int = 128  # shared space
    rna_dim: int = 64
    rna_layers: int = 2
    rna_heads: int = 4
    rna_checkpoint: str | None = None  # optional init (safetensors / weights-only torch)
    rna_key_map: dict[str, str] = dataclasses.field(default_factory=dict)
    protein_dim: int = 64
    protein_layers: int = 2
    protein_heads: int = 4
    init_temperature: float = 0.07
    max_patches: int = 1024  # larger slides: a contiguous crop of this many patches per step
    feature_noise: float = 0.2
    global_shift: float = 0.3
    # >0: views moved along the top principal directions of the training slides' mean
    # features (feature-space stain jitter). Cohort-dependent (README, Pretraining): on the
    # composition demo RNA top-1 0.078 -> 0.235 with 8; on the arrangement comparison 0.047 ->
    # 0.017 (below ridge). Off by default; the composition demo sets 8.
    shift_rank: int = 0
    shift_mix: bool = True  # each view's shift strength uniform in [0, global_shift]
    lambda_rsl: float | None = None
    slide_lr_scale: float = 1.0  # lr multiplier of the slide encoder (it stays trainable)


@dataclasses.dataclass
class Stage2Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    molecular: MolecularConfig = dataclasses.field(default_factory=MolecularConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)

    def validate(self) -> None:
        _validate_common(self)
        if not self.align.phases:
            raise ConfigError("align.phases is empty")
        if self.align.phase_steps and len(self.align.phase_steps) != len(self.align.phases):
            raise ConfigError("align.phase_steps needs one entry per phase")
        if self.align.phase_steps and sum(self.align.phase_steps) != self.optim.steps:
            raise ConfigError(
                f"align.phase_steps {self.align.phase_steps} must sum to optim.steps "
                f"({self.optim.steps})")


def _validate_common(cfg: Any) -> None:
    d = cfg.data
    sources = sum([bool(d.feature_uris), d.patches_table is not None, d.synthetic])
    if sources != 1:
        raise ConfigError(
            "data: set exactly one of data.feature_uris, data.patches_table, data.synthetic "
            f"(got {sources})")
    if cfg.run.num_workers < 1:
        raise ConfigError("run.num_workers must be >= 1")
    if cfg.optim.steps < 1 or cfg.optim.batch_size < 1 or cfg.optim.grad_accum_steps < 1:
        raise ConfigError("optim.steps, optim.batch_size, optim.grad_accum_steps must be >= 1")
    if cfg.optim.warmup_steps >= cfg.optim.steps:
        raise ConfigError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be < optim.steps "
            f"({cfg.optim.steps})")
    if cfg.run.checkpoint_every < 1 or cfg.run.keep_last < 1:
        raise ConfigError("run.checkpoint_every and run.keep_last must be >= 1")
    if not 0 <= d.holdout_fraction < 1:
        raise ConfigError("data.holdout_fraction must be in [0, 1)")
