"""Backends from a registry name, exporting on the fly where the chosen kind needs artifacts.

    from care_scale.export import create_patch_backend
    backend = create_patch_backend("auto", "vit_base_patch16_224", artifacts="s3://b/exports/vitb")
    backend = create_patch_backend("onnxruntime", "vit_micro_patch16_64")   # cached export

``care_scale.inference`` loads only what exists; this module adds the one step it must not
take: where the chosen kind runs from an artifact directory that may be made on the fly
(``KINDS[kind].export_on_the_fly``) and none was given, it exports the torch model into the
local cache (:func:`care_scale.export.pipeline.cached_export`: keyed by model version and tile
size, parity-checked once when written) and loads that. Importing it loads no heavy library.
"""

from __future__ import annotations

import os
from typing import Any

from care_scale.inference import (
    KINDS,
    BackendKind,
    PatchBackend,
    SlideBackend,
    choose_patch_kind,
    choose_slide_kind,
    load_patch_backend,
    load_slide_backend,
)
from care_scale.inference.kinds import build_patch_encoder, build_slide_encoder, check_precision


def create_patch_backend(
    kind: BackendKind = "auto",
    model: Any = None,
    *,
    checkpoint: str | None = None,
    artifacts: str | None = None,
    storage_options: dict[str, Any] | None = None,
    device: Any = None,
    tile_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    channels_last: bool = False,
    precision: str = "fp32",
) -> PatchBackend:
    """A patch backend of ``kind`` for registry model ``model`` (name, or a built module).

    ``model=None`` means the model of ``artifacts`` when given, else the default encoder.

    ``artifacts``: export directory (local or fsspec URI) from ``care-scale export``; used by
    onnxruntime and tensorrt; without it onnxruntime runs an export made on the fly.
    ``checkpoint``: weights for torch (and for on-the-fly exports). ``tile_size``: tile side
    of on-the-fly ONNX exports (default: the encoder's input size; other sizes are exported on
    first use). ``cache_dir``: where exports and staged remote files go. ``threads``: ONNX
    Runtime intra-op threads (default: the cores this process may use). ``channels_last``:
    torch only. ``precision``: "fp32" (default, everywhere); "bf16"/"fp16" autocast (torch);
    "int8" the dynamically quantised graph (onnxruntime). Anything but fp32 changes the
    embeddings, so the model version gets a ``+<precision>`` suffix; with ``kind="auto"`` it
    picks the kind that offers it. TensorRT runs at the precision its engine was built with.
    """
    chosen, reason = choose_patch_kind(kind, artifacts=artifacts,
                                       storage_options=storage_options, device=device,
                                       precision=precision)
    exporter = None
    if artifacts is None and KINDS[chosen].export_on_the_fly:
        from care_scale.artifacts import fetch_onnx
        from care_scale.export.pipeline import cached_export

        check_precision(chosen, precision)  # before seconds of export work
        variant = "int8" if precision == "int8" else None
        encoder = build_patch_encoder(model, checkpoint, storage_options)

        def export_dir(tile: int) -> str:
            return str(cached_export(encoder, tile_size=tile, variant=variant,
                                     cache_dir=cache_dir))

        def exporter(tile: int):  # other tile sizes, exported on first use
            return fetch_onnx(export_dir(tile), variant=variant)[0]

        artifacts = export_dir(int(tile_size or encoder.spec.input_size))
        model, checkpoint = None, None  # the export is of exactly this encoder
    return load_patch_backend(chosen, model, checkpoint=checkpoint, artifacts=artifacts,
                              storage_options=storage_options, device=device,
                              tile_size=tile_size, cache_dir=cache_dir, threads=threads,
                              channels_last=channels_last, precision=precision,
                              exporter=exporter, selection=reason)


def create_slide_backend(
    kind: BackendKind = "auto",
    model: Any = None,
    *,
    checkpoint: str | None = None,
    artifacts: str | None = None,
    storage_options: dict[str, Any] | None = None,
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> SlideBackend:
    """A CARE backend: ``.encode(features, coords, *, patch_step=None) -> SlideEncoding``.

    ``model``: registry name (default ``"care"``, or the model of ``artifacts``) or a built
    module. ``kind="tensorrt"`` is refused: CARE is exported for ONNX Runtime only. Without
    ``artifacts``, onnxruntime runs an export made on the fly into the cache.
    """
    chosen, reason = choose_slide_kind(kind)
    if artifacts is None and KINDS[chosen].export_on_the_fly:
        from care_scale.export.pipeline import cached_export

        care = build_slide_encoder(model, checkpoint, storage_options)
        if getattr(care, "remote_code", False) and kind == "auto":
            chosen, reason = "torch", "a remote-code model runs on torch only"
            model, checkpoint = care, None
        else:
            artifacts = str(cached_export(care, cache_dir=cache_dir))
            model, checkpoint = None, None
    return load_slide_backend(chosen, model, checkpoint=checkpoint, artifacts=artifacts,
                              storage_options=storage_options, device=device,
                              cache_dir=cache_dir, threads=threads, selection=reason)
