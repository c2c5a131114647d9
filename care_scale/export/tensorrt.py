"""TensorRT engines for the patch encoder: built from the ONNX file.

An engine is only valid on the GPU architecture (compute capability) and the TensorRT version
it was built with. Engine files are therefore keyed by both::

    tensorrt/<model_version>-sm86-trt10.3.0-fp16-b1_64_256.engine
    tensorrt/<model_version>-sm86-trt10.3.0-fp16-b1_64_256.cache     (timing cache)

and the manifest records the same facts; ``find_engine`` (in
:mod:`care_scale.inference.tensorrt_backend`, with the runtime that loads and runs engines)
only returns an engine whose key
matches the GPU and TensorRT of the current process, so a stale engine is never deserialised
on another GPU (TensorRT would reject it at best, crash at worst).

Building: FP16 by default (INT8 with a calibration set of real tiles as an option), one
optimisation profile with min/opt/max batch over the graph's dynamic batch axis, and a timing
cache (reused from a previous build on the same GPU when present) that cuts rebuild time.
Running (the inference side): uint8 tiles go to the GPU as uint8 (the graph's first op is the
Cast TensorRT needs), device buffers are torch CUDA tensors, execution is
``execute_async_v3`` on torch's stream.

Without a CUDA device or the ``tensorrt`` package, ``require_tensorrt`` raises
:class:`TensorRTUnavailableError` naming what is missing, before any work starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from care_scale.artifacts import ENGINE_DIR, EngineRecord, sha256_file
from care_scale.choices import TensorRTPrecision
from care_scale.exceptions import ExportError
from care_scale.inference.tensorrt_backend import (
    GpuTarget,
    current_target,
    require_tensorrt,
    trt_logger,
)

log = logging.getLogger(__name__)

Precision = TensorRTPrecision


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


def engine_key(model_version: str, target: GpuTarget, options: EngineOptions) -> str:
    return (f"{model_version}-{target.tag}-{options.precision}-"
            f"b{options.min_batch}_{options.opt_batch}_{options.max_batch}")


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

    logger = trt_logger()
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
