"""The embedding job: slides -> tiles -> patch features -> CARE -> Delta tables, on Ray.

Design (why it looks like this)
-------------------------------
::

    driver: list sources, anti-join with warehouse.completed_slide_ids(model_version)
      |  ray.data.from_arrow(blocks of up to 16 slide rows)
      v
    map_batches(embed_slides)        CPU tasks (concurrency.decode_tasks): stage, open, tissue
      |    ^                         mask, tile grid, batched decode; each tile batch goes to
      |    | tiles / features        an encoder actor and its features come back, by object
      |    v                         references this task owns (patch_stage.py); the slide's
      |  PatchEncoder actors         features are written as shards; yields ONE row per
      |  (concurrency.encoder_actors, slide: shard URIs, tile count, metadata
      |   num_gpus per actor)
      v
    driver: iter_batches             one row per slide -> one call to the slide-encoder pool
      |
      v
    SlideEncoderActor                Ray actors (concurrency.slide_encoder_actors, GPUs with
      |                              num_gpus_per_slide_actor): read the shards, CARE, write
      |                              the slide's rows as Parquet data files (slide_stage.py)
      v
    driver: Warehouse.commit         every ``commit_every`` slides: patches, regions, then
                                     slides, one Delta transaction each, from file metadata

- The driver coordinates, workers move data: per slide the driver sees one stream row of a
  few hundred bytes, makes one actor call and gets the data files' metadata back; no pixel,
  patch feature or table row passes through it, and nothing it does grows with tiles
  (``patch_stage`` and ``slide_stage`` say why this design, with the measurements).
- Streaming and bounded memory: a decode task keeps at most ``concurrency.encode_in_flight``
  tile batches in flight, so pixels never accumulate; the slide-encoder pool has a bounded
  queue, and a full queue stops the driver pulling from the stream (Ray Data then stops
  starting decode tasks). Slides in flight are bounded by the decode concurrency.
- Decode and inference overlap: a decode task decodes the next batch while the encoder
  actors run the previous ones; the slide-encoder actors run CARE meanwhile.
- Exactly once: the driver skips slides already complete for this model version; each commit
  goes through ``Warehouse.commit`` (patches, then regions, then the slides row last; each
  commit replaces the files of earlier attempts at the same slides), so a killed run leaves
  at most data files in no commit, which a re-run redoes and ``tables vacuum`` deletes.
- A bad slide (missing, corrupt, unsupported, no MPP, no tissue, an encoder failing on it)
  becomes one "failure row" in the stream (``error_type`` set); the driver turns it into a
  ``failures`` table row with the stage, the exception class and the message, and the job
  goes on.
- Precomputed features (``features=True``): nothing to decode or encode; the slide-encoder
  actors read the feature files themselves and Ray Data is not involved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from care_scale.config import to_dict
from care_scale.embed.config import EmbedConfig
from care_scale.embed.job_models import JobModels, job_models, resolve_models
from care_scale.embed.progress import Progress, RunSummary
from care_scale.embed.results import STAGE_DECODE, STAGE_ENCODE, STAGE_OPEN, STAGE_TILE, RowContext
from care_scale.embed.sources import SlideSource, scan_source
from care_scale.exceptions import CareScaleError, ConfigError
from care_scale.storage import redact, redact_options
from care_scale.timeline import mark, merge_counts

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Swappable model factories (the only places that know how models are built).
# --------------------------------------------------------------------------------------------


def check_pairing(config: EmbedConfig, models: JobModels, sources: list[SlideSource]) -> None:
    """The patch features' size must be the slide encoder's input size; checked before any
    slide is decoded (else every slide would fail in CARE, one by one). With ``--features``
    the first readable feature file stands for the cohort (a file that differs from it still
    fails alone, with the same advice)."""
    in_dim = models.care.dim
    if config.features:
        from care_scale.models import read_patch_features

        for src in sources[:3]:
            try:
                dim = read_patch_features(src.uri, storage_options=config.storage_options
                                          or None).features.shape[1]
            except (CareScaleError, OSError, ValueError, KeyError, IndexError):
                continue  # an unreadable file fails on its own, as a failures row
            if dim != in_dim:
                raise ConfigError(f"{redact(src.uri)}: {dim}-d features, but "
                                  + feature_size_advice(config, in_dim, dim))
            return
        return
    patch = models.patch
    if patch is not None and patch.dim != in_dim:
        raise ConfigError(f"patch encoder {patch.name} gives {patch.dim}-d features, but "
                          + feature_size_advice(config, in_dim, patch.dim))


def check_artifacts(config: EmbedConfig) -> None:
    """A given ``artifacts`` directory must exist and hold this job's patch encoder; checked in
    the driver before any slide (else every encoder actor fails to start and every slide
    becomes a failures row), and once before Ray starts, where the patch encoder may not be
    resolved yet (then only the manifest's presence)."""
    if not config.artifacts or config.features:
        return
    from care_scale.artifacts import read_manifest

    manifest = read_manifest(config.artifacts, storage_options=config.storage_options or None)
    if not config.patch_encoder.name:
        return  # not resolved yet (the early check): only that the manifest is there
    if manifest.kind != "patch_encoder" or manifest.model != config.patch_encoder.name:
        raise ConfigError(f"{redact(config.artifacts)}: holds the {manifest.kind} "
                          f"{manifest.model!r}, but the job's patch encoder is "
                          f"{config.patch_encoder.name!r} (--set artifacts=... or "
                          "--set patch_encoder.name=...)")


def feature_size_advice(config: EmbedConfig, in_dim: int, dim: int) -> str:
    """What to change when ``dim``-d patch features meet a slide encoder taking ``in_dim``."""
    from care_scale.models import get_slide_encoder_spec, list_slide_encoders

    fits = [n for n in list_slide_encoders() if get_slide_encoder_spec(n).in_dim == dim]
    pick = (f"--set slide_encoder.name={fits[0]} (takes {dim}-d)" if fits
            else "--set slide_encoder.name=NAME")
    patch = ("" if config.features else
             f" or --set patch_encoder.name=NAME (empty: its own, "
             f"{get_slide_encoder_spec(config.slide_encoder.name).patch_encoder})")
    return (f"slide encoder {config.slide_encoder.name} takes {in_dim}-d input: use {pick}"
            f"{patch}, or --set slide_encoder.overrides.in_dim={dim} for a CARE trained on "
            "such features")


def export_for_local_actors(config: EmbedConfig, models: JobModels | None = None
                            ) -> str | None:
    """Make the ONNX export once, in the driver, for encoder actors on this machine; returns
    its directory, or None where the actors should resolve their backend themselves.

    Without it every ONNX Runtime actor builds the torch model to find (or make) the cached
    export: importing torch and onnx costs each actor ~3 s of start-up on 2 cores, before its
    first batch. The driver knows the model's version, and the cached directory is a complete
    artifact directory (manifest, parity-checked, keyed by the weights' version), so an actor
    that can see it loads it with onnxruntime alone (``patch_stage.PatchEncoder`` checks it exists on
    its node and otherwise falls back). ``models``: the job's (``job_models``), whose
    cached facts find a cached export without building the model.
    """
    if (config.features or config.artifacts or config.concurrency.num_gpus_per_actor > 0
            or config.precision not in ("fp32", "int8")):
        # Nothing to export, given artifacts, GPU choices made on the GPU nodes, or a
        # precision torch runs (bf16 / fp16 autocast: the actors need the model itself).
        return None
    from care_scale.inference import KINDS, choose_patch_kind

    # The kind a CPU actor will choose; only one that runs from an on-the-fly export needs it.
    kind, _ = choose_patch_kind(config.backend, device="cpu")
    if not KINDS[kind].export_on_the_fly:
        return None
    models = job_models(config) if models is None else models
    # int8: the quantised variant (`precision: auto` has usually made it already, measuring).
    return str(models.patch_export(tile_size=config.patch_size,
                                   variant="int8" if config.precision == "int8" else None))


def export_care_for_local_actors(config: EmbedConfig, models: JobModels) -> str | None:
    """CARE's ONNX export (cached, keyed by its version) for slide-encoder actors on this
    machine, which then run it on ONNX Runtime without importing torch
    (``slide_stage.SlideEncoderActor``). ``backend`` picks CARE's kind as it does the patch
    encoder's (``choose_slide_kind``; TensorRT has no CARE backend, so it means auto there).
    None where the actors build the torch model: torch chosen, GPU actors, a remote-code
    model (its graph is not ours to export), or an export that fails (logged; the run goes
    on with torch)."""
    from care_scale.inference import choose_slide_kind

    kind, _ = choose_slide_kind("auto" if config.backend == "tensorrt" else config.backend)
    if (kind != "onnxruntime" or config.concurrency.num_gpus_per_slide_actor > 0
            or config.slide_encoder.trust_remote_code):
        return None
    try:
        return str(models.care_export())
    except (CareScaleError, RuntimeError, OSError) as exc:
        log.warning("CARE runs on torch in the slide-encoder actors: its ONNX export failed: "
                    "%s", redact(exc))
        return None


def _actors_run_on_this_node(config: EmbedConfig) -> bool:
    """True when the only alive Ray node is the driver's own and it can host an encoder actor
    (a local cluster, or a one-node cluster the job was submitted to): the driver's disk is
    then the actors' disk. Not for a head node without CPUs whose workers are still to come."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return (len(alive) == 1 and alive[0]["NodeID"] == here
            and alive[0].get("Resources", {}).get("CPU", 0)
            >= config.concurrency.num_cpus_per_actor)


def precision_suffix(config: EmbedConfig) -> str:
    """The patch encoder version's suffix for a reduced ``config.precision`` (``+bf16``); for
    int8 the one of the graph the actors run: a given artifact directory's int8 variant, or
    the on-the-fly export quantised for this machine's CPU (``+int8w8`` with 8-bit weights
    where it has VNNI, ``export.onnx_export.quantize_patch_onnx``). Encoder actors check that
    their graph carries it (``patch_stage.PatchEncoder``)."""
    if config.precision != "int8":
        return f"+{config.precision}"
    from care_scale.artifacts import INT8_VERSION_SUFFIX

    if config.artifacts:
        from care_scale.artifacts import read_manifest

        variant = read_manifest(config.artifacts, storage_options=config.storage_options
                                or None).variants.get("int8", {})
        return INT8_VERSION_SUFFIX[int(variant.get("weight_bits", 7))]
    from care_scale.inference.precision import int8_weight_bits

    return INT8_VERSION_SUFFIX[int8_weight_bits()]


def job_model_version(config: EmbedConfig, care_version: str, patch_version: str) -> str:
    """The key of "this slide is done": both encoders plus the tiling that feeds them.

    Changing the CARE checkpoint, the patch encoder, the target MPP, patch size, tiling mode
    or tissue threshold changes the embeddings, so it changes the version and re-embeds every
    slide. The native mode is left out of the key: its versions stay those made before tiling
    modes existed.
    """
    key = {
        "target_mpp": config.target_mpp,
        "patch_size": config.patch_size,
        "min_tissue_fraction": config.min_tissue_fraction,
        "tissue": to_dict(config.tissue),
        "features": config.features,
    }
    if config.tiling not in (None, "native"):
        key["tiling"] = config.tiling
    if config.annotations.used:  # only when used: versions made without them stay the same
        key["annotations"] = to_dict(config.annotations)
    tiling = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(tiling.encode()).hexdigest()[:8]
    return f"{care_version}+{patch_version}+t{digest}"


# --------------------------------------------------------------------------------------------
# The stream: decode tasks that route tiles through the encoder actors
# --------------------------------------------------------------------------------------------


# One stream row per slide, what the driver receives (all small).
ROW_COLUMNS = ("slide_id", "n_tiles", "count", "shards", "meta", "backend", "error_stage",
               "error_type", "error_message")


def _slide_row(slide_id: str, *, n_tiles: int = 0, shards: list[str] = (), meta: str = "",
               backend: str = "", error: tuple[str, str, str] = ("", "", "")) -> dict:
    values = (slide_id, n_tiles, n_tiles if shards else 0, json.dumps(list(shards)), meta,
              backend, *error)
    out = {k: np.array([v], dtype=object) for k, v in zip(ROW_COLUMNS, values)}
    for k in ("n_tiles", "count"):
        out[k] = out[k].astype(np.int64)
    return out


def _annotations(cfg: EmbedConfig, row: dict[str, Any], grid: Any, opts: Any
                 ) -> tuple[Any, dict[str, str]] | None:
    """The grid restricted to the slide's annotation file and what the slides row records,
    or None when the slide has no annotation file."""
    from care_scale.annotations import annotation_uri, read_annotations

    uri = annotation_uri(row["slide_id"], row.get("annotations"), cfg.annotations.dir, opts)
    if uri is None:
        return None
    ann = read_annotations(uri, exclude_classes=cfg.annotations.exclude_classes,
                           storage_options=opts)
    kept = ann.restrict(grid)
    return kept, ann.record(len(grid), len(kept), cfg.annotations.exclude_classes)


def _slide_meta(row: dict[str, Any], slide: Any, grid: Any, size: int | None,
                etag: str | None, *, annotations: dict[str, str] | None = None,
                decode_threads: int = 0, timeline: dict[str, float] | None = None) -> str:
    return json.dumps(
        {
            "annotations": annotations or {},
            "decode_threads": decode_threads,
            "timeline": timeline or {},
            "uri": row["uri"],
            "source_size": size,
            "source_etag": etag,
            "width": int(slide.dimensions[0]),
            "height": int(slide.dimensions[1]),
            "mpp": float(grid.mpp),
            "mpp_source": str(grid.mpp_source),
            "target_mpp": float(grid.target_mpp),
            "level": int(grid.level),
            "patch_size": int(grid.patch_size),
            "patch_size_level0": int(grid.patch_size_level0),
            "step_level0": int(grid.step_level0),
            "slide_backend": str(slide.backend),
            "vendor": slide.vendor,
            "objective_power": slide.objective_power,
        }
    )


@dataclass
class _SlideInFlight:
    """One slide of a decode task, from its first tile batch sent until its row is yielded."""

    slide_id: str
    shards: Any  # ShardBuffer
    n_tiles: int = 0
    meta: str = ""
    backend: str = ""
    sent: int = 0  # tile batches sent to the encoders
    back: int = 0  # ... and come back
    decoded: bool = False
    error: tuple[str, str, str] | None = None  # stage, exception class, message

    def finished(self) -> bool:
        return self.error is not None or (self.decoded and self.back == self.sent)

    def take(self, start: int, coords: np.ndarray, tissue: np.ndarray,
             feats: np.ndarray | None, kind: str, error: tuple[str, str] | None) -> None:
        """One encoded batch back: into the shards, or the slide fails at the encode stage."""
        self.back += 1
        if self.error is not None:
            return  # batches still in flight when the slide failed
        if error is not None:
            self.error = (STAGE_ENCODE, *error)
            return
        self.backend = kind
        self._staging(self.shards.add, start, coords, tissue, feats)

    def _staging(self, call: Any, *args: Any) -> None:
        """A staging store that cannot be written fails this slide, not the job."""
        try:
            call(*args)
        except OSError as exc:
            self.error = (STAGE_ENCODE, type(exc).__name__,
                          "staging features: " + redact(exc)[:2000])

    def row(self) -> dict:
        if self.error is None:
            self._staging(self.shards.close)
        if self.error is not None:
            self.shards.discard()
            return _slide_row(self.slide_id, error=self.error)
        return _slide_row(self.slide_id, n_tiles=self.n_tiles, shards=self.shards.uris,
                          meta=self.meta, backend=self.backend)


def job_tile_grid(cfg: EmbedConfig, slide: Any, mpp_override: float | None) -> Any:
    """The job's tile grid of one open slide, as its (resolved) config says."""
    from care_scale.tiling import tile_grid

    return tile_grid(slide, target_mpp=cfg.target_mpp, patch_size=cfg.patch_size,
                     min_tissue_fraction=cfg.min_tissue_fraction, tissue=cfg.tissue,
                     mpp_override=mpp_override, mode=cfg.tiling or "native")


