"""The backend kinds as a table of facts, and the loaders that read it.

``KINDS`` says, per kind, how to load a patch (and a slide) backend, whether it runs from an
export artifact directory, whether such a directory may be made on the fly, and which
precisions it offers. The choices elsewhere (``kind="auto"``, the precision check, the
embedding job's driver-side export) read these facts instead of naming kinds.

This package only loads: a kind that runs from artifacts is given a directory. Making one on
the fly when none exists is the exporter's job (``care_scale.export.create_patch_backend``),
so ``care_scale.inference`` never imports ``care_scale.export``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from care_scale.exceptions import ConfigError
from care_scale.inference.base import BackendKind, PatchBackend, SlideBackend

log = logging.getLogger(__name__)

#: The patch encoder whose features CARE was trained on (registry name).
DEFAULT_PATCH_ENCODER = "conch_v1_5"


@dataclass(frozen=True)
class Kind:
    """What one backend kind can do."""

    #: how messages name it
    label: str
    #: ``load(model, **options) -> PatchBackend`` (options: see :func:`load_patch_backend`)
    load: Callable[..., PatchBackend]
    #: the same for CARE, or None where the kind has no slide backend
    load_slide: Callable[..., SlideBackend] | None
    #: runs from an export artifact directory (else from the registry's torch module)
    needs_artifacts: bool
    #: that directory may be exported on the fly into the local cache (seconds); False where
    #: making one takes minutes on the target GPU (TensorRT engines)
    export_on_the_fly: bool
    #: precisions it offers; empty: fixed when the artifact was built (the option is ignored)
    precisions: tuple[str, ...]
    #: raises, naming what this process lacks to run the kind (checked before anything else)
    require: Callable[[], None] | None = None
    #: the ``care-scale export`` flags that make its artifacts
    export_flags: str = ""


def _onnxruntime_importable() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _built(model: Any, checkpoint: str | None) -> bool:
    """``model`` is a module already (then no checkpoint may be given for it)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        return False
    if checkpoint is not None:
        raise ConfigError("pass either a built model or checkpoint=..., not both")
    return True


def build_patch_encoder(model: Any, checkpoint: str | None,
                        storage_options: dict[str, Any] | None):
    """The torch patch encoder for ``model`` (registry name, None = default, or built)."""
    if _built(model, checkpoint):
        return model
    from care_scale.models import create_patch_encoder

    if model is None:
        model = DEFAULT_PATCH_ENCODER

    return create_patch_encoder(model, checkpoint, storage_options=storage_options)


def build_slide_encoder(model: Any, checkpoint: str | None,
                        storage_options: dict[str, Any] | None):
    """The torch CARE for ``model`` (registry name, None = "care", or built)."""
    if _built(model, checkpoint):
        return model
    from care_scale.models import create_slide_encoder

    return create_slide_encoder(model or "care", checkpoint, storage_options=storage_options)


def _load_torch(model, *, checkpoint, storage_options, device, channels_last, precision,
                threads=None, **_unused) -> PatchBackend:
    from care_scale.inference.torch_backend import TorchPatchBackend

    encoder = build_patch_encoder(model, checkpoint, storage_options)
    return TorchPatchBackend(encoder, device=device, channels_last=channels_last,
                             precision=precision, threads=threads)


def _load_onnx(model, *, artifacts, checkpoint, storage_options, device, tile_size, cache_dir,
               threads, precision, exporter=None, **_unused) -> PatchBackend:
    from care_scale.artifacts import fetch_onnx
    from care_scale.inference.onnx_backend import OnnxPatchBackend
    from care_scale.storage import redact

    path, manifest = fetch_onnx(artifacts, storage_options=storage_options,
                                cache_dir=cache_dir,
                                variant="int8" if precision == "int8" else None)
    _check_manifest(manifest, model, artifacts, checkpoint=checkpoint,
                    storage_options=storage_options)
    backend = OnnxPatchBackend(path, device=None if device is None else str(device),
                               threads=threads, exporter=exporter)
    if tile_size is not None and int(tile_size) != backend.info.tile_size:
        raise ConfigError(f"{redact(artifacts)}: exported for {backend.info.tile_size} px "
                          f"tiles, the job cuts {tile_size} px tiles; export again with "
                          f"--tile-size {tile_size}")
    return backend


