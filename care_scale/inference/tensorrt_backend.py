"""TensorRT backend: a prebuilt engine from an export artifact directory (GPU only).

Engines are built by ``care-scale export patch-encoder ... --tensorrt`` on the kind of GPU that
runs them; this backend picks the engine whose compute capability and TensorRT version match
the current process (see :mod:`care_scale.export.tensorrt`) and never builds one implicitly,
because a build takes minutes and would stall every worker of a job at start-up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from care_scale.exceptions import TensorRTUnavailableError
from care_scale.export.artifacts import Manifest, fetch_file
from care_scale.inference.base import PatchBackend, PatchModelInfo
from care_scale.storage import redact


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
        from care_scale.export.tensorrt import TensorRTRuntime, current_target, find_engine

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
