"""Outline of an adaptive region as WKT: the union of its patches' squares.

A CARE region is a set of grid cells (patches). Its outline is traced exactly on the grid:
every cell edge not shared with another cell of the region is a boundary edge, directed so
that the region lies on its left; chaining those edges gives the outer rings and the holes
(opposite orientation). Touching corners (diagonal cells) are split into separate rings, so
every ring is simple. The result is a level-0 ``MULTIPOLYGON`` in pixel coordinates, readable
by DuckDB spatial, shapely, QuPath's WKT import, ...
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

# Directions (dx, dy), in the order used to pick the next edge at a vertex.
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def _boundary_edges(cells: set[tuple[int, int]]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    out: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for x, y in cells:
        if (x, y - 1) not in cells:
            out[(x, y)].append((x + 1, y))
        if (x + 1, y) not in cells:
            out[(x + 1, y)].append((x + 1, y + 1))
        if (x, y + 1) not in cells:
            out[(x + 1, y + 1)].append((x, y + 1))
        if (x - 1, y) not in cells:
            out[(x, y + 1)].append((x, y))
    return out


def _turn_rank(incoming: tuple[int, int], outgoing: tuple[int, int]) -> int:
    """Lower is a sharper turn toward the region's side, which separates touching corners."""
    i = _DIRS.index(incoming)
    o = _DIRS.index(outgoing)
    return (o - i - 1) % 4  # +1 step in _DIRS is a turn toward the region (its left side)


def trace_rings(cells: set[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Closed rings (first vertex not repeated) of the union of unit cells, collinear points
    removed. Outer rings have positive shoelace area, holes negative."""
    edges = _boundary_edges(cells)
    rings = []
    while edges:
        start = min(edges)
        ring = [start]
        cur = start
        prev_dir: tuple[int, int] | None = None
        while True:
            options = edges[cur]
            if prev_dir is None or len(options) == 1:
                nxt = options[0]
            else:
                nxt = min(
                    options,
                    key=lambda p: _turn_rank(prev_dir, (p[0] - cur[0], p[1] - cur[1])),
                )
            options.remove(nxt)
            if not options:
                del edges[cur]
            prev_dir = (nxt[0] - cur[0], nxt[1] - cur[1])
            cur = nxt
            if cur == start:
                break
            ring.append(cur)
        rings.extend(_drop_collinear(r) for r in _split_at_repeats(ring))
    return rings


def _split_at_repeats(ring: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """A ring that touches itself at a vertex (a hole pinched to the outside) -> simple loops."""
    loops = []
    stack: list[tuple[int, int]] = []
    where: dict[tuple[int, int], int] = {}
    for v in ring:
        if v in where:
            i = where[v]
            loop = stack[i:]
            loops.append(loop)
            for u in loop[1:]:
                del where[u]
            del stack[i + 1 :]
        else:
            where[v] = len(stack)
            stack.append(v)
    loops.append(stack)
    return [lp for lp in loops if len(lp) >= 4]


def _drop_collinear(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    n = len(ring)
    for i in range(n):
        a, b, c = ring[i - 1], ring[i], ring[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            out.append(b)
    return out


def _area(ring: list[tuple[int, int]]) -> float:
    s = 0
    for i in range(len(ring)):
        x1, y1 = ring[i - 1]
        x2, y2 = ring[i]
        s += x1 * y2 - x2 * y1
    return s / 2.0


def _contains(ring: list[tuple[int, int]], px: float, py: float) -> bool:
    inside = False
    n = len(ring)
    for i in range(n):
        x1, y1 = ring[i - 1]
        x2, y2 = ring[i]
        if (y1 > py) != (y2 > py) and px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def cells_to_polygons(cells: set[tuple[int, int]]) -> list[list[list[tuple[int, int]]]]:
    """Polygons ``[outer, hole, hole, ...]`` of the union of the unit cells."""
    rings = trace_rings(cells)
    outers = [r for r in rings if _area(r) > 0]
    holes = [r for r in rings if _area(r) < 0]
    polys = [[o] for o in outers]
    for h in holes:
        # A point strictly inside the hole: the centre of the empty cell right of its first edge.
        (x1, y1), (x2, y2) = h[0], h[1]
        dx, dy = np.sign(x2 - x1), np.sign(y2 - y1)
        px, py = x1 + dx * 0.5 - dy * 0.5, y1 + dy * 0.5 + dx * 0.5
        containing = [i for i, o in enumerate(outers) if _contains(o, px, py)]
        if containing:
            best = min(containing, key=lambda i: _area(outers[i]))
            polys[best].append(h)
    return polys


def region_wkt(coords: np.ndarray, step: int) -> str:
    """Level-0 MULTIPOLYGON WKT of the patches at ``coords`` (N,2 top-left) of size ``step``."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if len(coords) == 0:
        return "MULTIPOLYGON EMPTY"
    origin = coords.min(axis=0)
    cells = {(int(a), int(b)) for a, b in (coords - origin) // int(step)}
    ox, oy = int(origin[0]), int(origin[1])

    def ring_text(ring: list[tuple[int, int]]) -> str:
        pts = [*ring, ring[0]]
        return "(" + ", ".join(f"{ox + x * step} {oy + y * step}" for x, y in pts) + ")"

    polys = cells_to_polygons(cells)
    body = ", ".join("(" + ", ".join(ring_text(r) for r in poly) + ")" for poly in polys)
    return f"MULTIPOLYGON ({body})"
