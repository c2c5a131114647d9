"""TRIDENT-compatible tiling: the grid, tissue mask and keep rule of TRIDENT's own code.

Followed: mahmoodlab/TRIDENT at commit a91fa84 (2026-06-24), as ``run_batch_of_slides.py
--task seg --segmenter otsu`` then ``--task coords --mag M --patch_size P`` run it:

- Magnification (``WSI._fetch_magnification``): the slide's MPP (metadata rounded to 4
  decimals, or the user's MPP) put in a bucket: < 0.16 -> 80x, < 0.2 -> 60x, < 0.3 -> 40x,
  < 0.6 -> 20x, < 1.2 -> 10x, < 2.4 -> 5x, coarser is an error. Grid arithmetic then takes
  ``10 / mag`` um/px for level 0 (``WSIPatcher``), not the MPP itself: a 0.499 um/px slide is
  "20x", so 512 px at 20x step exactly 512 level-0 pixels.
- Grid (``WSIPatcher``): ``size0 = round(P * downsample)`` with ``downsample = (10 / M) /
  (10 / mag)``, step ``size0 - round(overlap * downsample)``, from (0, 0), ``ceil(W / step)``
  columns and ``ceil(H / step)`` rows (the last ones run past the slide's edge), row-major.
  Read level: ``get_best_level_and_custom_downsample(downsample, tolerance=0.1)``, read size
  ``round(size0 / int(level_downsample))``.
- Tissue (``segment_tissue`` with ``OtsuSegmenter``): 512 px tiles at 1.25x (8 um/px, from the
  slide's MPP) on the same grid rule, each thresholded on its own by the two-pass Otsu of
  ``model_zoo/otsu.py`` (CellViT's), pasted into a mask of the slide at 1.25x; the mask is
  resized to 2000 px high, its outer contours (``RETR_TREE``, holes are tissue) with more than
  1000 px of area become level-0 polygons (``IO.mask_to_gdf``).
- Keep rule (``WSIPatcher._compute_masked``): the polygons simplified with tolerance ``P / 4``
  (level-0 px, topology preserved), a patch square is kept when it intersects their union
  (``min_tissue_proportion`` 0, TRIDENT's default), else when the intersection covers at least
  that share of the square.

Decoding (``care_scale.tiling.iter_tile_batches`` in this mode): pixels past the slide's edge
are black (OpenSlide's transparent, as TRIDENT converts it to RGB), and tiles read at another
size are resized with PIL's default bicubic, as TRIDENT's feature extraction does.

What differs: a slide with objective power but no MPP, which TRIDENT refuses, is tiled at its
objective power (``10 / power`` um/px, TRIDENT's own magnification rule read backwards).
TRIDENT's deep-learning segmenters (HEST, its default; GrandQC) and ``--remove_holes`` are not
reproduced. ``shapely`` does the polygon work, as it does in TRIDENT (GeoPandas wraps it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from care_scale.exceptions import MissingMPPError, SlideError, UnsupportedResolutionError

TRIDENT_COMMIT = "a91fa8490e0210ebbbe58452c3babe009e0ab7ca"

#: ``WSI._fetch_magnification``: the first bucket whose bound the MPP is below.
MAG_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))
#: ``OtsuSegmenter``: its tile side and magnification.
_SEG_TILE = 512
_SEG_MAG = 1.25
#: ``mask_to_gdf``: mask height for contour finding; minimum contour area (mask px).
_CONTOUR_MASK_HEIGHT = 2000
_MIN_CONTOUR_AREA = 1000
#: ``get_best_level_and_custom_downsample`` tolerance used by ``WSIPatcher``.
_LEVEL_TOLERANCE = 0.1


@dataclass(frozen=True)
class Resolution:
    mpp: float  # the MPP TRIDENT would use (metadata rounded to 4 decimals, or the user's)
    magnification: int  # its magnification bucket
    source: str  # metadata | override | objective_power


def magnification_of(mpp: float, uri: str = "") -> int:
    for bound, mag in MAG_BUCKETS:
        if mpp < bound:
            return mag
    raise UnsupportedResolutionError(
        uri, f"mpp={mpp} is coarser than TRIDENT's lowest magnification bucket (5x, < 2.4 "
        "um/px); tile it with tiling=native")


def resolution(slide, mpp_override: float | None = None) -> Resolution:
    """The slide's MPP and magnification as TRIDENT's ``WSI`` reads them."""
    override = mpp_override or getattr(slide, "mpp_override", None)
    if override:
        return Resolution(float(override), magnification_of(float(override), slide.uri),
                          "override")
    if slide.mpp_x:
        mpp = round(float(slide.mpp_x), 4)  # OpenSlideWSI._fetch_mpp
        return Resolution(mpp, magnification_of(mpp, slide.uri), "metadata")
    if slide.objective_power:
        mag = int(float(slide.objective_power))
        return Resolution(10.0 / mag, mag, "objective_power")
    raise MissingMPPError(
        slide.uri, "no microns-per-pixel and no objective power in the metadata; "
        "pass an MPP override (--mpp-override / mpp_override=)")


def best_level(level_downsamples: list[float], downsample: float,
               tolerance: float = _LEVEL_TOLERANCE) -> int:
    """``WSI.get_best_level_and_custom_downsample``'s level."""
    for level, ds in enumerate(level_downsamples):
        if abs(ds - downsample) <= tolerance:
            return level
    if downsample >= level_downsamples[0]:
        closest = None
        for level, ds in enumerate(level_downsamples):
            if ds <= downsample:
                closest = level
            else:
                break
        if closest is not None:
            return closest
    else:
        for level, ds in enumerate(level_downsamples):
            if ds >= downsample:
                return level
    return 0  # unreachable for a pyramid whose level 0 has downsample 1


