"""Inference backends for the patch encoder (and CARE): torch, ONNX Runtime, TensorRT.

    from care_scale.inference import create_patch_backend
    backend = create_patch_backend("auto", "vit_base_patch16_224", artifacts="s3://b/exports/vitb")
    feats = backend(tiles)                     # uint8 (B, H, W, 3) -> float32 (B, D)
    backend.kind, backend.model_version        # what the embedding job records

How ``kind="auto"`` chooses, in order:

1. ``tensorrt`` when a CUDA device, the tensorrt package, an ``artifacts`` directory and an
   engine in it built for this GPU architecture and TensorRT version all exist;
2. ``onnxruntime`` when the package is importable (CUDA EP on a GPU, CPU EP otherwise), using
   the ONNX file of ``artifacts``, or, without ``artifacts``, an export of the torch model made
   on the fly into the cache directory (keyed by model version and tile size, parity-checked
   once when written);
3. ``torch`` otherwise.

``backend.selection`` says why a kind was chosen. Asking explicitly for a kind that cannot run
raises (``TensorRTUnavailableError`` for TensorRT), it never falls back silently.

CARE (``create_slide_backend``) has torch and onnxruntime kinds; ``auto`` takes onnxruntime
when importable (same artifacts / on-the-fly cache rule), else torch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from care_scale.exceptions import ConfigError
from care_scale.inference.base import (
    KINDS,
    BackendKind,
    PatchBackend,
    PatchModelInfo,
    SlideBackend,
)

log = logging.getLogger(__name__)

#: The patch encoder whose features CARE was trained on (registry name).
DEFAULT_PATCH_ENCODER = "conch_v1_5"

__all__ = [
    "DEFAULT_PATCH_ENCODER",
    "KINDS",
    "BackendKind",
    "PatchBackend",
    "PatchModelInfo",
    "SlideBackend",
    "choose_patch_kind",
    "create_patch_backend",
    "create_slide_backend",
]


def _onnxruntime_importable() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def choose_patch_kind(kind: BackendKind, *, artifacts: str | None = None,
                      storage_options: dict[str, Any] | None = None,
                      device: Any = None) -> tuple[str, str]:
    """(kind, reason) that ``create_patch_backend`` will use for ``kind``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown backend {kind!r}; choose one of {list(KINDS)}")
    if kind != "auto":
        return kind, "requested"
    from care_scale.export.tensorrt import tensorrt_status

    wants_cpu = device is not None and str(device).startswith("cpu")
    # device="cpu": no need to probe CUDA (which imports torch: seconds per CPU worker).
    trt_ok, trt_reason = (False, f"device={device}") if wants_cpu else tensorrt_status()
    if trt_ok and artifacts is None:
        trt_reason = "no artifacts directory with engines given"
    elif trt_ok:
        from care_scale.export.artifacts import read_manifest
        from care_scale.export.tensorrt import find_engine

        manifest = read_manifest(artifacts, storage_options=storage_options)
        if find_engine(manifest.engines) is not None:
            return "tensorrt", "CUDA device and a matching TensorRT engine"
        trt_reason = "no engine in the artifacts for this GPU / TensorRT version"
    if _onnxruntime_importable():
        return "onnxruntime", f"TensorRT not used ({trt_reason})"
    return "torch", f"TensorRT not used ({trt_reason}); onnxruntime not installed"


#: reduced precisions and the one kind that offers each (``kind="auto"``).
_PRECISION_KIND = {"bf16": "torch", "fp16": "torch", "int8": "onnxruntime"}


