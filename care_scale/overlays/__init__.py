"""Pictures and GeoJSON of a slide's CARE regions: where the model looked.

One concept per module:

- ``shapes``: a slide's regions, patches and tissue contours in level-0 pixels (from the tables
  or from the job's rows), the one input of everything below;
- ``colors``: region colours (neighbours differ), the heatmap colour map;
- ``geojson``: QuPath-compatible GeoJSON of the regions and of the tissue contours;
- ``render``: the regions picture and the fused-weight heatmap (Pillow + numpy);
- ``files``: the overlay folder of a slide (``<warehouse>/overlays/<slide_id>/``) and its files;
- ``show``: ``care-scale show`` (tables + source slide -> the files);
- ``report``: ``care-scale report`` (one self-contained HTML page).

Nothing heavy is imported here.
"""

from __future__ import annotations

__all__ = ["show_slide", "write_report"]


def __getattr__(name: str):
    if name == "show_slide":
        from care_scale.overlays.show import show_slide

        return show_slide
    if name == "write_report":
        from care_scale.overlays.report import write_report

        return write_report
    raise AttributeError(name)