def _require_tensorrt() -> None:
    from care_scale.inference.tensorrt_backend import require_tensorrt

    require_tensorrt()


def _load_tensorrt(model, *, artifacts, checkpoint, storage_options, device,
                   **_unused) -> PatchBackend:
    from care_scale.artifacts import read_manifest
    from care_scale.inference.tensorrt_backend import TensorRTPatchBackend

    manifest = read_manifest(artifacts, storage_options=storage_options)
    _check_manifest(manifest, model, artifacts, checkpoint=checkpoint,
                    storage_options=storage_options)
    return TensorRTPatchBackend(artifacts, manifest, storage_options=storage_options,
                                device=device)


def _load_torch_slide(model, *, checkpoint, storage_options, device, **_unused) -> SlideBackend:
    from care_scale.inference.torch_backend import TorchSlideBackend

    return TorchSlideBackend(build_slide_encoder(model, checkpoint, storage_options),
                             device=device)


def _load_onnx_slide(model, *, artifacts, storage_options, device, cache_dir, threads,
                     **_unused) -> SlideBackend:
    from care_scale.artifacts import fetch_onnx
    from care_scale.inference.onnx_backend import OnnxSlideBackend
    from care_scale.storage import redact

    path, manifest = fetch_onnx(artifacts, storage_options=storage_options, cache_dir=cache_dir)
    if manifest.kind != "slide_encoder":
        raise ConfigError(f"{redact(artifacts)}: holds a {manifest.kind}, not CARE")
    if isinstance(model, str) and model != manifest.model:
        raise ConfigError(f"{redact(artifacts)}: holds {manifest.model!r}, but model "
                          f"{model!r} was asked for")
    return OnnxSlideBackend(path, device=None if device is None else str(device),
                            threads=threads)


#: The kinds in the order ``kind="auto"`` prefers them.
KINDS: dict[str, Kind] = {
    "tensorrt": Kind(label="TensorRT", load=_load_tensorrt, load_slide=None,
                     needs_artifacts=True, export_on_the_fly=False, precisions=(),
                     require=_require_tensorrt, export_flags=" --tensorrt"),
    "onnxruntime": Kind(label="ONNX Runtime", load=_load_onnx, load_slide=_load_onnx_slide,
                        needs_artifacts=True, export_on_the_fly=True,
                        precisions=("fp32", "int8")),
    "torch": Kind(label="PyTorch", load=_load_torch, load_slide=_load_torch_slide,
                  needs_artifacts=False, export_on_the_fly=False,
                  precisions=("fp32", "bf16", "fp16")),
}

#: What a caller may ask for: a kind, or "auto".
CHOICES: tuple[str, ...] = ("auto", *KINDS)

#: Each reduced precision and the first kind in ``KINDS`` that offers it (what
#: ``kind="auto"`` takes for it). Built in reverse so that the first kind's entry wins.
PRECISION_KIND: dict[str, str] = {
    precision: name for name, facts in reversed(KINDS.items())
    for precision in facts.precisions if precision != "fp32"
}


def check_kind(kind: str) -> None:
    if kind not in CHOICES:
        raise ConfigError(f"unknown backend {kind!r}; choose one of {list(CHOICES)}")


def check_precision(kind: str, precision: str) -> None:
    """``precision`` must be one ``kind`` offers (any, where the artifact fixes it)."""
    offered = KINDS[kind].precisions
    if offered and precision not in offered:
        listed = (f"{', '.join(offered[:-1])} or {offered[-1]}" if len(offered) > 1
                  else offered[0])
        raise ConfigError(f"{kind} backend: precision must be {listed}, got {precision!r}")


