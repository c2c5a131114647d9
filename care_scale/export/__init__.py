"""Export the encoders: ONNX files with metadata, parity checks, TensorRT engines, artifacts.

    from care_scale.export import export_patch_encoder, export_slide_encoder
    export_patch_encoder("vit_base_patch16_224", out="s3://bucket/exports/vitb")
    backend = create_patch_backend("auto", "vit_base_patch16_224")   # exports on the fly

Modules: ``onnx_export`` (patch-encoder and CARE graphs + metadata), ``parity`` (ONNX Runtime
vs PyTorch), ``tensorrt`` (engine builds), ``pipeline`` (the export of one model end to end,
and ``cached_export``, the one export on the fly), ``backends`` (backends from a registry
name, exporting on the fly where needed). The artifact format itself (directory layout,
manifest, fsspec I/O) is the leaf module ``care_scale.artifacts``, which ``care_scale.inference``
reads without importing this package. Importing this package loads no model and no heavy
library until a function is called.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ExportResult",
    "Manifest",
    "ParityReport",
    "cached_export",
    "check_patch_parity",
    "check_slide_parity",
    "create_patch_backend",
    "create_slide_backend",
    "export_patch_encoder",
    "export_slide_encoder",
    "read_manifest",
]

_LAZY = {
    "ExportResult": "care_scale.export.pipeline",
    "export_patch_encoder": "care_scale.export.pipeline",
    "export_slide_encoder": "care_scale.export.pipeline",
    "cached_export": "care_scale.export.pipeline",
    "create_patch_backend": "care_scale.export.backends",
    "create_slide_backend": "care_scale.export.backends",
    "Manifest": "care_scale.artifacts",
    "read_manifest": "care_scale.artifacts",
    "ParityReport": "care_scale.export.parity",
    "check_patch_parity": "care_scale.export.parity",
    "check_slide_parity": "care_scale.export.parity",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import care_scale.export` must not import torch/onnx (CLI start-up, Ray workers).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'care_scale.export' has no attribute {name!r}")
