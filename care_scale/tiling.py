"""Tile grids at a target MPP, and batched tile decoding.

Two tiling modes (``TilingMode``; one entry each in ``TILING_MODES``):

- ``native``: a patch of ``patch_size`` pixels at ``target_mpp`` covers ``patch_size *
  target_mpp / mpp`` level-0 pixels (the slide's own MPP). It is read from the
  lowest-resolution pyramid level that is still at least as sharp as the target (no upsampling
  of a blurrier level), then resized to ``patch_size`` when that level does not match exactly.
  Tiles lie fully inside the slide and are kept when the thumbnail tissue mask
  (:mod:`care_scale.tissue`) covers ``min_tissue_fraction`` of them (default 0.5).
- ``trident``: TRIDENT's own grid, tissue mask and keep rule (:mod:`care_scale.trident`), so
  coordinates equal those of a user's TRIDENT run: magnification from the MPP bucket, step
  ``patch_size * level0_mag / target_mag``, grid from (0, 0) past the slide's edge, TRIDENT's
  Otsu segmenter, a tile kept when it touches tissue (``min_tissue_fraction`` default 0).

Coordinates are level-0 top-left pixels in row-major order (y, then x), so the same slide and
parameters always give the same grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from care_scale.exceptions import ConfigError, MissingMPPError
from care_scale.tissue import TissueMask, TissueParams, detect_tissue

# Objective power -> MPP when a slide has no MPP: 10x ~ 1.0, 20x ~ 0.5, 40x ~ 0.25 um/px.
MPP_AT_1X = 10.0


@dataclass
class TileGrid:
    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y), row-major
    tissue_fraction: np.ndarray  # (N,) float32
    level: int  # pyramid level read
    read_size: int  # pixels read at ``level`` per tile (square)
    patch_size: int  # pixels per tile after resizing (at target_mpp)
    patch_size_level0: int  # level-0 pixels covered by one tile
    step_level0: int  # level-0 pixels between neighbouring tiles
    mpp: float  # slide MPP used (trident: as TRIDENT reads it, metadata rounded to 4 places)
    target_mpp: float
    mpp_source: str = "metadata"  # metadata | objective_power | override
    tissue: TissueMask | None = None
    mode: str = "native"  # the TilingMode that made it
    #: Level-0 magnification the grid's arithmetic used (trident: TRIDENT's MPP bucket).
    magnification: int | None = None

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class TileBatch:
    coords: np.ndarray  # (B, 2) int64
    tiles: np.ndarray  # (B, patch_size, patch_size, 3) uint8
    tissue_fraction: np.ndarray  # (B,) float32


def slide_mpp(slide, mpp_override: float | None = None) -> tuple[float, str]:
    """The slide's MPP and where it came from; MissingMPPError when nothing says."""
    mpp_override = mpp_override or getattr(slide, "mpp_override", None)
    if mpp_override:
        return float(mpp_override), "override"
    if slide.mpp_x:
        return float(slide.mpp_x), "metadata"
    if slide.objective_power:
        return MPP_AT_1X / float(slide.objective_power), "objective_power"
    raise MissingMPPError(
        slide.uri, "no microns-per-pixel and no objective power in the metadata; "
        "pass an MPP override (--mpp-override / mpp_override=)")


TilingMode = Literal["native", "trident"]


@dataclass(frozen=True)
class TilingModeSpec:
    """One tiling mode: its default keep threshold and the function that builds its grid."""

    name: str
    min_tissue_fraction: float
    build: Callable[..., TileGrid]
    #: Pixel value of what a tile reads past the slide's edge.
    edge_fill: int
    #: (N, s, s, 3) uint8 tiles -> (N, size, size, 3), when the level read is not the target.
    resize: Callable[[np.ndarray, int], np.ndarray]
    description: str


def tile_grid(slide, *, target_mpp: float = 0.5, patch_size: int = 224,
              stride: int | None = None, min_tissue_fraction: float | None = None,
              tissue: TissueParams | None = None, mpp_override: float | None = None,
              mode: TilingMode = "native") -> TileGrid:
    """Tissue tiles of ``slide`` at ``target_mpp`` (``stride`` in target pixels, default
    ``patch_size``), by tiling ``mode``; ``min_tissue_fraction`` None: the mode's default."""
    if target_mpp <= 0 or patch_size <= 0:
        raise ConfigError(f"target_mpp and patch_size must be > 0, got {target_mpp}, {patch_size}")
    spec = tiling_mode(mode)
    threshold = spec.min_tissue_fraction if min_tissue_fraction is None else min_tissue_fraction
    return spec.build(slide, target_mpp=float(target_mpp), patch_size=int(patch_size),
                      stride=stride, min_tissue_fraction=float(threshold), tissue=tissue,
                      mpp_override=mpp_override)


