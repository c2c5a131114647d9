"""``care-scale show``: a slide's overlays from the warehouse rows and its source slide.

The ``slides`` row gives the source URI, size and model version; the ``regions`` rows the
outlines and weights; the ``patches`` rows (when kept) each patch's region; the run's config
(``runs``) the tiling the job used, so the contour drawn is the one that chose the patches
(same tiling mode, tissue parameters and MPP). The thumbnail is read from the source slide
through the slide layer: by default its longer side is 1,600 px; ``level=N`` reads pyramid
level N whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from care_scale.exceptions import ConfigError, TableError
from care_scale.storage import redact
from care_scale.warehouse.versions import pick_model_version

# A level read whole must stay a picture, not a slide: its longer side at most this.
MAX_LEVEL_SIDE = 16384
_SLIDE_COLUMNS = ["slide_id", "model_version", "source_uri", "width", "height", "mpp",
                  "mpp_source", "target_mpp", "patch_size", "patch_size_level0", "num_patches",
                  "num_regions", "roi_region_id", "run_id"]
_REGION_COLUMNS = ["slide_id", "model_version", "region_id", "num_patches", "coverage",
                   "semantic_weight", "fused_weight", "is_roi", "bbox_x0", "bbox_y0",
                   "bbox_x1", "bbox_y1", "geometry"]


@dataclass
class ShowResult:
    slide_id: str
    model_version: str
    files: dict[str, str] = field(default_factory=dict)
    thumbnail_size: tuple[int, int] = (0, 0)


def _rows(dt: Any, columns: list[str], slide_id: str, model_version: str | None = None
          ) -> list[dict[str, Any]]:
    import pyarrow.compute as pc

    flt = pc.field("slide_id") == slide_id
    if model_version is not None:
        flt = flt & (pc.field("model_version") == model_version)
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=flt).to_pylist()


def slide_rows(wh: Any, slide_id: str, model_version: str | None
               ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """The slide's ``slides`` row, its ``regions`` rows and its ``patches`` columns (None
    when the table or the rows are absent), for one model version."""
    import numpy as np

    slides = wh.open("slides")
    if slides is None:
        raise TableError("slides", f"no table at {redact(wh.table_uri('slides'))}")
    found = _rows(slides, _SLIDE_COLUMNS, slide_id)
    if not found:
        raise TableError("slides", f"no slide {slide_id!r} in {redact(wh.uri)}")
    mv = pick_model_version((r["model_version"] for r in found), model_version, table="slides")
    slide = next(r for r in found if r["model_version"] == mv)
    regions_dt = wh.open("regions")
    if regions_dt is None:
        raise TableError("regions", f"no table at {redact(wh.table_uri('regions'))}")
    regions = _rows(regions_dt, _REGION_COLUMNS, slide_id, mv)
    patches = None
    patches_dt = wh.open("patches")
    if patches_dt is not None:
        t = _rows(patches_dt, ["x", "y", "region_id"], slide_id, mv)
        if t:
            patches = {k: np.array([r[k] for r in t], np.int64) for k in ("x", "y", "region_id")}
    return slide, regions, patches


def run_config(wh: Any, run_id: str | None) -> dict[str, Any]:
    """The job config of the run that embedded the slide ({} if not recorded)."""
    runs = wh.open("runs")
    if runs is None or not run_id:
        return {}
    import pyarrow.compute as pc

    rows = runs.to_pyarrow_dataset().to_table(
        columns=["config_json"], filter=pc.field("run_id") == run_id).to_pylist()
    return json.loads(rows[0]["config_json"] or "{}") if rows else {}


def job_tissue_contours(slide: Any, slide_row: dict[str, Any], cfg: dict[str, Any]
                        ) -> list[Any]:
    """The tissue contours the run's tiling used on this slide (the job's own
    ``job_tile_grid`` with the run's tiling mode and tissue settings, the row's tiling and
    MPP), so the contour drawn is the one that chose the patches."""
    from care_scale.config import from_dict
    from care_scale.tiling import tile_grid
    from care_scale.tissue import TissueParams

    override = slide_row.get("mpp") if slide_row.get("mpp_source") == "override" else None
    # The same call as the job's (embed.pipeline.job_tile_grid), from the run's recorded
    # config (overlays sit below embed: the job calls them, they never import the job).
    grid = tile_grid(slide, target_mpp=float(slide_row.get("target_mpp") or 0.5),
                     patch_size=int(slide_row.get("patch_size") or 224),
                     min_tissue_fraction=cfg.get("min_tissue_fraction"),
                     tissue=from_dict(TissueParams, cfg.get("tissue") or {}, where="tissue"),
                     mpp_override=override, mode=cfg.get("tiling") or "native")
    return grid.tissue.contours if grid.tissue is not None else []


def read_thumbnail(slide: Any, level: int | None, max_side: int) -> Any:
    """Pyramid level ``level`` whole, or a thumbnail whose longer side is ``max_side``."""
    if level is None:
        return slide.thumbnail(max_side)
    if not 0 <= level < slide.level_count:
        raise ConfigError(f"--level {level}: {redact(slide.uri)} has levels 0.."
                          f"{slide.level_count - 1}")
    lw, lh = slide.level_dimensions[level]
    if max(lw, lh) > MAX_LEVEL_SIDE:
        raise ConfigError(f"--level {level}: {redact(slide.uri)} is {lw} x {lh} px at that "
                          f"level, over {MAX_LEVEL_SIDE} px; pick a higher level (levels 0.."
                          f"{slide.level_count - 1})")
    return slide.read_region(level, 0, 0, lw, lh)


def show_slide(warehouse: str, slide_id: str, *, out: str = "overlays",
               level: int | None = None, model_version: str | None = None,
               storage_options: dict[str, Any] | None = None) -> ShowResult:
    """Write ``out/<slide_id>/`` regions.png, heatmap.png, regions.geojson, tissue.geojson."""
    from care_scale.overlays import files
    from care_scale.overlays.geojson import dumps, tissue_geojson
    from care_scale.overlays.render import MAX_SIDE
    from care_scale.overlays.shapes import shapes_from_rows
    from care_scale.slides import open_slide
    from care_scale.warehouse import Warehouse

    wh = Warehouse(warehouse, storage_options=storage_options)
    slide_row, regions, patches = slide_rows(wh, slide_id, model_version)
    cfg = run_config(wh, slide_row.get("run_id"))
    folder = files.slide_folder(out, slide_id)
    with open_slide(slide_row["source_uri"], storage_options=storage_options) as slide:
        thumb = read_thumbnail(slide, level, MAX_SIDE)
        contours = job_tissue_contours(slide, slide_row, cfg)
    shapes = shapes_from_rows(slide_row, regions, patches=patches, tissue=contours)
    written = files.write_regions(folder, thumb, shapes, storage_options)
    written[files.TISSUE_GEOJSON] = files.put(
        folder, files.TISSUE_GEOJSON, dumps(tissue_geojson(slide_id, contours)).encode(),
        storage_options)
    return ShowResult(slide_id=slide_id, model_version=shapes.model_version, files=written,
                      thumbnail_size=(int(thumb.shape[1]), int(thumb.shape[0])))


__all__ = ["ShowResult", "read_thumbnail", "show_slide", "slide_rows"]
