"""Region outlines as WKT (care_scale.embed.geometry)."""

from __future__ import annotations


def test_region_outline_wkt_is_exact():
    """Region outlines: union of patch squares, holes kept, touching corners split."""
    import numpy as np

    from care_scale.embed.geometry import _area, cells_to_polygons, region_wkt

    assert region_wkt(np.array([[512, 256]]), 256) == (
        "MULTIPOLYGON (((512 256, 768 256, 768 512, 512 512, 512 256)))")
    ring = np.array([(x, y) for x in range(3) for y in range(3) if (x, y) != (1, 1)]) * 10
    assert region_wkt(ring, 10) == ("MULTIPOLYGON (((0 0, 30 0, 30 30, 0 30, 0 0), "
                                    "(10 10, 10 20, 20 20, 20 10, 10 10)))")
    assert region_wkt(np.array([[0, 0], [10, 10]]), 10).count("((") == 2
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = rng.random((8, 8)) < rng.random()
        cells = {(int(x), int(y)) for y, x in zip(*np.nonzero(m))}
        if not cells:
            continue
        polys = cells_to_polygons(cells)
        area = sum(_area(p[0]) + sum(_area(h) for h in p[1:]) for p in polys)
        assert area == len(cells)
        assert all(len(set(r)) == len(r) for p in polys for r in p)