def _native_grid(slide, *, target_mpp: float, patch_size: int, stride: int | None,
                 min_tissue_fraction: float, tissue: TissueParams | None,
                 mpp_override: float | None) -> TileGrid:
    mpp, source = slide_mpp(slide, mpp_override)
    scale = target_mpp / mpp  # level-0 pixels per target pixel
    size0 = max(1, round(patch_size * scale))
    step0 = max(1, round((stride or patch_size) * scale))
    level = slide.best_level_for_downsample(scale)
    ds = slide.level_downsamples[level]
    read_size = max(1, round(size0 / ds))
    if level > 0 and abs(ds - round(ds)) < 1e-3:
        # Snap to whole level pixels: every backend then reads exactly the same pixels
        # (OpenSlide would otherwise interpolate sub-pixel offsets). Costs < 0.5 level px.
        size0 = read_size * round(ds)
        step0 = max(1, round(step0 / ds)) * round(ds)
    W, H = slide.dimensions
    xs = np.arange(0, W - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, H - size0 + 1, step0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64).reshape(-1, 2)
    mask = detect_tissue(slide, tissue)
    frac = mask.fraction_in(coords, size0)
    keep = frac >= min_tissue_fraction if min_tissue_fraction > 0 else np.ones(len(coords), bool)
    return TileGrid(
        coords=np.ascontiguousarray(coords[keep]), tissue_fraction=frac[keep].astype(np.float32),
        level=int(level), read_size=read_size, patch_size=int(patch_size),
        patch_size_level0=size0, step_level0=step0, mpp=mpp, target_mpp=float(target_mpp),
        mpp_source=source, tissue=mask, mode="native",
    )


def _trident_grid(slide, *, target_mpp: float, patch_size: int, stride: int | None,
                  min_tissue_fraction: float, tissue: TissueParams | None,
                  mpp_override: float | None) -> TileGrid:
    """TRIDENT's grid (``tissue`` is not used: TRIDENT's Otsu segmenter finds the tissue)."""
    from care_scale import trident

    res = trident.resolution(slide, mpp_override)
    overlap = 0 if stride is None else patch_size - int(stride)
    target_mag = 10 / target_mpp  # TRIDENT's --mag
    geo = trident.patch_geometry(slide, patch_size, 10 / res.magnification, 10 / target_mag,
                                 overlap)
    if geo.step0 < 1:
        raise ConfigError(f"stride {stride} gives a step of {geo.step0} level-0 px")
    mask = trident.otsu_mask(slide, res.mpp)
    polygons = trident.tissue_polygons(mask, res.mpp, slide.uri)
    coords = geo.coords()
    keep, share = trident.keep_patches(coords, geo.size0, polygons, patch_size,
                                       min_tissue_fraction)
    W, H = slide.dimensions
    contours = [np.round(np.asarray(p.exterior.coords)[:-1]).astype(np.int64) for p in polygons]
    shown = TissueMask(mask=mask.astype(bool), contours=contours,
                       downsample=(W / mask.shape[1], H / mask.shape[0]), threshold=math.nan)
    return TileGrid(
        coords=np.ascontiguousarray(coords[keep]), tissue_fraction=share, level=geo.level,
        read_size=geo.read_size, patch_size=int(patch_size), patch_size_level0=geo.size0,
        step_level0=geo.step0, mpp=res.mpp, target_mpp=float(target_mpp),
        mpp_source=res.source, tissue=shown, mode="trident", magnification=res.magnification,
    )


def _resize_cv2(tiles: np.ndarray, size: int) -> np.ndarray:
    """Area averaging when shrinking (no aliasing), bilinear when enlarging."""
    import cv2

    interp = cv2.INTER_AREA if tiles.shape[1] > size else cv2.INTER_LINEAR
    out = np.empty((len(tiles), size, size, 3), np.uint8)
    for i, t in enumerate(tiles):
        out[i] = cv2.resize(t, (size, size), interpolation=interp)
    return out


def _resize_pil(tiles: np.ndarray, size: int) -> np.ndarray:
    """PIL's ``Image.resize`` default (bicubic), as TRIDENT's feature extraction resizes."""
    from PIL import Image

    out = np.empty((len(tiles), size, size, 3), np.uint8)
    for i, t in enumerate(tiles):
        out[i] = np.asarray(Image.fromarray(t).resize((size, size)))
    return out


TILING_MODES: dict[str, TilingModeSpec] = {
    "native": TilingModeSpec(
        "native", 0.5, _native_grid, 255, _resize_cv2,
        "care-scale's grid: step from the slide's MPP, tiles inside the slide, thumbnail "
        "saturation mask, kept at >= 50% tissue"),
    "trident": TilingModeSpec(
        "trident", 0.0, _trident_grid, 0, _resize_pil,
        "TRIDENT's grid (commit a91fa84): step from the magnification bucket, from (0, 0), its "
        "Otsu segmenter, kept when touching tissue; coordinates equal a TRIDENT run's"),
}
assert set(TILING_MODES) == set(get_args(TilingMode)), "TilingMode and TILING_MODES disagree"


def tiling_mode(name: str) -> TilingModeSpec:
    try:
        return TILING_MODES[name]
    except KeyError:
        raise ConfigError(f"unknown tiling mode {name!r}; known: {sorted(TILING_MODES)}") from None


def iter_tile_batches(slide, grid: TileGrid, *, batch_size: int = 64,
                      num_workers: int = 2) -> Iterator[TileBatch]:
    """Decode the grid's tiles in order, ``batch_size`` at a time (last batch may be short),
    filled past the slide's edge and resized as the grid's tiling mode does."""
    spec = tiling_mode(grid.mode)
    n = len(grid)
    for start in range(0, n, batch_size):
        coords = grid.coords[start : start + batch_size]
        tiles = slide.read_regions(coords, (grid.read_size, grid.read_size), level=grid.level,
                                   num_workers=num_workers, fill=spec.edge_fill)
        if grid.read_size != grid.patch_size:
            tiles = spec.resize(tiles, grid.patch_size)
        yield TileBatch(coords=coords, tiles=tiles,
                        tissue_fraction=grid.tissue_fraction[start : start + batch_size])
