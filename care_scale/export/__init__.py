"""Export the encoders: ONNX files with metadata, parity checks, TensorRT engines, artifacts.

    from care_scale.export import export_patch_encoder, export_slide_encoder
    export_patch_encoder("vit_base_patch16_224", out="s3://bucket/exports/vitb")

Modules: ``onnx_export`` (patch-encoder and CARE graphs + metadata), ``parity`` (ONNX Runtime vs PyTorch), ``tensorrt`` (engines), ``artifacts`` (directory layout,
manifest, fsspec I/O), ``pipeline`` (the export of one model end to end). Importing this package
loads no model and no heavy library until a function is called.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ExportResult",
    "Manifest",
    "ParityReport",
    "check_patch_parity",
    "check_slide_parity",
    "export_patch_encoder",
    "export_slide_encoder",
    "read_manifest",
]

_LAZY = {
    "ExportResult": "care_scale.export.pipeline",
    "export_patch_encoder": "care_scale.export.pipeline",
    "export_slide_encoder": "care_scale.export.pipeline",
    "Manifest": "care_scale.export.artifacts",
    "read_manifest": "care_scale.export.artifacts",
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
