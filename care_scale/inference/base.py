"""The interface every inference backend implements (one backend per module).

A patch backend turns uint8 tile batches into float32 features; a slide backend turns one
slide's patch features and grid positions into CARE outputs. Callers (the embedding job, the
benchmarks) only see this interface, the chosen ``kind`` and the ``model_version`` they record
next to every embedding.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from care_scale.exceptions import ModelInputError

BackendKind = Literal["auto", "tensorrt", "onnxruntime", "torch"]


@dataclass(frozen=True)
class PatchModelInfo:
    """Facts about the patch encoder behind a backend (from the registry or ONNX metadata)."""

    name: str
    model_version: str
    embed_dim: int
    input_size: int
    tile_size: int | None  # the fixed tile side an exported graph takes; None = any size
    mpp: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    trained: bool


class PatchBackend(ABC):
    """``backend(tiles uint8 (B, H, W, 3)) -> float32 (B, embed_dim)``."""

    kind: ClassVar[str]
    #: why this kind was chosen (set by ``create_patch_backend``)
    selection: str = "constructed directly"
    #: intra-op threads it runs with, as the runtime reports them (None: not a CPU pool)
    threads: int | None = None

    def __init__(self, info: PatchModelInfo):
        self.info = info

    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def model_version(self) -> str:
        return self.info.model_version

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def describe(self) -> dict[str, Any]:
        """What the embedding job records in its run and slides tables."""
        return {"backend": self.kind, "model": self.model_name,
                "model_version": self.model_version, "embed_dim": self.embed_dim}

    def validate(self, tiles: Any) -> np.ndarray:
        """Tiles as a C-contiguous uint8 ``(B, H, W, 3)`` array, else :class:`ModelInputError`."""
        if hasattr(tiles, "detach") and hasattr(tiles, "cpu"):  # a torch tensor
            tiles = tiles.detach().cpu().numpy()
        if not isinstance(tiles, np.ndarray):
            raise ModelInputError(f"{self.model_name}: tiles must be a uint8 array, got "
                                  f"{type(tiles).__name__}")
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ModelInputError(f"{self.model_name}: expected uint8 tiles (B, H, W, 3), got "
                                  f"{tiles.shape} {tiles.dtype}")
        if tiles.shape[0] == 0:
            raise ModelInputError(f"{self.model_name}: empty tile batch")
        return np.ascontiguousarray(tiles)

    def __call__(self, tiles: Any) -> np.ndarray:
        return self.run(self.validate(tiles))

    @abstractmethod
    def run(self, tiles: np.ndarray) -> np.ndarray:
        """Validated uint8 ``(B, H, W, 3)`` -> float32 ``(B, embed_dim)``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model_name!r}, version={self.model_version!r})"


class SlideBackend(ABC):
    """CARE on one slide, the same call as ``CARE.encode``:

    ``encode(features (N, D) | PatchFeatures, coords (N, 2) level-0, *, patch_step=None)``
    -> :class:`care_scale.patch_grid.SlideEncoding` (numpy).
    """

    kind: ClassVar[str]
    selection: str = "constructed directly"

    def __init__(self, *, name: str, model_version: str, in_dim: int, embed_dim: int):
        self.model_name = name
        self.model_version = model_version
        self.in_dim = int(in_dim)
        self.embed_dim = int(embed_dim)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.model_name,
                "model_version": self.model_version, "embed_dim": self.embed_dim}

    def encode(self, features: Any, coords: Any = None, *, patch_step: int | None = None):
        from care_scale.patch_grid import SlideEncoding, coords_to_grid

        # A PatchFeatures exists only once its module is imported; importing it here would
        # import torch (care_scale.models), which an ONNX backend never needs.
        files = sys.modules.get("care_scale.models.features")
        if files is not None and isinstance(features, files.PatchFeatures):
            coords = features.coords if coords is None else coords
            patch_step = patch_step or features.patch_size_level0
            features = features.features
        if coords is None:
            raise ModelInputError(f"{self.model_name}: coords are required with a plain "
                                  "feature array")
        feats = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
        if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != self.in_dim:
            raise ModelInputError(f"{self.model_name}: expected features (N>0, {self.in_dim}), "
                                  f"got {feats.shape}")
        if not np.isfinite(feats).all():
            raise ModelInputError(f"{self.model_name}: features contain NaN or inf")
        coords = np.asarray(coords)
        if coords.shape != (feats.shape[0], 2):
            raise ModelInputError(f"{self.model_name}: coords must be ({feats.shape[0]}, 2), "
                                  f"got {coords.shape}")
        grid, step = coords_to_grid(coords, patch_step)
        out = self.run_grid(feats, grid)
        r = int(out["num_regions"])
        return SlideEncoding(
            slide_embedding=out["slide_embedding"].astype(np.float32),
            region_embeddings=out["region_embeddings"][:r].astype(np.float32),
            num_regions=r,
            region_of_patch=out["region_of_patch"].astype(np.int64),
            coverage=out["coverage"][:r].astype(np.float32),
            semantic_weight=out["semantic_weight"][:r].astype(np.float32),
            fused_weight=out["fused_weight"][:r].astype(np.float32),
            roi_index=int(out["roi_index"]),
            roi_embedding=out["roi_embedding"].astype(np.float32),
            model_version=self.model_version,
            patch_step=int(step),
        )

    @abstractmethod
    def run_grid(self, features: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
        """features float32 (N, D), grid int64 (N, 2) -> the outputs named in
        ``care_scale.artifacts.SLIDE_OUTPUTS`` as numpy arrays."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model_name!r}, version={self.model_version!r})"