def embed_slides(batch: dict[str, np.ndarray], *, params: dict[str, Any]) -> Iterator[dict]:
    """Ray Data UDF over a block of slide rows: decode each slide's tiles, have the encoder
    actors embed them, stage the features; yield one row per slide (:data:`ROW_COLUMNS`), a
    failure row if any step fails.

    Batches stay in flight across slides: while the last batches of one slide are encoded,
    the next slide is opened, its tissue found and its first batches decoded, so the
    encoders do not wait for a slide's set-up.
    """
    from care_scale.embed.node_threads import assigned_cpus, decode_threads
    from care_scale.embed.patch_stage import Router
    from care_scale.embed.shards import ShardBuffer
    from care_scale.slides import open_slide, stat_uri
    from care_scale.tiling import iter_tile_batches

    cfg: EmbedConfig = params["config"]
    opts = cfg.storage_options or None
    cache = _slide_cache(cfg)
    router = Router(params["encoders"], max_in_flight=cfg.concurrency.encode_in_flight)
    readers = decode_threads(cfg.concurrency.decode_num_workers, assigned_cpus())
    marks = {"decode_task": time.time()}  # this task's own phases (care_scale.timeline)
    slides: list[_SlideInFlight] = []

    def take(results: list) -> Iterator[dict]:
        for (st, *batch_args), *out in results:
            st.take(*batch_args, *out)
        for st in [st for st in slides if st.finished()]:
            slides.remove(st)
            yield st.row()

    for raw in batch["source"]:
        row = json.loads(raw)
        st = _SlideInFlight(row["slide_id"], ShardBuffer(params["staging"], row["slide_id"],
                                                         opts))
        slides.append(st)
        mpp_override = row.get("mpp") or cfg.mpp_override
        stage = STAGE_OPEN
        try:
            size, etag = stat_uri(row["uri"], storage_options=opts)
            with open_slide(row["uri"], storage_options=opts, cache=cache,
                            backend=cfg.slide_backend, mpp_override=mpp_override) as slide:
                stage = STAGE_TILE
                grid = job_tile_grid(cfg, slide, mpp_override)
                annotated = _annotations(cfg, row, grid, opts)
                if annotated is not None:
                    grid, ann_meta = annotated
                st.n_tiles = len(grid)
                if st.n_tiles == 0:
                    from care_scale.exceptions import NoTissueError

                    raise NoTissueError(
                        redact(row["uri"]),
                        f"no tile reaches min_tissue_fraction={cfg.min_tissue_fraction} "
                        f"({cfg.tiling} tiling)"
                        + (" inside its annotations" if annotated is not None else ""),
                    )
                marks.setdefault("tiled", time.time())  # opened, tissue found, grid made
                st.meta = _slide_meta(row, slide, grid, size, etag,
                                      annotations=ann_meta if annotated is not None else None,
                                      decode_threads=readers, timeline=marks)
                if cfg.overlays:
                    _overlay_tissue(cfg, row["slide_id"], slide, grid)
                stage = STAGE_DECODE
                start, parts = 0, []
                batches = iter_tile_batches(slide, grid, batch_size=cfg.decode_batch_size,
                                            num_workers=readers)
                for last, tb in _flag_last(batches):
                    # Decode batches are joined up to one encoder batch (a GPU wants 256
                    # tiles per call; decode memory wants fewer per batch); a call never
                    # mixes slides, so only a slide's last call is short.
                    parts.append(tb)
                    if not last and sum(len(p.coords) for p in parts) < cfg.encode_batch_size:
                        continue
                    coords = np.concatenate([p.coords for p in parts])
                    tissue = np.concatenate([p.tissue_fraction for p in parts])
                    tiles = (parts[0].tiles if len(parts) == 1
                             else np.concatenate([p.tiles for p in parts]))
                    parts = []
                    st.sent += 1
                    yield from take(router.submit(tiles, (st, start, coords, tissue)))
                    start += len(coords)
                    if st.error is not None:
                        break  # an encoder failed on this slide: stop decoding it
            st.decoded = True
        except (CareScaleError, OSError, ValueError, RuntimeError, MemoryError) as exc:
            # A bad slide must not stop the job: it becomes a failure row.
            st.error = st.error or (stage, type(exc).__name__, redact(exc)[:2000])
        yield from take([])
    yield from take(router.drain())


