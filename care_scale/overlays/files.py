"""A slide's overlay folder and its files: ``<warehouse>/overlays/<slide_id>/`` (local or
any fsspec URI), or the folder ``care-scale show --out`` names.

=================== ================================================= ===================
file                what                                              written by (job)
=================== ================================================= ===================
``thumbnail.jpg``   the thumbnail tissue detection used                the decode task
``tissue.geojson``  tissue contours (TRIDENT-style, QuPath-readable)   the decode task
``regions.geojson`` the CARE regions, QuPath GeoJSON                   the slide-stage actor
``regions.png``     thumbnail, tissue, patch grid, regions, ROI        the slide-stage actor
``heatmap.png``     fused weight per region, with a colour bar         the slide-stage actor
=================== ================================================= ===================

In the job each file is written by the worker that already has what it shows: the decode task
has the slide open and its thumbnail in memory (tissue detection read it), the slide-stage
actor has the regions; the actor reads the two small files back from the folder, so no slide
is read twice and nothing passes through the driver.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from care_scale.exceptions import ConfigError
from care_scale.storage import is_remote, join, redact, strip_file_scheme, url_to_fs, write_bytes

OVERLAYS = "overlays"
THUMBNAIL = "thumbnail.jpg"
TISSUE_GEOJSON = "tissue.geojson"
REGIONS_GEOJSON = "regions.geojson"
REGIONS_PNG = "regions.png"
HEATMAP_PNG = "heatmap.png"


def slide_folder(root: str, slide_id: str) -> str:
    """``root/<slide_id>``; the slide id must be usable as one folder name."""
    if "/" in slide_id or "\\" in slide_id or slide_id in ("", ".", ".."):
        raise ConfigError(f"slide id {slide_id!r} cannot be a folder name under {redact(root)}")
    return join(root, slide_id)


def overlay_folder(warehouse: str, slide_id: str) -> str:
    """Where the job's ``--overlays`` puts a slide's files."""
    return slide_folder(join(warehouse, OVERLAYS), slide_id)


def put(folder: str, name: str, data: bytes, storage_options: dict[str, Any] | None) -> str:
    """Write ``folder/name`` whole (the folder is made when local); returns its URI."""
    uri = join(folder, name)
    if not is_remote(folder):
        import os

        os.makedirs(strip_file_scheme(folder), exist_ok=True)
    write_bytes(uri, data, storage_options)
    return uri


def get(folder: str, name: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, path = url_to_fs(join(folder, name), storage_options)
    with fs.open(path, "rb") as fh:
        return fh.read()


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image")
    return np.ascontiguousarray(img[..., ::-1])


def write_tissue(folder: str, slide_id: str, thumbnail: np.ndarray,
                 contours: list[np.ndarray], storage_options: dict[str, Any] | None
                 ) -> dict[str, str]:
    """The decode task's share: the thumbnail and the tissue contours."""
    from care_scale.overlays.geojson import dumps, tissue_geojson

    return {THUMBNAIL: put(folder, THUMBNAIL, jpeg_bytes(thumbnail), storage_options),
            TISSUE_GEOJSON: put(folder, TISSUE_GEOJSON,
                                dumps(tissue_geojson(slide_id, contours)).encode(),
                                storage_options)}


def write_regions(folder: str, thumbnail: np.ndarray, shapes: Any,
                  storage_options: dict[str, Any] | None) -> dict[str, str]:
    """Regions GeoJSON, regions picture and heatmap of ``shapes`` (a ``SlideShapes``)."""
    from care_scale.overlays.geojson import dumps, regions_geojson
    from care_scale.overlays.render import layout, png_bytes, render_heatmap, render_regions

    lay = layout(thumbnail, shapes)
    regions = png_bytes(render_regions(thumbnail, shapes, prepared=lay))
    heatmap = png_bytes(render_heatmap(thumbnail, shapes, prepared=lay))
    return {REGIONS_GEOJSON: put(folder, REGIONS_GEOJSON, dumps(regions_geojson(shapes)).encode(),
                                 storage_options),
            REGIONS_PNG: put(folder, REGIONS_PNG, regions, storage_options),
            HEATMAP_PNG: put(folder, HEATMAP_PNG, heatmap, storage_options)}


def finish_from_folder(folder: str, slide: dict[str, Any], regions: list[dict[str, Any]],
                       storage_options: dict[str, Any] | None) -> dict[str, str]:
    """The slide-stage actor's share: read back what the decode task wrote, then draw the
    regions of the rows it has just made."""
    from care_scale.overlays.geojson import read_contours
    from care_scale.overlays.shapes import shapes_from_rows

    thumb = decode_rgb(get(folder, THUMBNAIL, storage_options))
    contours = read_contours(json.loads(get(folder, TISSUE_GEOJSON, storage_options)))
    shapes = shapes_from_rows(slide, regions, tissue=contours)
    return write_regions(folder, thumb, shapes, storage_options)


__all__ = ["HEATMAP_PNG", "OVERLAYS", "REGIONS_GEOJSON", "REGIONS_PNG", "THUMBNAIL",
           "TISSUE_GEOJSON", "finish_from_folder", "overlay_folder", "slide_folder",
           "write_regions", "write_tissue"]
