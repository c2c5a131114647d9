"""A slide's CARE regions, patches and tissue in level-0 pixels: what every overlay draws.

Built from the warehouse rows (``care-scale show``) or from the rows the job has just made
(``--overlays``), by the same code. A region's patches are its ``geometry``'s grid cells: the
outline the job stores is exactly the union of the region's patch squares
(``care_scale.embed.geometry``), so the cells are recovered from it without the opt-in
``patches`` table (when that table is there, its rows are used instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import Any

import numpy as np

from care_scale.exceptions import TableError


@dataclass
class Region:
    """One adaptive region. ``cells``: (k, 2) int64 level-0 top-left corners of its patches;
    ``geometry``: a shapely (Multi)Polygon in level-0 pixels."""

    region_id: int
    cells: np.ndarray
    geometry: Any
    num_patches: int
    coverage: float
    semantic_weight: float
    fused_weight: float
    is_roi: bool


@dataclass
class SlideShapes:
    """Everything an overlay of one slide needs; coordinates are level-0 pixels."""

    slide_id: str
    model_version: str
    width: int
    height: int
    step: int  # level-0 pixels between neighbouring patches (= the cells' side)
    regions: list[Region]
    tissue: list[np.ndarray] = field(default_factory=list)  # (K, 2) contours

    @property
    def roi(self) -> Region | None:
        return next((r for r in self.regions if r.is_roi), None)

    @property
    def patches(self) -> np.ndarray:
        """(N, 2) level-0 top-left corners of every patch (all regions)."""
        if not self.regions:
            return np.zeros((0, 2), np.int64)
        return np.concatenate([r.cells for r in self.regions])


def _grid_step(geoms: list[Any], rows: list[dict[str, Any]], hint: int | None) -> int:
    """The cells' side: every outline vertex lies on the grid of the patch step."""
    offsets: list[int] = []
    for g, row in zip(geoms, rows):
        x0, y0 = int(row["bbox_x0"]), int(row["bbox_y0"])
        for poly in getattr(g, "geoms", [g]):
            for ring in (poly.exterior, *poly.interiors):
                xy = np.asarray(ring.coords, np.float64)
                offsets.extend(np.abs(np.round(xy[:, 0] - x0)).astype(np.int64).tolist())
                offsets.extend(np.abs(np.round(xy[:, 1] - y0)).astype(np.int64).tolist())
    step = 0
    for o in offsets:
        step = gcd(step, int(o))
    if hint and step and step % int(hint) == 0:
        return int(hint)
    return step or int(hint or 1)


def cells_of(geometry: Any, bbox: tuple[int, int, int, int], step: int) -> np.ndarray:
    """Level-0 corners of the ``step`` squares inside ``geometry`` (a union of such squares
    whose lattice passes through ``bbox``'s top-left)."""
    import shapely

    x0, y0, x1, y1 = bbox
    xs = np.arange(x0, max(x0 + 1, x1), step, dtype=np.int64)
    ys = np.arange(y0, max(y0 + 1, y1), step, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    inside = shapely.contains_xy(geometry, gx + step / 2.0, gy + step / 2.0)
    return np.stack([gx[inside], gy[inside]], axis=1).astype(np.int64)


def shapes_from_rows(slide: dict[str, Any], regions: list[dict[str, Any]], *,
                     patches: dict[str, np.ndarray] | None = None,
                     tissue: list[np.ndarray] | None = None) -> SlideShapes:
    """``SlideShapes`` from a ``slides`` row and its ``regions`` rows (WKT ``geometry``), and
    optionally its ``patches`` rows (``x``, ``y``, ``region_id`` arrays)."""
    import shapely

    sid = str(slide["slide_id"])
    if not regions:
        raise TableError("regions", f"slide {sid!r} has no region rows "
                                    f"(model version {slide.get('model_version')})")
    regions = sorted(regions, key=lambda r: int(r["region_id"]))
    geoms = [shapely.from_wkt(r["geometry"]) for r in regions]
    bad = [int(r["region_id"]) for r, g in zip(regions, geoms) if g is None or g.is_empty]
    if bad:
        raise TableError("regions", f"slide {sid!r}: region(s) {bad} have no geometry")
    step = _grid_step(geoms, regions, slide.get("patch_size_level0"))
    by_region: dict[int, np.ndarray] = {}
    if patches is not None and len(patches.get("x", ())):
        xy = np.stack([np.asarray(patches["x"]), np.asarray(patches["y"])], 1).astype(np.int64)
        rid = np.asarray(patches["region_id"], np.int64)
        by_region = {int(r): xy[rid == r] for r in np.unique(rid)}
    out = []
    for row, g in zip(regions, geoms):
        r = int(row["region_id"])
        cells = by_region.get(r)
        if cells is None:
            bbox = (int(row["bbox_x0"]), int(row["bbox_y0"]), int(row["bbox_x1"]),
                    int(row["bbox_y1"]))
            cells = cells_of(g, bbox, step)
        out.append(Region(region_id=r, cells=cells, geometry=g,
                          num_patches=int(row["num_patches"]), coverage=float(row["coverage"]),
                          semantic_weight=float(row["semantic_weight"]),
                          fused_weight=float(row["fused_weight"]), is_roi=bool(row["is_roi"])))
    return SlideShapes(slide_id=sid, model_version=str(slide.get("model_version") or ""),
                       width=int(slide["width"]), height=int(slide["height"]), step=step,
                       regions=out, tissue=list(tissue or []))


__all__ = ["Region", "SlideShapes", "cells_of", "shapes_from_rows"]
