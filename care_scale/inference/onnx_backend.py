"""ONNX Runtime backend: CUDA execution provider on a GPU, the CPU provider otherwise.

Session settings (measured in benchmarks/bench_export.py on the 2-core machines we have):
full graph optimisation (attention / LayerNorm / GELU fusions); ``intra_op`` threads = the
cores this process may use (capped by ``threads``), ``inter_op`` = 1 and sequential execution,
because a ViT is one chain of large ops and a second pool only competes for the same cores;
spinning off, because the decode threads of the embedding job share those cores and a
spinning pool steals their time between batches.

Where the graph comes from: always an export artifact directory. When none is given,
``care_scale.export.create_patch_backend`` exports the torch model on the fly into a cache
directory keyed by model version and tile size (``$CARE_SCALE_CACHE`` or
``~/.cache/care-scale``), checked for parity once when written and reused afterwards; this
package only loads what is there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from care_scale.artifacts import META_PREFIX
from care_scale.exceptions import ExportError, ModelInputError
from care_scale.inference.base import PatchBackend, PatchModelInfo, SlideBackend
from care_scale.inference.precision import usable_cores

log = logging.getLogger(__name__)


def session_options(*, threads: int | None = None, spinning: bool = False,
                    optimization: str = "all"):
    """``onnxruntime.SessionOptions`` tuned for small CPU counts (see module docstring)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = min(threads or usable_cores(), usable_cores())
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    return opts


def providers_for(device: str | None) -> list[str]:
    """CUDA EP first when asked for (or auto and present), the CPU EP always as fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = device is None or str(device).startswith("cuda")
    if want_cuda and "CUDAExecutionProvider" in available and _cuda_device_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_device_present() -> bool:
    # Only reached when onnxruntime has its CUDA EP, so CPU-only workers never import torch.
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def create_session(path: str | os.PathLike, *, device: str | None = None,
                   threads: int | None = None, spinning: bool = False,
                   optimization: str = "all"):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads=threads, spinning=spinning,
                                                    optimization=optimization),
            providers=providers_for(device),
        )
    except (RuntimeError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc


def session_metadata(session) -> dict[str, str]:
    """The ``care_scale.*`` metadata of a loaded graph (prefix stripped), read through ONNX
    Runtime so that encoder workers need neither torch nor onnx (seconds of start-up each)."""
    props = session.get_modelmeta().custom_metadata_map
    return {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}


def info_from_metadata(meta: dict[str, str], *, source: str) -> PatchModelInfo:
    """Patch-model facts from an exported file's ``care_scale.*`` metadata."""
    if meta.get("kind") != "patch_encoder":
        raise ExportError(f"{source}: not a care-scale patch-encoder export "
                          f"(kind={meta.get('kind')!r})")
    try:
        return PatchModelInfo(
            name=meta["model"], model_version=meta["model_version"],
            embed_dim=int(meta["embed_dim"]), input_size=int(meta["input_size"]),
            tile_size=int(meta["tile_size"]), mpp=float(meta["mpp"]),
            mean=tuple(json.loads(meta["mean"])), std=tuple(json.loads(meta["std"])),
            trained=bool(json.loads(meta.get("trained", "false"))),
        )
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{source}: incomplete care-scale metadata ({exc})") from exc


def _check_int8_weights(meta: dict[str, str], *, source: str,
                        flags: frozenset[str] | None = None) -> None:
    """Refuse an int8 graph with 8-bit weights on a CPU without VNNI / AMX-INT8, whose
    16-bit intermediate sums would saturate: wrong features, not a slower run."""
    from care_scale.inference.precision import int8_weight_bits

    if meta.get("int8_weight_bits") == "8" and int8_weight_bits(flags) != 8:
        raise ExportError(f"{source}: int8 graph with 8-bit weights, but this CPU has no "
                          "VNNI / AMX-INT8 (its int8 sums would saturate); export with "
                          "--int8-weights 7 or run --precision fp32")


class OnnxPatchBackend(PatchBackend):
    """Runs an exported patch encoder. The graph takes one tile size; ``exporter`` (when given)
    makes a graph for another tile size on first use, else such tiles are an input error."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, device: str | None = None,
                 threads: int | None = None, spinning: bool = False,
                 exporter: Callable[[int], Path] | None = None):
        self.path = Path(path)
        self._session_kwargs = {"device": device, "threads": threads, "spinning": spinning}
        session = create_session(self.path, **self._session_kwargs)
        meta = session_metadata(session)
        info = info_from_metadata(meta, source=str(self.path))
        _check_int8_weights(meta, source=str(self.path))
        super().__init__(info)
        self._exporter = exporter
        self._sessions: dict[int, Any] = {info.tile_size: session}
        self.providers = session.get_providers()
        self.threads = int(session.get_session_options().intra_op_num_threads)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers), "onnx": str(self.path),
                "threads": self.threads}

    def _session(self, tile: int):
        if tile not in self._sessions:
            if self._exporter is None:
                raise ModelInputError(
                    f"{self.model_name}: this ONNX export takes {self.info.tile_size} px tiles, "
                    f"got {tile} px; export again with --tile-size {tile} or tile at "
                    f"{self.info.tile_size} px"
                )
            log.info("%s: exporting a graph for %d px tiles", self.model_name, tile)
            self._sessions[tile] = create_session(self._exporter(tile), **self._session_kwargs)
        return self._sessions[tile]

    def run(self, tiles: np.ndarray) -> np.ndarray:
        h, w = tiles.shape[1:3]
        if h != w:
            raise ModelInputError(f"{self.model_name}: tiles must be square, got {h}x{w}")
        (out,) = self._session(int(h)).run(None, {"tiles": tiles})
        return out


class OnnxSlideBackend(SlideBackend):
    """CARE from its ONNX export (dynamic number of patches), one slide per call."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, device: str | None = None,
                 threads: int | None = None, spinning: bool = False):
        self.path = Path(path)
        self.session = create_session(self.path, device=device, threads=threads,
                                      spinning=spinning)
        meta = session_metadata(self.session)
        if meta.get("kind") != "slide_encoder":
            raise ExportError(f"{self.path}: not a care-scale slide-encoder export "
                              f"(kind={meta.get('kind')!r})")
        self.metadata = meta
        self.providers = self.session.get_providers()
        self._outputs = [o.name for o in self.session.get_outputs()]
        super().__init__(name=meta["model"], model_version=meta["model_version"],
                         in_dim=int(meta["in_dim"]), embed_dim=int(meta["embed_dim"]))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers), "onnx": str(self.path)}

    def run_grid(self, features: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {"features": features, "grid": grid})
        return dict(zip(self._outputs, outs, strict=True))
