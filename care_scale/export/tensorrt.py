"""TensorRT engines for the patch encoder: build from the ONNX file, load, run.

An engine is only valid on the GPU architecture (compute capability) and the TensorRT version
it was built with. Engine files are therefore keyed by both::

    tensorrt/<model_version>-sm86-trt10.3.0-fp16-b1_64_256.engine
    tensorrt/<model_version>-sm86-trt10.3.0-fp16-b1_64_256.cache     (timing cache)

and the manifest records the same facts; :func:`find_engine` only returns an engine whose key
matches the GPU and TensorRT of the current process, so a stale engine is never deserialised
on another GPU (TensorRT would reject it at best, crash at worst).

Building: FP16 by default (INT8 with a calibration set of real tiles as an option), one
optimisation profile with min/opt/max batch over the graph's dynamic batch axis, and a timing
cache (reused from a previous build on the same GPU when present) that cuts rebuild time.
Running: uint8 tiles go to the GPU as uint8 (the graph's first op is the Cast TensorRT needs),
device buffers are torch CUDA tensors, execution is ``execute_async_v3`` on torch's stream.

Without a CUDA device or the ``tensorrt`` package, :func:`require_tensorrt` raises
:class:`TensorRTUnavailableError` naming what is missing, before any work starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from care_scale.exceptions import ExportError, ModelInputError, TensorRTUnavailableError
from care_scale.export.artifacts import ENGINE_DIR, EngineRecord, sha256_file

log = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32", "int8"]


@dataclass(frozen=True)
class EngineOptions:
    """How to build an engine. Batches outside [min_batch, max_batch] are split/refused."""

    precision: Precision = "fp16"
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    workspace_gib: float = 4.0
    #: uint8 tiles (N, T, T, 3) for INT8 calibration; required when precision == "int8".
    calibration_tiles: Any = None
    calibration_batch: int = 32

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(f"TensorRT profile needs 1 <= min <= opt <= max batch, got "
                              f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.precision == "int8" and self.calibration_tiles is None:
            raise ExportError("INT8 engines need calibration_tiles (real tiles, uint8 "
                              "(N, T, T, 3)); or build with precision='fp16'")


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


def engine_key(model_version: str, target: GpuTarget, options: EngineOptions) -> str:
    return (f"{model_version}-{target.tag}-{options.precision}-"
            f"b{options.min_batch}_{options.opt_batch}_{options.max_batch}")


def find_engine(engines: list[EngineRecord], target: GpuTarget | None = None, *,
                precision: Precision | None = None) -> EngineRecord | None:
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


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _calibrator(trt, tiles: np.ndarray, batch: int, cache_path: Path):
    """INT8 entropy calibrator feeding real uint8 tiles from torch CUDA buffers."""
    import torch

    class _TileCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.tiles = np.ascontiguousarray(tiles)
            self.pos = 0
            self.buffer = torch.empty((batch, *self.tiles.shape[1:]), dtype=torch.uint8,
                                      device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):
            if self.pos + batch > len(self.tiles):
                return None
            chunk = torch.from_numpy(self.tiles[self.pos:self.pos + batch])
            self.buffer.copy_(chunk)
            self.pos += batch
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.exists() else None

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

    return _TileCalibrator()


def build_engine(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 model_version: str, options: EngineOptions = EngineOptions(),
                 input_name: str = "tiles") -> EngineRecord:
    """Build a TensorRT engine from an exported patch encoder into ``out_dir/tensorrt/``."""
    require_tensorrt()
    options.validate()
    import tensorrt as trt

    target = current_target()
    key = engine_key(model_version, target, options)
    engine_dir = Path(out_dir) / ENGINE_DIR
    engine_dir.mkdir(parents=True, exist_ok=True)
    engine_path = engine_dir / f"{key}.engine"
    cache_path = engine_dir / f"{key}.cache"

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                 int(options.workspace_gib * (1 << 30)))
    if options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers fall back to FP16, not FP32
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(trt, options.calibration_tiles,
                                             options.calibration_batch,
                                             engine_dir / f"{key}.calib")

    inp = network.get_input(0)
    if inp.name != input_name:
        raise ExportError(f"{onnx_path}: first input is {inp.name!r}, expected {input_name!r}")
    tile_shape = tuple(inp.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (options.min_batch, *tile_shape),
                      (options.opt_batch, *tile_shape), (options.max_batch, *tile_shape))
    config.add_optimization_profile(profile)
    if options.precision == "int8":
        config.set_calibration_profile(profile)

    # Timing cache: reuse what an earlier build on this GPU/TensorRT measured.
    previous = cache_path.read_bytes() if cache_path.exists() else b""
    timing_cache = config.create_timing_cache(previous)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    log.info("building TensorRT engine %s (this takes minutes)", key)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT engine build failed for {key} "
                          "(see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return EngineRecord(
        file=f"{ENGINE_DIR}/{engine_path.name}", key=key,
        compute_capability=target.compute_capability,
        tensorrt_version=target.tensorrt_version, precision=options.precision,
        min_batch=options.min_batch, opt_batch=options.opt_batch,
        max_batch=options.max_batch, gpu_name=target.gpu_name,
        timing_cache=f"{ENGINE_DIR}/{cache_path.name}", sha256=sha256_file(engine_path),
    )


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
        self._runtime = trt.Runtime(_logger())
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