def choose_patch_kind(kind: BackendKind, *, artifacts: str | None = None,
                      storage_options: dict[str, Any] | None = None,
                      device: Any = None, precision: str = "fp32") -> tuple[str, str]:
    """(kind, reason) that a patch backend of ``kind`` ("auto" or a kind) will use.

    ``auto``, in order: the kind that offers a reduced ``precision``; ``tensorrt`` when a CUDA
    device, the tensorrt package, ``artifacts`` and an engine in it built for this GPU
    architecture and TensorRT version all exist; ``onnxruntime`` when importable; ``torch``.
    """
    check_kind(kind)
    if kind != "auto":
        return kind, "requested"
    if precision in PRECISION_KIND:
        return PRECISION_KIND[precision], f"precision={precision}"
    from care_scale.inference.tensorrt_backend import find_engine, tensorrt_status

    wants_cpu = device is not None and str(device).startswith("cpu")
    # device="cpu": no need to probe CUDA (which imports torch: seconds per CPU worker).
    trt_ok, trt_reason = (False, f"device={device}") if wants_cpu else tensorrt_status()
    if trt_ok and artifacts is None:
        trt_reason = "no artifacts directory with engines given"
    elif trt_ok:
        from care_scale.artifacts import read_manifest

        manifest = read_manifest(artifacts, storage_options=storage_options)
        if find_engine(manifest.engines) is not None:
            return "tensorrt", "CUDA device and a matching TensorRT engine"
        trt_reason = "no engine in the artifacts for this GPU / TensorRT version"
    if _onnxruntime_importable():
        return "onnxruntime", f"TensorRT not used ({trt_reason})"
    return "torch", f"TensorRT not used ({trt_reason}); onnxruntime not installed"


def choose_slide_kind(kind: BackendKind) -> tuple[str, str]:
    """(kind, reason) of a CARE backend: ``auto`` takes onnxruntime when importable."""
    check_kind(kind)
    if kind == "auto":
        if _onnxruntime_importable():
            return "onnxruntime", "auto: onnxruntime importable"
        return "torch", "auto: onnxruntime not installed"
    _check_slide_kind(kind)
    return kind, "requested"


def _check_slide_kind(kind: str) -> None:
    if KINDS[kind].load_slide is None:
        raise ConfigError(f"CARE has no {KINDS[kind].label} backend; use onnxruntime "
                          "(CUDA EP on a GPU)")


def load_patch_backend(
    kind: str,
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
    exporter: Callable[[int], os.PathLike] | None = None,
    selection: str = "requested",
) -> PatchBackend:
    """A patch backend of the concrete ``kind``, loaded from what exists (never exported).

    ``artifacts``: export directory (local or fsspec URI) for the kinds that need one.
    ``exporter(tile) -> ONNX file`` (onnxruntime): a graph for another tile size on first use.
    Other options: see ``care_scale.export.create_patch_backend``.
    """
    facts = KINDS[kind]
    check_precision(kind, precision)
    if facts.require is not None:
        facts.require()  # what the process lacks comes before what the caller should pass
    if facts.needs_artifacts and artifacts is None:
        raise ConfigError(f"backend {kind!r} needs artifacts=<export dir> (care-scale export "
                          f"patch-encoder ...{facts.export_flags})")
    backend = facts.load(model, checkpoint=checkpoint, artifacts=artifacts,
                         storage_options=storage_options, device=device, tile_size=tile_size,
                         cache_dir=cache_dir, threads=threads, channels_last=channels_last,
                         precision=precision, exporter=exporter)
    backend.selection = selection
    log.info("patch backend %s for %s (%s)", backend.kind, backend.model_version, selection)
    return backend


def load_slide_backend(kind: str, model: Any = None, *, checkpoint: str | None = None,
                       artifacts: str | None = None,
                       storage_options: dict[str, Any] | None = None, device: Any = None,
                       cache_dir: str | os.PathLike | None = None, threads: int | None = None,
                       selection: str = "requested") -> SlideBackend:
    """A CARE backend of the concrete ``kind``, loaded from what exists (never exported)."""
    facts = KINDS[kind]
    _check_slide_kind(kind)
    if facts.needs_artifacts and artifacts is None:
        raise ConfigError(f"backend {kind!r} needs artifacts=<export dir> (care-scale export "
                          "slide-encoder ...)")
    backend = facts.load_slide(model, checkpoint=checkpoint, artifacts=artifacts,
                               storage_options=storage_options, device=device,
                               cache_dir=cache_dir, threads=threads)
    backend.selection = selection
    log.info("slide backend %s for %s (%s)", backend.kind, backend.model_version, selection)
    return backend


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
        model = build_patch_encoder(model, checkpoint, storage_options)
    from care_scale.models import model_version

    version = model_version(model)
    if version != manifest.model_version:
        raise ConfigError(f"{redact(artifacts)}: exported from {manifest.model_version}, but "
                          f"the given model is {version}; export it again")
