"""PyTorch backend: the registry module itself, under ``torch.inference_mode``.

Options are the ones benchmarks/bench_export.py measures on this kind of CPU; the defaults are
the ones that won (or cost nothing) there, the others stay opt-in:

- ``channels_last``: the patch-embedding convolution in NHWC. Tiles arrive NHWC, so the
  permuted input already has channels-last strides; converting the weights too lets oneDNN
  skip a reorder. Off by default: measured within noise on the ViT (one conv per forward).
- ``precision="bf16"``: CPU autocast to bfloat16, useful only on CPUs with AVX-512 BF16 / AMX
  (``torch.backends.cpu.get_cpu_capability()``); changes numerics (~1e-2 relative), so
  features are not comparable with fp32 runs (the model version gets a ``+bf16`` suffix) and it
  is never chosen automatically.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from care_scale.artifacts import SLIDE_OUTPUTS
from care_scale.choices import Precision
from care_scale.exceptions import ConfigError, ExportError
from care_scale.inference.base import PatchBackend, PatchModelInfo, SlideBackend


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def patch_info(encoder: nn.Module, model_version: str, *, tile_size: int | None = None
               ) -> PatchModelInfo:
    spec = encoder.spec
    return PatchModelInfo(
        name=spec.name, model_version=model_version, embed_dim=int(spec.embed_dim),
        input_size=int(spec.input_size), tile_size=tile_size, mpp=float(spec.mpp),
        mean=tuple(spec.mean), std=tuple(spec.std),
        trained=bool(getattr(encoder, "trained", False)),
    )


class TorchPatchBackend(PatchBackend):
    """Runs the torch patch encoder; any tile size (it resizes inside, as trained)."""

    kind = "torch"

    def __init__(self, encoder: nn.Module, *, model_version: str | None = None,
                 device: str | torch.device | None = None, channels_last: bool = False,
                 precision: Precision = "fp32", threads: int | None = None):
        from care_scale.inference.kinds import KINDS
        from care_scale.models import model_version as _model_version

        self.device = resolve_device(device)
        self.precision = precision
        if threads is not None:  # torch's intra-op pool is the process's: set it here
            torch.set_num_threads(max(1, int(threads)))
        self.threads = torch.get_num_threads()
        self.channels_last = channels_last
        encoder = encoder.eval().to(self.device)
        if channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder
        offered = KINDS["torch"].precisions
        if precision not in offered:
            raise ConfigError(f"torch backend: precision must be one of {', '.join(offered)}, "
                              f"got {precision!r}")
        # Reduced precision changes the embeddings (~1e-2 relative), so it is part of the
        # recorded version: rows made with bf16 never pass for fp32 rows of the same weights.
        version = model_version or _model_version(encoder)
        if precision != "fp32":
            version = f"{version}+{precision}"
        super().__init__(patch_info(encoder, version))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision, "device": str(self.device),
                "threads": self.threads}

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def run_tensor(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tensor (B, H, W, 3) on any device -> float32 features on ``self.device``."""
        with torch.inference_mode(), self._autocast():
            return self.encoder(tiles.to(self.device, non_blocking=True)).float()

    def run(self, tiles: np.ndarray) -> np.ndarray:
        out = self.run_tensor(torch.from_numpy(tiles))
        return out.cpu().numpy().astype(np.float32, copy=False)


class SlideEncoderGraph(nn.Module):
    """CARE for one slide: ``(features (N, D), grid (N, 2))`` -> the ``SLIDE_OUTPUTS``.

    The torch backend runs this and the exporter traces it, so both give the same outputs.
    A batch of one with ``num_valid = N`` computed in the graph (a Python int would be traced
    as a constant and freeze N).
    """

    def __init__(self, care: nn.Module):
        super().__init__()
        if not hasattr(care, "config"):
            raise ExportError(f"{type(care).__name__}: not a care-scale slide encoder")
        if getattr(care, "remote_code", False):
            raise ExportError(f"{getattr(care, 'name', 'model')}: runs its snapshot's own "
                              "modeling code, which is not traced or exported (it runs on "
                              "the torch backend only)")
        self.care = care

    def forward(self, features: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        num_valid = torch.ones_like(grid[:, 0]).sum().reshape(1)
        out = self.care(features[None], num_valid, grid[None])
        return tuple(getattr(out, name)[0] for name in SLIDE_OUTPUTS)


class TorchSlideBackend(SlideBackend):
    """CARE in PyTorch (the reference the ONNX export is checked against)."""

    kind = "torch"

    def __init__(self, care: nn.Module, *, model_version: str | None = None,
                 device: str | torch.device | None = None):
        from care_scale.models import model_version as _model_version

        self.device = resolve_device(device)
        self.care = care.eval().to(self.device)
        # A remote-code model has its own encode (it is not the graph of our CARE).
        self.graph = None if getattr(care, "remote_code", False) else SlideEncoderGraph(care)
        super().__init__(name=getattr(care, "name", "care"),
                         model_version=model_version or _model_version(care),
                         in_dim=care.config.in_dim, embed_dim=care.config.hidden_dim)

    def encode(self, features: Any, coords: Any = None, *, patch_step: int | None = None):
        if self.graph is None:
            with torch.inference_mode():
                return self.care.encode(features, coords, patch_step=patch_step)
        return super().encode(features, coords, patch_step=patch_step)

    def run_grid(self, features: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self.graph(torch.from_numpy(features).to(self.device),
                              torch.from_numpy(grid).to(self.device))
        return {name: t.cpu().numpy() for name, t in zip(SLIDE_OUTPUTS, outs, strict=True)}
