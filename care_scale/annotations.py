"""Annotations in: a QuPath / GeoJSON file per slide that restricts tiling.

A file is what QuPath exports (a FeatureCollection, or a bare list of Features, as
``exportObjectsToGeoJson`` writes with and without ``"FEATURE_COLLECTION"``), or any GeoJSON
with Polygon / MultiPolygon geometries in level-0 pixels. A feature whose classification name
(``properties.classification.name``, or a plain string there) is one of ``exclude_classes``
(e.g. ``Pen``, ``Marker``) marks an area to leave out; every other feature an area to tile.
A tile is kept when its centre lies inside the areas to tile (the whole slide when the file
has none) and outside every area to leave out, after the tissue rule.

Where a slide's file comes from: the manifest's ``annotations`` column, else
``annotations.dir/<slide_id>.geojson`` (or ``.json``) when that exists; a slide with neither is
tiled as usual. The ``slides`` row's ``metadata`` records the file and what it kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from care_scale.exceptions import AnnotationError
from care_scale.storage import join, redact, url_to_fs

EXTENSIONS = (".geojson", ".json")


@dataclass
class Annotations:
    """The areas of one annotation file, as shapely geometries (None: no such area)."""

    uri: str
    include: Any | None
    exclude: Any | None
    n_include: int
    n_exclude: int

    def keep(self, coords: np.ndarray, size_level0: int) -> np.ndarray:
        """Which tiles (level-0 top-left ``coords``) to keep: centre rule, see the module."""
        import shapely

        c = np.asarray(coords, np.float64).reshape(-1, 2) + size_level0 / 2.0
        ok = np.ones(len(c), bool)
        if self.include is not None:
            ok &= shapely.contains_xy(self.include, c[:, 0], c[:, 1])
        if self.exclude is not None:
            ok &= ~shapely.contains_xy(self.exclude, c[:, 0], c[:, 1])
        return ok

    def restrict(self, grid: Any) -> Any:
        """The tile grid with only the kept tiles."""
        keep = self.keep(grid.coords, grid.patch_size_level0)
        return replace(grid, coords=np.ascontiguousarray(grid.coords[keep]),
                       tissue_fraction=np.ascontiguousarray(grid.tissue_fraction[keep]))

    def record(self, before: int, after: int, exclude_classes: list[str]) -> dict[str, str]:
        """What the slides row's metadata records."""
        return {"annotations": redact(self.uri),
                "annotations_tiles": f"{after} of {before} tissue tiles kept",
                "annotations_areas": f"{self.n_include} to tile, {self.n_exclude} left out"
                                     + (f" ({', '.join(exclude_classes)})" if exclude_classes
                                        else "")}


def _class_name(props: dict[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name") or (" : ".join(cls["names"]) if cls.get("names") else None)
    return cls if isinstance(cls, str) else None


def _features(doc: Any, uri: str) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    if isinstance(doc, dict):
        if doc.get("type") == "FeatureCollection":
            return [f for f in doc.get("features") or [] if isinstance(f, dict)]
        if doc.get("type") == "Feature":
            return [doc]
        if doc.get("type") in ("Polygon", "MultiPolygon"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise AnnotationError(redact(uri), "not GeoJSON: expected a FeatureCollection, a list of "
                               "Features, a Feature or a Polygon")


def read_annotations(uri: str, *, exclude_classes: list[str] | tuple[str, ...] = (),
                     storage_options: dict[str, Any] | None = None) -> Annotations:
    """The areas of the annotation file at ``uri`` (local or fsspec URI)."""
    import shapely
    from shapely.geometry import shape

    try:
        fs, path = url_to_fs(uri, storage_options)
        with fs.open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        raise AnnotationError(redact(uri), "no such file") from None
    except (OSError, ValueError) as exc:
        raise AnnotationError(redact(uri), f"cannot be read as JSON: {redact(exc)}") from None
    include, exclude = [], []
    for i, f in enumerate(_features(doc, uri)):
        g = f.get("geometry")
        if not g or g.get("type") not in ("Polygon", "MultiPolygon"):
            continue  # points and lines mark no area
        try:
            geom = shapely.make_valid(shape(g))
        except (ValueError, TypeError, AttributeError) as exc:
            raise AnnotationError(redact(uri), f"feature {i}: bad geometry: {exc}") from None
        name = _class_name(f.get("properties") or {})
        (exclude if name is not None and name in exclude_classes else include).append(geom)
    if not include and not exclude:
        raise AnnotationError(redact(uri), "has no Polygon or MultiPolygon features")
    return Annotations(uri=uri, include=shapely.union_all(include) if include else None,
                       exclude=shapely.union_all(exclude) if exclude else None,
                       n_include=len(include), n_exclude=len(exclude))


def annotation_uri(slide_id: str, given: str | None, folder: str | None,
                   storage_options: dict[str, Any] | None = None) -> str | None:
    """The slide's annotation file: ``given`` (the manifest's column), else the first of
    ``folder/<slide_id>.geojson|.json`` that exists, else None."""
    if given:
        return given
    if not folder:
        return None
    fs, _ = url_to_fs(folder, storage_options)
    for ext in EXTENSIONS:
        candidate = join(folder, slide_id + ext)
        if fs.exists(url_to_fs(candidate, storage_options)[1]):
            return candidate
    return None


__all__ = ["Annotations", "annotation_uri", "read_annotations"]
