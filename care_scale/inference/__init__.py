"""Inference backends for the patch encoder (and CARE): torch, ONNX Runtime, TensorRT.

This package loads what exists: the registry's torch module, or an export artifact directory
(``care_scale.artifacts``). It never exports; the factory that also makes an ONNX export on
the fly when none is given is ``care_scale.export.create_patch_backend``:

    from care_scale.export import create_patch_backend
    backend = create_patch_backend("auto", "vit_base_patch16_224", artifacts="s3://b/exports/vitb")
    feats = backend(tiles)                     # uint8 (B, H, W, 3) -> float32 (B, D)
    backend.kind, backend.model_version        # what the embedding job records

    from care_scale.inference import load_patch_backend
    backend = load_patch_backend("onnxruntime", artifacts="s3://b/exports/vitb")

How ``kind="auto"`` chooses (:func:`choose_patch_kind`), in order:

1. the kind that offers a reduced ``precision`` (bf16/fp16: torch, int8: onnxruntime);
2. ``tensorrt`` when a CUDA device, the tensorrt package, an ``artifacts`` directory and an
   engine in it built for this GPU architecture and TensorRT version all exist;
3. ``onnxruntime`` when the package is importable (CUDA EP on a GPU, CPU EP otherwise), using
   the ONNX file of ``artifacts`` (made on the fly by the export factory when not given);
4. ``torch`` otherwise.

``backend.selection`` says why a kind was chosen. Asking explicitly for a kind that cannot run
raises (``TensorRTUnavailableError`` for TensorRT), it never falls back silently. What each
kind can do is one table, :data:`KINDS`.

CARE (``load_slide_backend``) has torch and onnxruntime kinds; ``auto`` takes onnxruntime
when importable, else torch.
"""

from __future__ import annotations

from care_scale.inference.base import BackendKind, PatchBackend, PatchModelInfo, SlideBackend
from care_scale.inference.kinds import (
    CHOICES,
    DEFAULT_PATCH_ENCODER,
    KINDS,
    Kind,
    choose_patch_kind,
    choose_slide_kind,
    load_patch_backend,
    load_slide_backend,
)

__all__ = [
    "CHOICES",
    "DEFAULT_PATCH_ENCODER",
    "KINDS",
    "BackendKind",
    "Kind",
    "PatchBackend",
    "PatchModelInfo",
    "SlideBackend",
    "choose_patch_kind",
    "choose_slide_kind",
    "load_patch_backend",
    "load_slide_backend",
]