@dataclass(frozen=True)
class PatchGeometry:
    """One ``WSIPatcher``'s arithmetic."""

    size0: int  # level-0 px of one patch
    step0: int  # level-0 px between neighbours
    level: int
    read_size: int  # px read at ``level``
    cols: int
    rows: int

    def coords(self) -> np.ndarray:
        """(rows * cols, 2) int64 level-0 top-left (x, y), row-major."""
        rr, cc = np.meshgrid(np.arange(self.rows, dtype=np.int64),
                             np.arange(self.cols, dtype=np.int64), indexing="ij")
        return np.stack([cc.ravel() * self.step0, rr.ravel() * self.step0], axis=1)


def patch_geometry(slide, patch_size: int, src_mpp: float, dst_mpp: float,
                   overlap: int = 0) -> PatchGeometry:
    downsample = dst_mpp / src_mpp
    size0 = round(patch_size * downsample)
    step0 = size0 - round(overlap * downsample)
    level = best_level(list(slide.level_downsamples), downsample)
    read_size = round(size0 / int(slide.level_downsamples[level]))
    W, H = slide.dimensions
    return PatchGeometry(size0=size0, step0=step0, level=level, read_size=read_size,
                         cols=-(-W // step0), rows=-(-H // step0))


# ---- tissue: TRIDENT's Otsu segmenter --------------------------------------------------------

#: The segmenter's tiles go through ToTensor (uint8 / 255, float32) and back (* 255, uint8).
_ROUND_TRIP = np.clip(np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(255),
                      0, 255).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """``255 * skimage.color.rgb2gray(rgb)`` for uint8 RGB, the same float64 operations."""
    as_float = np.multiply(rgb, 1.0 / 255, dtype=np.float64)
    return 255 * (as_float @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float64))


def otsu_threshold(image: np.ndarray) -> float:
    """``skimage.filters.threshold_otsu(image)`` (256 bins over the image's range)."""
    flat = image.reshape(-1)
    if np.all(image == flat[0]):
        return flat[0]
    counts, edges = np.histogram(image.flatten(), bins=256)
    centers = (edges[:-1] + edges[1:]) / 2.0
    counts = counts.astype("float32", copy=False)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centers) / weight1
    mean2 = (np.cumsum((counts * centers)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return centers[np.argmax(variance12)]


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``skimage.morphology.remove_small_objects(mask, min_size)``: 4-connected components of
    fewer than ``min_size`` pixels removed."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, ndimage.generate_binary_structure(2, 1))
    sizes = np.bincount(labels.ravel())
    out = mask.copy()
    out[(sizes < min_size)[labels]] = False
    return out


def otsu_tissue(tile: np.ndarray) -> np.ndarray:
    """``1 - apply_otsu_thresholding(tile)``: uint8 (h, w) tissue mask of one RGB tile."""
    import cv2

    tile = tile.copy()
    tile[np.all(tile == 0, axis=-1)] = 255  # black padding -> white
    hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
    grey = cv2.inRange(hsv, (0, 0, 70), (180, 10, 255))
    dark = cv2.inRange(hsv, (0, 0, 0), (180, 255, 85))
    bg = tile.copy()
    bg[(grey | dark) > 0] = 255
    g = _gray(bg)
    first = _drop_small(g < otsu_threshold(g), 60)
    masked = np.where(first[..., None], tile, np.where(tile > 0, 255, 0)).astype(np.uint8)
    g = _gray(masked)
    second = ~_drop_small(~(g < otsu_threshold(g)), 5000)  # remove_small_holes(., 5000)
    return second.astype(np.uint8)


def _read_padded(slide, level: int, x: int, y: int, size: int) -> np.ndarray:
    """A ``size`` square at ``level`` whose pixels past the slide are black (OpenSlide's
    transparent, as TRIDENT's RGB conversion leaves them)."""
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    x0, y0 = math.floor(x / ds), math.floor(y / ds)
    w, h = min(size, lw - x0), min(size, lh - y0)
    out = np.zeros((size, size, 3), np.uint8)
    if w > 0 and h > 0:
        out[:h, :w] = slide.read_region(level, x, y, w, h)
    return out


def otsu_mask(slide, mpp: float) -> np.ndarray:
    """TRIDENT's tissue mask at 1.25x (uint8 0/1, ``round(H * mpp / 8)`` rows)."""
    import cv2

    dst_mpp = 10 / _SEG_MAG
    geo = patch_geometry(slide, _SEG_TILE, mpp, dst_mpp)
    factor = mpp / dst_mpp
    W, H = slide.dimensions
    width, height = round(W * factor), round(H * factor)
    mask = np.zeros((height, width), np.uint8)
    for x, y in geo.coords():
        tile = _read_padded(slide, geo.level, int(x), int(y), geo.read_size)
        tile = _ROUND_TRIP[cv2.resize(tile, (_SEG_TILE, _SEG_TILE))[:, :, :3]]
        pred = otsu_tissue(tile)
        xs = int(np.clip(np.round(x * factor), 0, width - 1))
        ys = int(np.clip(np.round(y * factor), 0, height - 1))
        xe, ye = min(xs + _SEG_TILE, width), min(ys + _SEG_TILE, height)
        mask[ys:ye, xs:xe] += pred[: ye - ys, : xe - xs]
    return (mask > 0).astype(np.uint8)


def tissue_polygons(mask: np.ndarray, mpp: float, uri: str = "") -> list:
    """``mask_to_gdf(mask * 255, max_nb_holes=0, min_contour_area=1000, pixel_size=mpp,
    contour_scale=8 / mpp)``: shapely polygons in level-0 px (holes are tissue)."""
    import cv2
    import shapely

    scale = _CONTOUR_MASK_HEIGHT / mask.shape[0]
    small = cv2.resize(mask * np.uint8(255),
                       (round(mask.shape[1] * scale), round(mask.shape[0] * scale)))
    contours, hierarchy = cv2.findContours(small, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    parent = np.squeeze(hierarchy, axis=(0,))[:, 3]
    to_level0 = (1 / (mpp / (10 / _SEG_MAG))) / scale
    polygons = []
    for i in np.flatnonzero(parent == -1):
        holes = np.flatnonzero(parent == i)
        net = (cv2.contourArea(contours[i]) - sum(cv2.contourArea(contours[j]) for j in holes)
               ) * mpp ** 2
        if net <= 0 or net <= _MIN_CONTOUR_AREA * mpp ** 2:
            continue
        ring = np.array(contours[i] * to_level0, dtype="int32").squeeze(1)
        polygon = shapely.Polygon(ring)
        if not polygon.is_valid:
            polygon = _make_valid(polygon, uri)
        polygons.append(polygon)
    return polygons


def _make_valid(polygon, uri: str):
    """``IO.make_valid``: the first of buffer(0, 0.1, -0.1, 0.2) that is one valid polygon."""
    import shapely

    for distance in (0, 0.1, -0.1, 0.2):
        fixed = polygon.buffer(distance)
        if isinstance(fixed, shapely.Polygon) and fixed.is_valid:
            return fixed
    raise SlideError(uri, "TRIDENT tiling: a tissue contour cannot be made a valid polygon "
                     "(buffers of 0, 0.1, -0.1, 0.2 px tried, as TRIDENT does)")


def keep_patches(coords: np.ndarray, size0: int, polygons: list, patch_size: int,
                 min_tissue_proportion: float) -> tuple[np.ndarray, np.ndarray]:
    """``WSIPatcher._compute_masked``: which squares to keep, and each kept square's share of
    tissue (on the simplified polygons)."""
    import shapely

    n = len(coords)
    if not polygons or n == 0:
        return np.zeros(n, bool), np.zeros(0, np.float32)
    simple = shapely.simplify(np.array(polygons, dtype=object), tolerance=patch_size / 4,
                              preserve_topology=True)
    bounds = shapely.bounds(simple)  # (K, 4) minx, miny, maxx, maxy
    x, y = coords[:, 0:1], coords[:, 1:2]
    near = ((x >= bounds[:, 0] - size0) & (x <= bounds[:, 2] + size0)
            & (y >= bounds[:, 1] - size0) & (y <= bounds[:, 3] + size0)).any(axis=1)
    union = shapely.union_all(simple)
    c = coords[near]
    squares = shapely.polygons(np.stack([
        np.stack([c[:, 0], c[:, 1]], 1), np.stack([c[:, 0] + size0, c[:, 1]], 1),
        np.stack([c[:, 0] + size0, c[:, 1] + size0], 1), np.stack([c[:, 0], c[:, 1] + size0], 1),
    ], axis=1).astype(np.float64))
    shapely.prepare(union)
    inside = shapely.area(shapely.intersection(squares, union))
    area = shapely.area(squares)
    if min_tissue_proportion == 0:
        ok = shapely.intersects(squares, union)
    else:
        ok = inside >= min_tissue_proportion * area
    share = inside / area
    keep = near.copy()
    keep[near] = ok
    return keep, share[ok].astype(np.float32)
