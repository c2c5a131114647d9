"""QuPath-compatible GeoJSON: the regions of a slide, and its tissue contours.

The format is the one QuPath writes for its own exports (File > Export objects as GeoJSON,
``exportObjectsToGeoJson(..., "FEATURE_COLLECTION")``; QuPath's ``QuPathTypeAdapters``): a
``FeatureCollection`` of ``Feature``s, each with an ``id`` (a UUID), a ``geometry`` in level-0
pixels (origin top-left of the full-resolution image) and ``properties`` holding
``objectType`` (``"annotation"``), ``name``, ``color`` (the object's own colour),
``classification`` (``{"name", "color": [r, g, b]}``: QuPath reads a classification object
only when both are present), ``measurements`` (a map of name to number) and ``metadata``
(strings). ``tests/data/qupath/`` holds an example in QuPath's format and where it comes from.

Regions are class ``CARE region``, the ROI class ``CARE ROI``; measurements are the region id,
patch count, coverage, semantic and fused weight and ``is_roi`` (1 or 0: QuPath measurements
are numbers). Tissue contours are a second file, one Polygon per tissue piece with a
``tissue_id`` property, as TRIDENT writes its contour GeoJSON, plus the same QuPath
properties (class ``Tissue``), so both tools' readers take it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from care_scale.overlays.colors import ROI_RGB, TISSUE_RGB, region_colours
from care_scale.overlays.shapes import SlideShapes

REGION_CLASS = "CARE region"
ROI_CLASS = "CARE ROI"
TISSUE_CLASS = "Tissue"
REGION_CLASS_RGB = (31, 119, 180)
# Feature ids are UUIDs (as QuPath's), derived from the slide, model version and region so
# that the same region keeps its id from one run to the next.
_NAMESPACE = uuid.UUID("7b0c1d52-5c1e-4f43-9a51-3f0b6a0f2c15")


def _feature_id(*parts: Any) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


def _geometry(geom: Any) -> dict[str, Any]:
    """GeoJSON geometry of a shapely (Multi)Polygon: a Polygon when it has one part; integer
    coordinates where they are whole (the region outlines always are)."""
    from shapely.geometry.polygon import orient

    parts = list(getattr(geom, "geoms", [geom]))

    def ring(r: Any) -> list[list[float | int]]:
        xy = np.asarray(r.coords, np.float64)
        whole = np.all(xy == np.round(xy))
        return (np.round(xy).astype(np.int64).tolist() if whole
                else np.round(xy, 2).tolist())

    def poly(p: Any) -> list[list[list[float | int]]]:
        p = orient(p, sign=1.0)  # RFC 7946: exterior counter-clockwise
        return [ring(p.exterior), *(ring(h) for h in p.interiors)]

    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": poly(parts[0])}
    return {"type": "MultiPolygon", "coordinates": [poly(p) for p in parts]}


def _annotation(fid: str, geom: Any, name: str, cls: str, cls_rgb: tuple[int, int, int],
                rgb: tuple[int, int, int], measurements: dict[str, float],
                metadata: dict[str, str], extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    props: dict[str, Any] = {**(extra or {}), "objectType": "annotation", "name": name,
                             "color": list(rgb),
                             "classification": {"name": cls, "color": list(cls_rgb)}}
    if measurements:
        props["measurements"] = measurements
    if metadata:
        props["metadata"] = metadata
    return {"type": "Feature", "id": fid, "geometry": _geometry(geom), "properties": props}


def regions_geojson(shapes: SlideShapes) -> dict[str, Any]:
    """One Feature per adaptive region (the ROI in its own class), a FeatureCollection."""
    colours = region_colours({r.region_id: r.cells for r in shapes.regions}, shapes.step)
    meta = {"slide_id": shapes.slide_id, "model_version": shapes.model_version}
    features = []
    for r in shapes.regions:
        name = f"ROI (region {r.region_id})" if r.is_roi else f"region {r.region_id}"
        features.append(_annotation(
            _feature_id(shapes.slide_id, shapes.model_version, r.region_id), r.geometry, name,
            ROI_CLASS if r.is_roi else REGION_CLASS,
            ROI_RGB if r.is_roi else REGION_CLASS_RGB, colours[r.region_id],
            {"region_id": r.region_id, "num_patches": r.num_patches,
             "coverage": r.coverage, "semantic_weight": r.semantic_weight,
             "fused_weight": r.fused_weight, "is_roi": 1 if r.is_roi else 0}, meta))
    return {"type": "FeatureCollection", "features": features}


def tissue_polygons(contours: list[np.ndarray]) -> list[Any]:
    """Valid shapely polygons of tissue contours ((K, 2) level-0 points; a contour that
    touches itself is split into its valid parts; fewer than 3 points are dropped)."""
    import shapely

    out = []
    for c in contours:
        pts = np.asarray(c, np.float64).reshape(-1, 2)
        if len(pts) < 3:
            continue
        todo = [shapely.make_valid(shapely.Polygon(pts))]
        while todo:  # a repair may give a collection of (multi)polygons and lines
            g = todo.pop()
            if isinstance(g, shapely.Polygon):
                if not g.is_empty and g.area > 0:
                    out.append(g)
            elif hasattr(g, "geoms"):
                todo.extend(g.geoms)
    return out


def tissue_geojson(slide_id: str, contours: list[np.ndarray]) -> dict[str, Any]:
    """Tissue contours as a FeatureCollection of Polygons with ``tissue_id`` (TRIDENT's
    property) and QuPath's annotation properties."""
    features = []
    for i, poly in enumerate(tissue_polygons(contours)):
        features.append(_annotation(
            _feature_id(slide_id, "tissue", i), poly, f"tissue {i}", TISSUE_CLASS, TISSUE_RGB,
            TISSUE_RGB, {"area_px": float(poly.area)}, {"slide_id": slide_id},
            extra={"tissue_id": i}))
    return {"type": "FeatureCollection", "features": features}


def read_contours(doc: dict[str, Any]) -> list[np.ndarray]:
    """Exterior rings of a tissue FeatureCollection, (K, 2) int64 level-0 points each."""
    out = []
    for f in doc.get("features", []):
        g = f.get("geometry") or {}
        polys = ([g["coordinates"]] if g.get("type") == "Polygon"
                 else g.get("coordinates", []) if g.get("type") == "MultiPolygon" else [])
        for p in polys:
            if p:
                out.append(np.round(np.asarray(p[0], np.float64)[:-1]).astype(np.int64))
    return out


def dumps(doc: dict[str, Any]) -> str:
    """Compact JSON (finite numbers only: QuPath's reader and RFC 8259 agree on those)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


__all__ = ["REGION_CLASS", "ROI_CLASS", "TISSUE_CLASS", "dumps", "read_contours",
           "regions_geojson", "tissue_geojson", "tissue_polygons"]
