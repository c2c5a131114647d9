"""Tissue detection on a slide thumbnail.

Stained tissue is coloured, glass and background are grey-white: thresholding the HSV
saturation separates them across stains and scanners better than brightness does. Steps:
median smoothing, Otsu threshold on saturation (floored so an all-background slide does not
split its noise in two), morphological closing, hole filling, removal of specks below a minimum
area. Contours are returned in level-0 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from care_scale.exceptions import ConfigError


@dataclass
class TissueParams:
    """Parameters of :func:`detect_tissue` (all optional)."""

    thumbnail_max_side: int = 1024
    saturation_threshold: float | None = None  # 0..255; None: Otsu on the thumbnail
    min_saturation: float = 15.0  # floor for the Otsu threshold (background noise level)
    median_kernel: int = 5  # odd; 0 or 1 disables smoothing
    close_radius: int = 2  # px of the thumbnail; 0 disables closing
    fill_holes: bool = True
    min_area_fraction: float = 0.0005  # drop components smaller than this share of the thumbnail

    def validate(self) -> None:
        if self.thumbnail_max_side < 16:
            raise ConfigError(f"thumbnail_max_side must be >= 16, got {self.thumbnail_max_side}")
        if self.median_kernel > 1 and self.median_kernel % 2 == 0:
            raise ConfigError(f"median_kernel must be odd, got {self.median_kernel}")
        if not 0.0 <= self.min_area_fraction < 1.0:
            raise ConfigError(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction}")


@dataclass
class TissueMask:
    """``mask`` (h, w) bool over the thumbnail; ``downsample`` (x, y) level-0 px per mask px;
    ``contours``: list of (K, 2) int64 arrays of level-0 (x, y) outer boundary points;
    ``threshold``: the saturation threshold used."""

    mask: np.ndarray
    contours: list[np.ndarray]
    downsample: tuple[float, float]
    threshold: float

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, coords: np.ndarray, size_level0: int) -> np.ndarray:
        """Share of mask pixels that are tissue inside each square (level-0 top-left coords)."""
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        if len(coords) == 0:
            return np.zeros(0, np.float32)
        import cv2

        h, w = self.mask.shape
        # Summed-area table, (h+1, w+1) with a zero first row/column; exact integer counts
        # (OpenCV's is ~30x faster than two numpy cumsums over a 1024 px mask).
        integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_32S)
        dx, dy = self.downsample
        x0 = np.clip(np.floor(coords[:, 0] / dx).astype(np.int64), 0, w - 1)
        y0 = np.clip(np.floor(coords[:, 1] / dy).astype(np.int64), 0, h - 1)
        x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / dx).astype(np.int64), x0 + 1, w)
        y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / dy).astype(np.int64), y0 + 1, h)
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return (total / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def saturation(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)[..., 1]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (background 4-connected to the border stays, the
    rest becomes foreground), as one OpenCV flood fill from a 1 px border (~10x faster)."""
    import cv2

    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), np.uint8)
    outside[1:-1, 1:-1] = mask
    flood_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(outside, flood_mask, (0, 0), 2, flags=4)
    return outside[1:-1, 1:-1] != 2


def mask_from_rgb(rgb: np.ndarray, params: TissueParams | None = None
                  ) -> tuple[np.ndarray, float]:
    """Tissue mask (bool) of an RGB image and the saturation threshold used."""
    import cv2

    p = params or TissueParams()
    p.validate()
    sat = saturation(rgb)
    if p.median_kernel and p.median_kernel > 1:
        sat = cv2.medianBlur(sat, int(p.median_kernel))
    if p.saturation_threshold is not None:
        threshold = float(p.saturation_threshold)
    else:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(float(otsu), float(p.min_saturation))
    mask = sat > threshold
    if p.close_radius > 0:
        r = int(p.close_radius)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
    if p.fill_holes:
        mask = fill_holes(mask)
    if p.min_area_fraction > 0 and mask.any():
        # 4-connected components, as scipy.ndimage.label's default; label 0 is background.
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                               connectivity=4)
        areas = stats[:, cv2.CC_STAT_AREA]
        keep = areas >= p.min_area_fraction * mask.size
        keep[0] = False
        mask = keep[labels]
    return mask.astype(bool), threshold


def detect_tissue(slide, params: TissueParams | None = None) -> TissueMask:
    """Tissue mask and contours of ``slide`` (anything with ``thumbnail()`` and ``dimensions``)."""
    import cv2

    p = params or TissueParams()
    thumb = slide.thumbnail(p.thumbnail_max_side)
    mask, threshold = mask_from_rgb(thumb, p)
    W, H = slide.dimensions
    dx, dy = W / mask.shape[1], H / mask.shape[0]
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                cv2.CHAIN_APPROX_SIMPLE)
    contours = [np.round(c.reshape(-1, 2) * (dx, dy)).astype(np.int64) for c in found]
    return TissueMask(mask=mask, contours=contours, downsample=(dx, dy), threshold=threshold)
