"""Synthetic whole-slide images with a known answer, for tests, demos and benchmarks.

A slide is white background with irregular tissue blobs; the tissue is partitioned into
``n_types`` tissue types, each with its own colour and texture statistics (mean colour,
pixel noise, density of dark "nuclei"), so that even an untrained encoder separates them.

Geometry comes from a few smooth random fields on a coarse grid (``type_map_downsample`` level-0
pixels per cell): tissue where the tissue field passes a threshold, type = argmax of the type
fields. Every output tile is rendered on its own from bilinear samples of those fields, so the
writer holds one tile at a time plus the coarse grid (at most ~512 x 512 cells): a 100,000 px
slide needs no more memory than a small one. The file is a pyramidal, tiled, JPEG-compressed
TIFF with the MPP in the resolution tags, which cuCIM, OpenSlide (generic-tiff) and tifffile
all read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Per type: mean RGB, pixel noise sigma, nuclei density (share of pixels), nuclei darkness.
# Hues and saturations differ enough for an untrained encoder; all are clearly saturated so
# saturation-based tissue detection sees every type.
TISSUE_TYPES: tuple[dict, ...] = (
    {"name": "tumour", "rgb": (150, 70, 165), "noise": 10.0, "nuclei": 0.30, "dark": 0.55},
    {"name": "stroma", "rgb": (232, 128, 168), "noise": 6.0, "nuclei": 0.04, "dark": 0.35},
    {"name": "lymphoid", "rgb": (80, 65, 175), "noise": 14.0, "nuclei": 0.45, "dark": 0.65},
    {"name": "necrosis", "rgb": (205, 150, 110), "noise": 18.0, "nuclei": 0.10, "dark": 0.30},
    {"name": "mucin", "rgb": (150, 185, 225), "noise": 5.0, "nuclei": 0.02, "dark": 0.25},
    {"name": "muscle", "rgb": (215, 90, 110), "noise": 8.0, "nuclei": 0.08, "dark": 0.40},
)
BACKGROUND_RGB = (243, 242, 244)
_MAP_MAX_SIDE = 512


@dataclass
class SyntheticSlide:
    """A written slide and its ground truth.

    ``type_map`` (h, w) int8 has one cell per ``type_map_downsample`` level-0 pixels:
    -1 background, 0..n_types-1 tissue type. ``composition`` (n_types,) is the share of each
    type among tissue cells.
    """

    path: Path
    type_map: np.ndarray
    type_map_downsample: int
    composition: np.ndarray
    width: int
    height: int
    mpp: float | None
    n_types: int

    @property
    def tissue_mask(self) -> np.ndarray:
        return self.type_map >= 0

    @property
    def dominant_type(self) -> int:
        return int(np.argmax(self.composition))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    import cv2

    noise = rng.standard_normal(shape).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return (field - field.mean()) / (field.std() + 1e-6)


@dataclass
class _Fields:
    tissue: np.ndarray  # (h, w) float32, tissue where > threshold
    threshold: float
    types: np.ndarray  # (K, h, w) float32, type = argmax
    ds: int


def _make_fields(width: int, height: int, n_types: int, seed: int, tissue_fraction: float,
                 type_bias: np.ndarray | None) -> _Fields:
    ds = max(4, math.ceil(max(width, height) / _MAP_MAX_SIDE))
    h, w = math.ceil(height / ds), math.ceil(width / ds)
    rng = np.random.default_rng(seed)
    side = max(h, w)
    tissue = _smooth_field(rng, (h, w), sigma=side / 14)
    # Fade out towards the border so blobs look like sections, not cut-offs.
    yy = np.minimum(np.arange(h), np.arange(h)[::-1])[:, None] / max(h * 0.12, 1)
    xx = np.minimum(np.arange(w), np.arange(w)[::-1])[None, :] / max(w * 0.12, 1)
    tissue = tissue + 2.5 * (np.minimum(np.minimum(yy, xx), 1.0) - 1.0)
    threshold = float(np.quantile(tissue, 1.0 - tissue_fraction))
    types = np.stack([_smooth_field(rng, (h, w), sigma=side / 22) for _ in range(n_types)])
    if type_bias is not None:
        types += np.asarray(type_bias, np.float32)[:, None, None]
    return _Fields(tissue.astype(np.float32), threshold, types.astype(np.float32), ds)


def _type_map(f: _Fields) -> np.ndarray:
    out = np.argmax(f.types, axis=0).astype(np.int8)
    out[f.tissue <= f.threshold] = -1
    return out


def _render_tile(f: _Fields, *, level_ds: float, x0: int, y0: int, tile: int,
                 rng: np.random.Generator) -> np.ndarray:
    """One level tile (tile x tile x 3) whose top-left level pixel is (x0, y0)."""
    import cv2

    # Level pixel centres -> coarse-map coordinates (cell centres sit at integers).
    xs = ((np.arange(x0, x0 + tile) + 0.5) * level_ds / f.ds - 0.5).astype(np.float32)
    ys = ((np.arange(y0, y0 + tile) + 0.5) * level_ds / f.ds - 0.5).astype(np.float32)
    mx, my = np.meshgrid(xs, ys)

    def sample(a: np.ndarray) -> np.ndarray:
        return cv2.remap(a, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    tissue = sample(f.tissue) > f.threshold
    out = np.empty((tile, tile, 3), np.float32)
    out[:] = BACKGROUND_RGB
    out += rng.normal(0, 2.0, out.shape)
    if tissue.any():
        kind = np.argmax(np.stack([sample(t) for t in f.types]), axis=0)
        # Nuclei: small dark spots; below ~1 um/px they blur into a darker mean colour.
        spots = cv2.GaussianBlur(rng.random((tile, tile), np.float32), (0, 0),
                                 sigmaX=max(0.6, 1.2 / level_ds))
        rank = (spots - spots.mean()) / (spots.std() + 1e-6)
        for k in np.unique(kind[tissue]):
            spec = TISSUE_TYPES[int(k) % len(TISSUE_TYPES)]
            sel = tissue & (kind == k)
            colour = np.asarray(spec["rgb"], np.float32)
            if level_ds < 3:
                cut = _normal_quantile(1.0 - spec["nuclei"])
                dark = np.where(rank[sel] > cut, spec["dark"], 0.0)[:, None]
            else:
                dark = np.full((int(sel.sum()), 1), spec["nuclei"] * spec["dark"], np.float32)
            pix = colour * (1.0 - dark) + rng.normal(0, spec["noise"], (int(sel.sum()), 3))
            out[sel] = pix
    return np.clip(out, 0, 255).astype(np.uint8)


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(min(max(p, 1e-6), 1 - 1e-6)))


def _level_shapes(width: int, height: int, tile: int, factor: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) per pyramid level, down to about one tile."""
    out = [(1, width, height)]
    ds = factor
    while min(width, height) // ds >= tile // 2 and max(width, height) // ds >= tile:
        out.append((ds, max(1, width // ds), max(1, height // ds)))
        ds *= factor
    return out


def write_synthetic_slide(path: str | os.PathLike, *, width: int, height: int,
                          mpp: float | None = 0.5, tile_size: int = 256, n_types: int = 3,
                          seed: int = 0, tissue_fraction: float = 0.4,
                          type_bias: np.ndarray | None = None, jpeg_quality: int = 85,
                          level_factor: int = 4) -> SyntheticSlide:
    """Write a pyramidal tiled JPEG TIFF tile by tile; return its ground truth.

    ``mpp=None`` writes no resolution (a slide without MPP, for error-path tests).
    ``type_bias`` (n_types,) shifts the type fields, i.e. the composition.
    """
    import tifffile

    if not 1 <= n_types <= len(TISSUE_TYPES):
        raise ValueError(f"n_types must be in 1..{len(TISSUE_TYPES)}, got {n_types}")
    if width < tile_size or height < tile_size or tile_size % 16:
        raise ValueError(f"width/height must be >= tile_size ({tile_size}, a multiple of 16)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = _make_fields(width, height, n_types, seed, tissue_fraction, type_bias)
    levels = _level_shapes(width, height, tile_size, level_factor)
    bigtiff = width * height * 3 * 1.4 > 2**31 - 2**26
    description = (f"care-scale synthetic slide|seed = {seed}|n_types = {n_types}"
                   + (f"|MPP = {mpp}" if mpp else ""))

    def tiles(level_ds: int, lw: int, lh: int) -> Iterator[np.ndarray]:
        for ty in range(math.ceil(lh / tile_size)):
            for tx in range(math.ceil(lw / tile_size)):
                rng = np.random.default_rng((seed, level_ds, tx, ty))
                yield _render_tile(fields, level_ds=level_ds, x0=tx * tile_size,
                                   y0=ty * tile_size, tile=tile_size, rng=rng)

    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for i, (ds, lw, lh) in enumerate(levels):
            extra = {}
            if mpp:
                res = 1e4 / (mpp * ds)  # pixels per centimetre
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                tiles(ds, lw, lh), shape=(lh, lw, 3), dtype=np.uint8,
                tile=(tile_size, tile_size), compression="jpeg",
                compressionargs={"level": jpeg_quality}, photometric="rgb",
                subfiletype=0 if i == 0 else 1, description=description if i == 0 else None,
                metadata=None, software="care-scale", **extra,
            )
    os.replace(tmp, path)
    type_map = _type_map(fields)
    tissue = type_map[type_map >= 0]
    counts = np.bincount(tissue.astype(np.int64), minlength=n_types).astype(np.float64)
    composition = counts / max(counts.sum(), 1.0)
    return SyntheticSlide(path=path, type_map=type_map, type_map_downsample=fields.ds,
                          composition=composition, width=width, height=height, mpp=mpp,
                          n_types=n_types)


def make_demo_cohort(out_dir: str | os.PathLike, *, n_slides: int = 6, width: int = 4096,
                     height: int = 3072, seed: int = 0, mpp: float = 0.5, n_types: int = 3,
                     tile_size: int = 256) -> list[SyntheticSlide]:
    """``n_slides`` synthetic slides ``slide_000.tif`` ... with varied compositions.

    Slide i is biased towards type ``i % n_types``, so the dominant type (a probe label) is
    balanced across the cohort.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        bias = np.zeros(n_types, np.float32)
        bias[i % n_types] = 0.8
        slides.append(write_synthetic_slide(
            out / f"slide_{i:03d}.tif", width=width, height=height, mpp=mpp,
            tile_size=tile_size, n_types=n_types, seed=seed * 1000 + i, type_bias=bias))
    return slides