def _build_encoder(model: Any, checkpoint: str | None,
                   storage_options: dict[str, Any] | None):
    from torch import nn

    if model is None:
        model = DEFAULT_PATCH_ENCODER

    if isinstance(model, nn.Module):
        if checkpoint is not None:
            raise ConfigError("pass either a built model or checkpoint=..., not both")
        return model
    from care_scale.models import create_patch_encoder

    return create_patch_encoder(model, checkpoint, storage_options=storage_options)


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

    ``model=None`` means the model of ``artifacts`` when given, else ``DEFAULT_PATCH_ENCODER``.

    ``artifacts``: export directory (local or fsspec URI) from ``care-scale export``; used by
    onnxruntime and tensorrt. ``checkpoint``: weights for torch (and for on-the-fly exports).
    ``tile_size``: tile side of on-the-fly ONNX exports (default: the encoder's input size;
    other sizes are exported on first use). ``threads``: ONNX Runtime intra-op threads
    (default: the cores this process may use). ``channels_last``: torch only.
    ``precision``: "fp32" (default, everywhere); "bf16"/"fp16" autocast (torch); "int8" the
    dynamically quantised graph (onnxruntime). Anything but fp32 changes the embeddings, so
    the model version gets a ``+<precision>`` suffix; with ``kind="auto"`` it picks the kind
    that offers it. TensorRT runs at the precision its engine was built with.
    """
    if kind == "auto" and precision in _PRECISION_KIND:
        chosen, reason = _PRECISION_KIND[precision], f"precision={precision}"
    else:
        chosen, reason = choose_patch_kind(kind, artifacts=artifacts,
                                           storage_options=storage_options, device=device)
    if chosen == "onnxruntime" and precision not in ("fp32", "int8"):
        raise ConfigError(f"onnxruntime backend: precision must be fp32 or int8, got "
                          f"{precision!r}")
    backend = _create(chosen, model, checkpoint=checkpoint, artifacts=artifacts,
                      storage_options=storage_options, device=device, tile_size=tile_size,
                      cache_dir=cache_dir, threads=threads, channels_last=channels_last,
                      precision=precision)
    backend.selection = reason
    log.info("patch backend %s for %s (%s)", backend.kind, backend.model_version, reason)
    return backend


def _create(kind: str, model: Any, *, checkpoint, artifacts, storage_options, device,
            tile_size, cache_dir, threads, channels_last, precision) -> PatchBackend:
    if kind == "torch":
        from care_scale.inference.torch_backend import TorchPatchBackend

        encoder = _build_encoder(model, checkpoint, storage_options)
        return TorchPatchBackend(encoder, device=device, channels_last=channels_last,
                                 precision=precision)

    if kind == "tensorrt":
        from care_scale.export.artifacts import read_manifest
        from care_scale.export.tensorrt import require_tensorrt
        from care_scale.inference.tensorrt_backend import TensorRTPatchBackend

        require_tensorrt()
        if artifacts is None:
            raise ConfigError("backend 'tensorrt' needs artifacts=<export dir with an engine> "
                              "(care-scale export patch-encoder ... --tensorrt)")
        manifest = read_manifest(artifacts, storage_options=storage_options)
        _check_manifest(manifest, model, artifacts, checkpoint=checkpoint,
                        storage_options=storage_options)
        return TensorRTPatchBackend(artifacts, manifest, storage_options=storage_options,
                                    device=device)

    # onnxruntime
    from care_scale.inference.onnx_backend import OnnxPatchBackend

    ort_device = None if device is None else str(device)
    variant = "int8" if precision == "int8" else None
    if artifacts is not None:
        from care_scale.export.artifacts import fetch_onnx

        path, manifest = fetch_onnx(artifacts, storage_options=storage_options,
                                    cache_dir=cache_dir, variant=variant)
        _check_manifest(manifest, model, artifacts, checkpoint=checkpoint,
                        storage_options=storage_options)
        backend = OnnxPatchBackend(path, device=ort_device, threads=threads)
        if tile_size is not None and int(tile_size) != backend.info.tile_size:
            from care_scale.storage import redact

            raise ConfigError(f"{redact(artifacts)}: exported for {backend.info.tile_size} px "
                              f"tiles, the job cuts {tile_size} px tiles; export again with "
                              f"--tile-size {tile_size}")
        return backend

    from care_scale.export.pipeline import cached_patch_export

    encoder = _build_encoder(model, checkpoint, storage_options)

    def exporter(tile: int):
        return cached_patch_export(encoder, tile_size=tile, cache_dir=cache_dir,
                                   variant=variant)

    return OnnxPatchBackend(exporter(int(tile_size or encoder.spec.input_size)),
                            device=ort_device, threads=threads, exporter=exporter)


def _check_manifest(manifest, model: Any, artifacts: str, *, checkpoint: str | None = None,
                    storage_options: dict[str, Any] | None = None) -> None:
    """The export in ``artifacts`` must be the model (and weights) the caller asked for:
    callers record the version of the weights they name, so a mismatch would mislabel rows."""
    from care_scale.storage import redact

    if manifest.kind != "patch_encoder":
        raise ConfigError(f"{redact(artifacts)}: holds a {manifest.kind}, not a patch encoder")
    if model is None:
        return
    if isinstance(model, str):
        if model != manifest.model:
            raise ConfigError(f"{redact(artifacts)}: holds {manifest.model!r}, but model "
                              f"{model!r} was asked for")
        if checkpoint is None:
            return
        model = _build_encoder(model, checkpoint, storage_options)
    from care_scale.models import model_version

    version = model_version(model)
    if version != manifest.model_version:
        raise ConfigError(f"{redact(artifacts)}: exported from {manifest.model_version}, but "
                          f"the given model is {version}; export it again")


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
    module. ``kind="tensorrt"`` is refused: CARE is exported for ONNX Runtime only.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown backend {kind!r}; choose one of {list(KINDS)}")
    if kind == "tensorrt":
        raise ConfigError("CARE has no TensorRT backend; use onnxruntime (CUDA EP on a GPU)")
    if kind == "auto":
        kind = "onnxruntime" if _onnxruntime_importable() else "torch"
        reason = "auto: onnxruntime importable" if kind == "onnxruntime" else \
            "auto: onnxruntime not installed"
    else:
        reason = "requested"

    def build():
        from torch import nn

        if isinstance(model, nn.Module):
            if checkpoint is not None:
                raise ConfigError("pass either a built model or checkpoint=..., not both")
            return model
        from care_scale.models import create_slide_encoder

        return create_slide_encoder(model or "care", checkpoint,
                                    storage_options=storage_options)

    backend: SlideBackend
    if kind == "torch":
        from care_scale.inference.torch_backend import TorchSlideBackend

        backend = TorchSlideBackend(build(), device=device)
    else:
        from care_scale.inference.onnx_backend import OnnxSlideBackend

        ort_device = None if device is None else str(device)
        if artifacts is not None:
            from care_scale.export.artifacts import fetch_onnx
            from care_scale.storage import redact

            path, manifest = fetch_onnx(artifacts, storage_options=storage_options,
                                        cache_dir=cache_dir)
            if manifest.kind != "slide_encoder":
                raise ConfigError(f"{redact(artifacts)}: holds a {manifest.kind}, not CARE")
            if isinstance(model, str) and model != manifest.model:
                raise ConfigError(f"{redact(artifacts)}: holds {manifest.model!r}, but model "
                                  f"{model!r} was asked for")
        else:
            from care_scale.export.pipeline import cached_slide_export

            path = cached_slide_export(build(), cache_dir=cache_dir)
        backend = OnnxSlideBackend(path, device=ort_device, threads=threads)
    backend.selection = reason
    log.info("slide backend %s for %s (%s)", backend.kind, backend.model_version, reason)
    return backend
