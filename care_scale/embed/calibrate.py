"""``precision: auto`` for one run: resolved once, in the driver, on tiles of the run's own
first readable slide, so every encoder actor uses the same precision and every row of the
run carries the same model version (care_scale.inference.precision does the measuring)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from care_scale.embed.config import EmbedConfig
from care_scale.embed.sources import SlideSource
from care_scale.exceptions import CareScaleError

#: Tiles measured per precision (one encoder call), and slides tried for them.
CALIBRATION_TILES = 32
CALIBRATION_SLIDES = 3


def calibration_tiles(config: EmbedConfig, sources: list[SlideSource], *,
                      cache: Any = None) -> np.ndarray | None:
    """Up to :data:`CALIBRATION_TILES` tissue tiles of the first readable slide, tiled as
    the job tiles them; None when none of the first slides can be read."""
    from care_scale.embed.pipeline import job_tile_grid
    from care_scale.slides import open_slide
    from care_scale.tiling import iter_tile_batches

    for src in sources[:CALIBRATION_SLIDES]:
        mpp = src.mpp or config.mpp_override
        try:
            with open_slide(src.uri, storage_options=config.storage_options or None,
                            cache=cache, backend=config.slide_backend,
                            mpp_override=mpp) as slide:
                grid = job_tile_grid(config, slide, mpp)
                if len(grid) == 0:
                    continue
                sub = dataclasses.replace(grid, coords=grid.coords[:CALIBRATION_TILES],
                                          tissue_fraction=grid.tissue_fraction[
                                              :CALIBRATION_TILES])
                batch = next(iter_tile_batches(slide, sub, batch_size=CALIBRATION_TILES))
                return batch.tiles
        except (CareScaleError, OSError, ValueError, RuntimeError):
            continue  # that slide fails on its own later, as a failures row
    return None


#: What must match for an earlier run's auto choice to be kept (the same features).
_SAME_ENCODER = ("patch_encoder", "backend", "patch_size", "target_mpp", "artifacts")


def earlier_choice(config: EmbedConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest earlier run's ``precision_auto`` record for the same patch encoder and
    tiling: a resumed cohort keeps its precision, so its rows keep one model version
    (measuring again could tip a close call the other way and re-embed every slide)."""
    mine = dataclasses.asdict(config)
    for run in reversed(runs):
        rec = run.get("precision_auto")
        if rec and all(run.get(k) == mine[k] for k in _SAME_ENCODER):
            return rec
    return None


def calibration_backend(config: EmbedConfig, precision: str, models: Any = None) -> Any:
    """The patch backend ``auto`` measures ``precision`` on: where the job's actors run the
    driver's ONNX export (fp32 / int8 on ONNX Runtime), that export, loaded without torch
    (``models``: the job's ``JobModels``, which finds a cached export without building the
    model; on a first run it builds and exports it, as the job then would anyway); else the
    backend the config resolves to (torch autocast for bf16)."""
    from care_scale.embed.patch_stage import create_patch_backend
    from care_scale.embed.pipeline import export_for_local_actors

    config = dataclasses.replace(config, precision=precision)
    local = export_for_local_actors(config, models) if models is not None else None
    if local is not None:
        config = dataclasses.replace(
            config, artifacts=local,
            patch_encoder=dataclasses.replace(config.patch_encoder, checkpoint=None))
    return create_patch_backend(config, device="cpu")


def resolve_precision(config: EmbedConfig, sources: list[SlideSource], *,
                      cache: Any = None, runs: list[dict[str, Any]] = (),
                      models: Any = None) -> tuple[EmbedConfig, Any]:
    """``config`` with a concrete precision, and the PrecisionChoice (None unless auto).
    ``runs``: the warehouse's earlier run configs (:func:`earlier_choice`); ``models``: the
    job's ``JobModels`` (:func:`calibration_backend`)."""
    from care_scale.inference.precision import PrecisionChoice, Trial, choose_precision

    if config.precision != "auto":
        return config, None
    rec = earlier_choice(config, list(runs))
    if rec is not None:
        kept = PrecisionChoice(precision=rec["precision"],
                               reason=f"{rec['precision']}, kept from an earlier run of this "
                                      f"warehouse ({rec['reason']})",
                               trials=[Trial(**t) for t in rec.get("trials", [])])
        return dataclasses.replace(config, precision=kept.precision), kept

    def fixed(reason: str) -> tuple[EmbedConfig, Any]:
        return (dataclasses.replace(config, precision="fp32"),
                PrecisionChoice(precision="fp32", reason=reason))

    if config.features:
        return fixed("fp32: feature files, no patch encoder runs")
    if config.concurrency.num_gpus_per_actor > 0:
        return fixed("fp32: the encoder actors run on GPUs, and auto calibrates CPU encoders "
                     "only; set precision: fp16 (torch) or use a TensorRT engine there")
    tiles = calibration_tiles(config, sources, cache=cache)
    if tiles is None:
        return fixed(f"fp32: none of the first {CALIBRATION_SLIDES} slides could be read to "
                     "calibrate on")
    choice = choose_precision(lambda p: calibration_backend(config, p, models), tiles)
    release_freed_memory()
    return dataclasses.replace(config, precision=choice.precision), choice


def release_freed_memory() -> None:
    """Hand the driver's freed heap back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Calibrating builds one model per precision and frees each, but glibc keeps the freed
    chunks: measured on ViT-B (2-core AMD EPYC, 2026-12-04) the driver stayed at 1,052 MiB
    resident after calibrating, 287 MiB after the trim, for the whole run beside the
    actors that then load their own copy."""
    import ctypes

    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # this process's own symbols
    except OSError:
        return
    if trim is not None:
        trim(0)
