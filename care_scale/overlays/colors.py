"""Colours: one per region with neighbours always different, and the heatmap's colour map.

Region colours: regions that share a patch edge are neighbours; a greedy colouring in order
of decreasing degree (Welsh-Powell) over a palette of 10 well-separated colours gives every
pair of neighbours two different colours unless a region touches 10 others that already hold
all 10 (then it takes the colour fewest of them have; CARE's regions, built on 8 x 8
windows, have far fewer neighbours).
Tissue green and the ROI's yellow are not in the palette, so they stay unambiguous.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RGB = tuple[int, int, int]

TISSUE_RGB: RGB = (0, 200, 0)  # TRIDENT draws its tissue contours in this green
ROI_RGB: RGB = (255, 212, 0)
GRID_RGB: RGB = (60, 60, 60)
# Tableau-10-like, without its green and yellow-olive (tissue, ROI).
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (23, 190, 207), (57, 59, 121), (127, 127, 127), (173, 73, 74),
)

# viridis, 11 evenly spaced samples of matplotlib's table (perceptually uniform, colour-blind
# safe, reads in grey scale); interpolated linearly between them.
_VIRIDIS = np.array([
    (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
    (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37),
], np.float64)


def colormap(values: Any) -> np.ndarray:
    """(N, 3) uint8 viridis colours of ``values`` in [0, 1] (clipped)."""
    v = np.clip(np.asarray(values, np.float64).ravel(), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(v).astype(np.int64), len(_VIRIDIS) - 2)
    t = (v - i)[:, None]
    return np.round(_VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t).astype(np.uint8)


def adjacency(cells_by_region: dict[int, np.ndarray], step: int) -> dict[int, set[int]]:
    """Regions that share a patch edge (4-neighbourhood on the patch grid)."""
    owner: dict[tuple[int, int], int] = {}
    for rid, cells in cells_by_region.items():
        for x, y in np.floor_divide(np.asarray(cells, np.int64), max(1, int(step))).tolist():
            owner[(x, y)] = rid
    out: dict[int, set[int]] = {rid: set() for rid in cells_by_region}
    for (x, y), rid in owner.items():
        for n in ((x + 1, y), (x, y + 1)):
            other = owner.get(n)
            if other is not None and other != rid:
                out[rid].add(other)
                out[other].add(rid)
    return out


def region_colours(cells_by_region: dict[int, np.ndarray], step: int) -> dict[int, RGB]:
    """A palette colour per region id; neighbours get different colours."""
    adj = adjacency(cells_by_region, step)
    order = sorted(adj, key=lambda r: (-len(adj[r]), r))
    index: dict[int, int] = {}
    for rid in order:
        used = [index[n] for n in adj[rid] if n in index]
        free = [k for k in range(len(PALETTE)) if k not in used]
        index[rid] = free[0] if free else min(range(len(PALETTE)), key=used.count)
    return {rid: PALETTE[k] for rid, k in index.items()}


def hex_colour(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


__all__ = ["GRID_RGB", "PALETTE", "ROI_RGB", "TISSUE_RGB", "adjacency", "colormap",
           "hex_colour", "region_colours"]