def _overlay_tissue(cfg: EmbedConfig, slide_id: str, slide: Any, grid: Any) -> None:
    """``--overlays``: the thumbnail tissue detection has just read (cached by the slide, so
    no extra read in the native tiling mode; the trident mode segments another image, so
    there it is one extra thumbnail read) and the tiling's tissue contours, into the slide's
    overlay folder. A store that cannot take them costs the slide its pictures, not its
    embedding."""
    from care_scale.overlays.files import overlay_folder, write_tissue

    try:
        write_tissue(overlay_folder(cfg.warehouse, slide_id), slide_id,
                     slide.thumbnail(cfg.tissue.thumbnail_max_side), grid.tissue.contours,
                     cfg.storage_options or None)
    except (CareScaleError, OSError, ValueError) as exc:
        log.warning("%s: overlay thumbnail not written: %s", slide_id, redact(exc))


def _flag_last(items: Iterator[Any]) -> Iterator[tuple[bool, Any]]:
    """``(is_last, item)`` for each item of ``items``."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield False, prev
        prev = item
    yield True, prev


_CACHES: dict[str, Any] = {}


def _slide_cache(cfg: EmbedConfig) -> Any:
    """One staging cache per worker process (remote slides only)."""
    if not cfg.cache_dir:
        return None
    if cfg.cache_dir not in _CACHES:
        from care_scale.slides.cache import SlideCache

        _CACHES[cfg.cache_dir] = SlideCache(cfg.cache_dir, max_bytes=cfg.cache_max_bytes)
    return _CACHES[cfg.cache_dir]


# --------------------------------------------------------------------------------------------
# Driver side: per-slide assembly, CARE, commits
# --------------------------------------------------------------------------------------------


def _ensure_ray(config: EmbedConfig) -> bool:
    """Join RAY_ADDRESS / ``ray_address`` when given, else start a local cluster of our own.

    Returns True when this call started Ray (and so should shut it down).
    """
    # Not `import ray` yet: a local cluster must set its loopback switch first (local_ray).
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        ray.init(address=address, log_to_driver=True)
    else:
        from care_scale.local_ray import init_local

        # No job-level runtime_env: the worker processes the raylet prestarts (one per
        # CPU) have none, and only a worker of the job's own runtime env
        # can run its actors and tasks. With one, those were killed unused and every actor
        # and task waited for a process of its own (bench_fixed_cost --baseline-rev main,
        # alternating, load 6-7: encoder actor start 7.3 -> 4.3 s median; two processes
        # fewer, 1.6 CPU s less). OMP_NUM_THREADS:
        # Ray sets it per worker to the CPUs it assigns (1 for our defaults) where unset;
        # the pools that matter are sized explicitly (node_threads).
        init_local(
            head_services=False,
            num_cpus=config.num_cpus,
            object_store_memory=config.object_store_memory,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


# At most this many slides share one input block (one decode task handles them in turn).
MAX_SLIDES_PER_BLOCK = 16


def _source_blocks(todo: list[SlideSource], decode_tasks: int) -> list[Any]:
    """The job's input as Arrow blocks of a few slides each.

    One block per slide would mean one object-store put and one block of scheduler state
    per slide up front (minutes and GBs for 100,000 slides); one block for all would mean
    one decode task. Small cohorts keep one slide per block (full decode parallelism);
    large ones group up to ``MAX_SLIDES_PER_BLOCK`` slides, still >= 4 blocks per task.
    """
    import pyarrow as pa

    per = max(1, min(MAX_SLIDES_PER_BLOCK, len(todo) // (4 * max(1, decode_tasks))))
    return [pa.table({"source": [json.dumps(s.to_row()) for s in todo[i:i + per]]})
            for i in range(0, len(todo), per)]


def build_dataset(config: EmbedConfig, todo: list[SlideSource], *, staging: str,
                  local_export: str | None = None, one_node: bool = False,
                  patch_version: str | None = None) -> tuple[Any, Any]:
    """The Ray Data pipeline (lazy) and the encoder pool it calls: decode tasks that route
    their tiles through the encoder actors and stage the features under ``staging``; one
    output row per slide (:data:`ROW_COLUMNS`). ``local_export``, ``one_node`` (the actors
    run on the driver's node), ``patch_version`` (the rows' patch encoder version): see
    ``patch_stage``. The caller shuts the pool down."""
    import ray
    import ray.data

    from care_scale.embed.patch_stage import EncoderPool
    from care_scale.local_ray import quiet_console

    quiet_console()  # Ray Data's console handler exists now: our progress line is the view
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Every output row its own block: a decode task that handles several slides in turn
    # hands each one on as soon as it is done (the rows are a few hundred bytes; Ray Data
    # would otherwise hold them until its block size is reached or the task ends).
    ctx.target_max_block_size = 1
    # A decode task that dies (a native reader crashing on a damaged file) loses only its
    # slide's block; the driver reports that slide as failed instead of aborting the cohort.
    ctx.max_errored_blocks = max(1, len(todo))
    c = config.concurrency
    # The encoder and slide-encoder actors are not Ray Data's: keep their reservation out of
    # its budget, or it would plan decode tasks on CPUs they hold and wait for them forever.
    # (Ray 2.60 marks the option deprecated in favour of node labels, which cannot express
    # "part of this node"; it still applies.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.execution_options.exclude_resources = ray.data.ExecutionResources(
            cpu=(c.slide_encoder_actors * c.num_cpus_per_slide_actor
                 + c.encoder_actors * c.num_cpus_per_actor),
            gpu=(c.slide_encoder_actors * c.num_gpus_per_slide_actor
                 + c.encoder_actors * c.num_gpus_per_actor))
    # The actors first: their worker processes start while Ray Data plans and starts the
    # decode tasks (each is seconds of process start-up on a small node).
    pool = EncoderPool(config, local_export=local_export, one_node=one_node,
                       patch_version=patch_version)
    blocks = _source_blocks(todo, c.decode_tasks)
    # from_blocks: the blocks' metadata is computed here. (from_arrow computes it in a
    # one-CPU Ray task: one more worker process to start, and on a small node a task that
    # waits forever behind the actors' reservation.)
    ds = ray.data.from_blocks(blocks)
    ds = ds.map_batches(
        # The whole input block per call: batches stay in flight from one slide to the next.
        embed_slides, batch_size=None,
        fn_kwargs={"params": {"config": config, "staging": staging, "encoders": pool.actors}},
        # No more tasks than input blocks (a one-slide run needs one; Ray Data warns else).
        compute=ray.data.TaskPoolStrategy(size=min(c.decode_tasks, len(blocks))),
        num_cpus=c.decode_num_cpus,
        memory=c.decode_memory_bytes or None,
        resources=dict(c.decode_resources) or None,
    )
    return ds, pool


@dataclass
class _Prepared:
    """What the driver settles before any slide is decoded (``_prepare``)."""

    config: EmbedConfig
    run_id: str
    sources: list[SlideSource]
    todo: list[SlideSource]
    wh: Any
    models: JobModels
    ctx: RowContext
    summary: RunSummary
    backend_kind: str


def _prepare(config: EmbedConfig, listing: Any) -> _Prepared:
    """Models, versions, warehouse tables and the runs row: everything before the first slide
    that needs no Ray (so it runs while Ray starts, see ``run_embedding``)."""
    from care_scale.embed.calibrate import resolve_precision
    from care_scale.warehouse import Warehouse

    # The models' facts: cached on this machine after a first run (no torch import here),
    # else by building them (care_scale.embed.job_models).
    models = job_models(config)
    config = resolve_models(config, preset=models.preset)
    mark("resolved")
    run_id = config.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4(
    ).hex[:6]
    sources = listing.sources
    check_pairing(config, models, sources)
    check_artifacts(config)
    wh = Warehouse(config.warehouse, storage_options=config.storage_options or None)
    config, precision_choice = resolve_precision(
        config, sources, cache=_slide_cache(config),
        runs=wh.run_configs() if config.precision == "auto" else (), models=models)
    care_version = models.care.version
    patch_version = "precomputed" if config.features else models.patch.version
    if not config.features and config.precision != "fp32":
        patch_version += precision_suffix(config)  # other embeddings: another model version
    version = job_model_version(config, care_version, patch_version)
    # The encoder actors report the backend they actually chose ("auto" resolves there).
    backend_kind = "features" if config.features else config.backend
    mark("models")

    wh.ensure_tables()
    done_ids = wh.completed_slide_ids(version)
    todo = [s for s in sources if s.slide_id not in done_ids]
    summary = RunSummary(run_id=run_id, warehouse=redact(config.warehouse),
                         model_version=version, backend=backend_kind, total=len(sources),
                         skipped=len(sources) - len(todo),
                         untrained=[m.name for m in (models.care, models.patch)
                                    if m is not None and not m.trained],
                         ignored=[(redact(u), why) for u, why in listing.ignored],
                         precision_note=precision_choice.reason if precision_choice else "")
    run_config = to_dict(config)
    run_config["storage_options"] = redact_options(config.storage_options)
    run_config.update(source=redact(config.source), warehouse=redact(config.warehouse))
    run_config.update(model_version=version, care_version=care_version,
                      patch_version=patch_version, backend_kind=backend_kind)
    if precision_choice is not None:  # what `precision: auto` measured, and chose
        run_config["precision_auto"] = precision_choice.as_record()
    wh.start_run(run_id, run_config)
    mark("warehouse")
    ctx = RowContext(run_id=run_id, version=version, care_version=care_version,
                     patch_version=patch_version, keep_patches=config.keep_patches)
    return _Prepared(config=config, run_id=run_id, sources=sources, todo=todo, wh=wh,
                     models=models, ctx=ctx, summary=summary,
                     backend_kind=backend_kind)


def _may_have_work(config: EmbedConfig, sources: list[SlideSource]) -> bool:
    """Whether starting Ray before the versions are known is worth it: some listed slide is
    in no version of the warehouse's slides table (a re-run of a finished cohort, the common
    case where nothing is to do, then never starts Ray)."""
    if not sources:
        return False
    from care_scale.storage import join, url_to_fs

    opts = config.storage_options or None
    fs, path = url_to_fs(join(config.warehouse, "slides", "_delta_log"), opts)
    if not fs.exists(path):
        return True
    from care_scale.warehouse import Warehouse

    known = Warehouse(config.warehouse, storage_options=opts).known_slide_ids()
    return any(s.slide_id not in known for s in sources)


def _prepare_while_ray_starts(config: EmbedConfig, listing: Any
                              ) -> tuple[_Prepared, bool]:
    """``_prepare`` in a thread while this (main) thread starts or joins Ray, when there may
    be slides to embed: the torch import, model builds and table reads overlap Ray's seconds
    of start-up. Returns what was prepared and whether this call started Ray (the caller shuts
    it down). Ray stays in the main thread: it sets signal handlers there."""
    from concurrent.futures import ThreadPoolExecutor

    if not _may_have_work(config, listing.sources):
        return _prepare(config, listing), False
    if not (config.ray_address or os.environ.get("RAY_ADDRESS")):
        from care_scale.local_ray import loopback_only

        loopback_only()  # before the thread can import ray
    started_ray = False
    with ThreadPoolExecutor(1, thread_name_prefix="care-scale-prepare") as pool:
        future = pool.submit(_prepare, config, listing)
        try:
            mark("ray_start")
            started_ray = _ensure_ray(config)
            mark("ray")
            prepared = future.result()
        except BaseException:
            future.cancel()
            if started_ray:
                _shutdown_ray()
            raise
    return prepared, started_ray


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def run_embedding(config: EmbedConfig) -> RunSummary:
    """Embed every slide of ``config.source`` not yet in ``config.warehouse``; see the module."""
    from care_scale import timeline
    from care_scale.embed.results import build_failure

    timeline.reset(keep=("cli",))
    mark("run")
    config.require_io()
    config.validate()
    t0 = time.monotonic()
    listing = scan_source(config.source, features=config.features,
                          storage_options=config.storage_options or None)
    mark("listed")
    check_artifacts(config)  # before Ray starts: a wrong folder is an error in a second
    p, started_ray = _prepare_while_ray_starts(config, listing)
    mark("prepared")
    config, todo, wh, summary, ctx = p.config, p.todo, p.wh, p.summary, p.ctx
    backend_kind = p.backend_kind
    by_id = {s.slide_id: s for s in p.sources}
    progress = Progress(len(p.sources), skipped=summary.skipped, mode=config.progress)

    if todo:
        if not started_ray:
            mark("ray_start")
            started_ray = _ensure_ray(config)
            mark("ray")
        staging = wh.staging_uri(p.run_id)
        stage = encoders = None
        try:
            from care_scale.embed.slide_stage import SlideStage
            from care_scale.local_ray import ray_data_actors_in_driver

            one_node = _actors_run_on_this_node(config)
            stage = SlideStage(config, ctx, local_export=(
                export_care_for_local_actors(config, p.models) if one_node else None))
            collector = _Collector(config, ctx, by_id, wh, stage, progress, summary,
                                   build_failure)
            if config.features:
                p.models.release()  # CARE's export is made: the driver needs no model now
                for src in todo:
                    collector.submit_feature_file(src)
                    collector.collect()
            else:
                local_export = (export_for_local_actors(config, p.models)
                                if one_node else None)
                p.models.release()  # both exports are made: the driver needs no model now
                mark("exported")
                with (ray_data_actors_in_driver() if started_ray
                      else contextlib.nullcontext()):  # (a cluster of our own)
                    ds, encoders = build_dataset(config, todo, staging=staging,
                                                 local_export=local_export, one_node=one_node,
                                                 patch_version=p.ctx.patch_version)
                    mark("planned")
                    for batch in ds.iter_batches(batch_size=None, batch_format="numpy",
                                                 prefetch_batches=0):
                        mark("first_row")
                        collector.consume(batch)
                        collector.collect()
                mark("stream_done")
                collector.actor_info(encoders.info())
            collector.close(todo)
            collector.threads["slide_encoders"] = stage.info()
            mark("collected")
            if collector.backend_kind:
                backend_kind = collector.backend_kind
        finally:
            for pool in (stage, encoders):
                if pool is not None:
                    pool.shutdown()
            _remove_staging(staging, config)
            mark("pools_down")
            if started_ray:
                _shutdown_ray()
        mark("shutdown")
    elif started_ray:  # started early, and every slide turned out done for this version
        _shutdown_ray()
    progress.close()
    summary.backend = backend_kind
    summary.tiles = progress.tiles
    summary.seconds = time.monotonic() - t0
    counts = {"total": summary.total, "skipped": summary.skipped, "done": summary.done,
              "failed": summary.failed, "tiles": summary.tiles}
    if todo:  # the thread pools the workers actually ran (and what CARE ran on)
        counts["threads"] = collector.threads
    if todo and not config.features:
        counts["tiles_over_time"] = collector.tiles_over_time  # the report's tiles/s plot
    mark("finished")
    counts["timeline"] = {**timeline.marks(), **(collector.worker_marks if todo else {})}
    wh.finish_run(p.run_id, counts)
    return summary


def _remove_staging(staging: str, config: EmbedConfig) -> None:
    """The run's own scratch folder: shards of slides that failed mid-way (the rest were
    removed as they were read). A killed run leaves it for ``tables vacuum``."""
    from care_scale.storage import url_to_fs

    try:
        fs, path = url_to_fs(staging, config.storage_options or None)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as exc:
        log.warning("could not remove the staging folder %s: %s", redact(staging), redact(exc))


class _Collector:
    """Driver side of the stream: per-slide shard bookkeeping, slide-encoder calls, commits."""

    def __init__(self, config, ctx, by_id, wh, stage, progress, summary, build_failure):
        self.config, self.ctx, self.by_id, self.wh, self.stage = config, ctx, by_id, wh, stage
        self.progress, self.summary = progress, summary
        self.build_failure = build_failure
        self.submitted: set[str] = set()
        self.failed: set[str] = set()
        self.completed: set[str] = set()
        self.files: list[Any] = []  # DataFile of finished slides, not yet committed
        self.dims: dict[str, int] = {}
        self.n_results = 0
        self.failures: list[Any] = []
        self.backend_kind = ""
        # Reader threads of the decode tasks, intra-op threads of the encoder actors.
        self.threads: dict[str, Any] = {"decode": 0, "encoders": []}
        # The workers' timeline marks (care_scale.timeline): the earliest of each.
        self.worker_marks: dict[str, float] = {}
        # The encoder actors' tiles over time, summed (care_scale.timeline.merge_counts).
        self.tiles_over_time: list[list[float]] = []

    def actor_info(self, infos: list[dict[str, Any]]) -> None:
        """The encoder actors' threads and timeline marks (first ready, first / last tile)."""
        self.threads["encoders"] = [{k: i[k] for k in ("backend", "cpus", "threads")}
                                    for i in infos]
        for info in infos:
            self._worker_marks(info.get("timeline", {}), latest=("last_encoded",))
        self.tiles_over_time = merge_counts([i.get("tiles_over_time", []) for i in infos])

    def _worker_marks(self, marks: dict[str, float], latest: tuple[str, ...] = ()) -> None:
        for name, t in marks.items():
            pick = max if name in latest else min
            self.worker_marks[name] = pick(self.worker_marks.get(name, t), t)

    # -- stream in ------------------------------------------------------------------------
    def consume(self, batch: dict[str, np.ndarray]) -> None:
        """Stream rows (one per slide): a failure, or a slide whose features are staged and
        go to the slide-encoder pool."""
        for i, sid in enumerate(batch["slide_id"].tolist()):
            etype = str(batch["error_type"][i])
            if etype:
                self.fail(sid, str(batch["error_stage"][i]), etype,
                          str(batch["error_message"][i]))
                continue
            self.backend_kind = str(batch["backend"][i])
            self.progress.add_tiles(int(batch["count"][i]))
            self.submitted.add(sid)
            meta = json.loads(str(batch["meta"][i]))
            self.threads["decode"] = max(self.threads["decode"], meta.get("decode_threads", 0))
            self._worker_marks(meta.pop("timeline", {}))
            self.stage.submit("encode_shards", sid, self.by_id[sid].to_row(), meta,
                              json.loads(str(batch["shards"][i])), self.backend_kind)

    def submit_feature_file(self, src: SlideSource) -> None:
        self.submitted.add(src.slide_id)
        self.stage.submit("encode_feature_file", src.slide_id, src.to_row())

    # -- outcomes -------------------------------------------------------------------------
    def collect(self, *, wait: bool = False) -> None:
        for out in (self.stage.drain() if wait else self.stage.poll()):
            self.submitted.discard(out.slide_id)
            if out.error is not None:
                self.fail(out.slide_id, *out.error)
                continue
            self.files.extend(out.files)
            self.dims.update(out.dims)
            self.n_results += 1
            self.completed.add(out.slide_id)
            self.summary.done += 1
            if self.config.features:
                self.progress.add_tiles(out.tiles)
            self.progress.slide_done()
        self.commit(force=wait)

    def commit(self, force: bool = False) -> None:
        """Commit finished slides every ``commit_every`` slides (few, large commits)."""
        every = self.config.commit_every
        if self.n_results and (force or self.n_results >= every):
            self.wh.commit(list(self.files), dims=self.dims)
            self.files.clear()
            self.n_results = 0
        if self.failures and (force or len(self.failures) >= every):
            self.wh.record_failures(list(self.failures))
            self.failures.clear()

    def fail(self, slide_id: str, stage: str, etype: str, message: str) -> None:
        self.failed.add(slide_id)
        self.failures.append(
            self.build_failure(self.ctx, self.by_id[slide_id], stage, etype, message))
        self.summary.failed += 1
        self.summary.failures.append((slide_id, etype, message))
        self.progress.slide_failed()

    def close(self, todo: list[SlideSource]) -> None:
        """Wait for the slide encoders; slides the stream never finished: a worker died."""
        self.collect(wait=True)
        for src in todo:
            if src.slide_id not in self.completed and src.slide_id not in self.failed:
                self.fail(src.slide_id, STAGE_DECODE, "WorkerCrashedError",
                          f"{redact(src.uri)}: its decode task produced no output (crashed)")
        self.commit(force=True)


__all__ = [
    "build_dataset",
    "embed_slides",
    "job_model_version",
    "run_embedding",
]
