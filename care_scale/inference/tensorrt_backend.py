"""TensorRT backend: a prebuilt engine from an export artifact directory (GPU only).

Also what both sides need to know about this process's GPU: :func:`tensorrt_status`, the
:class:`GpuTarget` an engine is bound to, :func:`find_engine` (which engine of a manifest
matches) and :class:`TensorRTRuntime`, which runs one. The exporter builds engines with these.

Engines are built by ``care-scale export patch-encoder ... --tensorrt`` on the kind of GPU that
runs them; this backend picks the engine whose compute capability and TensorRT version match
the current process and never builds one implicitly (building is :mod:`care_scale.export.tensorrt`),
because a build takes minutes and would stall every worker of a job at start-up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from care_scale.artifacts import EngineRecord, Manifest, fetch_file
from care_scale.exceptions import ExportError, ModelInputError, TensorRTUnavailableError
from care_scale.inference.base import PatchBackend, PatchModelInfo
from care_scale.storage import redact

log = logging.getLogger(__name__)


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): a CUDA device and an importable ``tensorrt`` package."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, ("no CUDA device is visible to this process "
                       "(torch.cuda.is_available() is False); TensorRT engines need an NVIDIA GPU")
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, (f"the tensorrt package is not installed ({exc}); "
                       "pip install 'care-scale[gpu]' on the GPU machine")
    return True, "ok"


def require_tensorrt() -> None:
    ok, reason = tensorrt_status()
    if not ok:
        raise TensorRTUnavailableError(f"TensorRT requested but unavailable: {reason}")


@dataclass(frozen=True)
class GpuTarget:
    """What an engine is bound to."""

    compute_capability: str  # "8.6"
    tensorrt_version: str
    gpu_name: str

    @property
    def tag(self) -> str:
        return f"sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt_version}"


def current_target(device: int | None = None) -> GpuTarget:
    require_tensorrt()
    import tensorrt as trt
    import torch

    index = torch.cuda.current_device() if device is None else int(device)
    major, minor = torch.cuda.get_device_capability(index)
    return GpuTarget(f"{major}.{minor}", trt.__version__, torch.cuda.get_device_name(index))


def find_engine(engines: list[EngineRecord], target: GpuTarget | None = None, *,
                precision: str | None = None) -> EngineRecord | None:
    """The engine built for this GPU architecture and TensorRT version, if any."""
    if not engines:
        return None
    if target is None:
        ok, _ = tensorrt_status()
        if not ok:
            return None
        target = current_target()
    for rec in engines:
        if (rec.compute_capability == target.compute_capability
                and rec.tensorrt_version == target.tensorrt_version
                and (precision is None or rec.precision == precision)):
            return rec
    log.info("no TensorRT engine for %s among %s", target.tag, [e.key for e in engines])
    return None


def trt_logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


class TensorRTRuntime:
    """Runs a patch-encoder engine: uint8 ``(B, T, T, 3)`` numpy/torch -> float32 ``(B, D)``.

    Batches larger than the profile's max are split; the engine file must match this GPU
    (checked against ``record`` before deserialising).
    """

    def __init__(self, engine_path: str | os.PathLike, record: EngineRecord, *,
                 device: int | None = None):
        require_tensorrt()
        import tensorrt as trt
        import torch

        target = current_target(device)
        if (record.compute_capability, record.tensorrt_version) != (
                target.compute_capability, target.tensorrt_version):
            raise TensorRTUnavailableError(
                f"{engine_path}: engine built for sm {record.compute_capability} / TensorRT "
                f"{record.tensorrt_version}, this is sm {target.compute_capability} / TensorRT "
                f"{target.tensorrt_version} ({target.gpu_name}); rebuild it with "
                "`care-scale export patch-encoder ... --tensorrt` on this machine"
            )
        self.record = record
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None
                                   else int(device))
        self._runtime = trt.Runtime(trt_logger())
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"{engine_path}: TensorRT could not deserialise the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names
                               if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names
                                if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        in_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.tile_shape = in_shape[1:]
        self.embed_dim = int(self.engine.get_tensor_shape(self.output_name)[-1])

    def run_tensor(self, tiles) -> Any:
        """uint8 torch tensor (any device) -> float32 CUDA tensor (B, D)."""
        import torch

        if tuple(tiles.shape[1:]) != self.tile_shape:
            raise ModelInputError(f"engine {self.record.key} takes tiles "
                                  f"{self.tile_shape}, got {tuple(tiles.shape[1:])}")
        outs = []
        stream = torch.cuda.current_stream(self.device)
        for start in range(0, tiles.shape[0], self.record.max_batch):
            chunk = tiles[start:start + self.record.max_batch]
            chunk = chunk.to(self.device, non_blocking=True).contiguous()
            out = torch.empty((chunk.shape[0], self.embed_dim), dtype=torch.float32,
                              device=self.device)
            self.context.set_input_shape(self.input_name, tuple(chunk.shape))
            self.context.set_tensor_address(self.input_name, int(chunk.data_ptr()))
            self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"engine {self.record.key}: execution failed")
            outs.append(out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        out = self.run_tensor(torch.from_numpy(np.ascontiguousarray(tiles)).pin_memory())
        return out.cpu().numpy()


def manifest_info(manifest: Manifest) -> PatchModelInfo:
    spec = manifest.spec
    return PatchModelInfo(
        name=manifest.model, model_version=manifest.model_version,
        embed_dim=int(spec["embed_dim"]), input_size=int(spec["input_size"]),
        tile_size=int(spec.get("tile_size") or spec["input_size"]), mpp=float(spec["mpp"]),
        mean=tuple(spec["mean"]), std=tuple(spec["std"]), trained=manifest.trained,
    )


class TensorRTPatchBackend(PatchBackend):
    kind = "tensorrt"

    def __init__(self, artifacts: str, manifest: Manifest, *,
                 storage_options: dict[str, Any] | None = None, device: Any = None):
        target = current_target()  # raises TensorRTUnavailableError without GPU / TensorRT
        record = find_engine(manifest.engines, target)
        if record is None:
            built = ", ".join(e.key for e in manifest.engines) or "none"
            raise TensorRTUnavailableError(
                f"{redact(artifacts)}: no TensorRT engine for {target.tag} ({target.gpu_name}); "
                f"engines present: {built}. Build one on this GPU with "
                "`care-scale export patch-encoder ... --tensorrt`"
            )
        path = fetch_file(artifacts, record.file, sha256=record.sha256,
                          storage_options=storage_options)
        index = None
        if device is not None and str(device).startswith("cuda:"):
            index = int(str(device).split(":", 1)[1])
        self.runtime = TensorRTRuntime(path, record, device=index)
        self.record = record
        super().__init__(manifest_info(manifest))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine": self.record.key,
                "precision": self.record.precision}

    def run(self, tiles: np.ndarray) -> np.ndarray:
        return self.runtime(tiles)
