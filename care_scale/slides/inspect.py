"""What ``care-scale inspect`` shows about one slide: its metadata, the backend that reads it,
how the job would tile it, and optionally a thumbnail with the tissue contours drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def inspect_slide(uri: str, *, storage_options: dict | None = None,
                  mpp_override: float | None = None, target_mpp: float = 0.5,
                  patch_size: int = 224, min_tissue_fraction: float | None = None,
                  backend: str = "auto", thumbnail: str | None = None,
                  tiling: str = "native") -> dict[str, Any]:
    """The facts ``inspect`` prints, as a dict (also used by tests and the demo)."""
    from care_scale.exceptions import MissingMPPError
    from care_scale.slides import open_slide
    from care_scale.storage import redact
    from care_scale.tiling import tile_grid
    from care_scale.tissue import detect_tissue

    with open_slide(uri, storage_options=storage_options, backend=backend,
                    mpp_override=mpp_override) as slide:
        w, h = slide.dimensions
        info: dict[str, Any] = {
            "uri": redact(uri), "width": w, "height": h, "level_count": slide.level_count,
            "level_dimensions": [list(d) for d in slide.level_dimensions],
            "level_downsamples": [round(d, 4) for d in slide.level_downsamples],
            "mpp_x": slide.mpp_x, "mpp_y": slide.mpp_y,
            "objective_power": slide.objective_power, "vendor": slide.vendor,
            "backend": slide.backend, "target_mpp": target_mpp, "patch_size": patch_size,
            "tiling": tiling,
        }
        try:
            grid = tile_grid(slide, target_mpp=target_mpp, patch_size=patch_size,
                             min_tissue_fraction=min_tissue_fraction, mpp_override=mpp_override,
                             mode=tiling)
        except MissingMPPError:
            if thumbnail:
                _write_thumbnail(slide, detect_tissue(slide), thumbnail)
            raise
        info.update(tile_count=len(grid), level_read=grid.level, read_size=grid.read_size,
                    patch_size_level0=grid.patch_size_level0, mpp_used=grid.mpp,
                    mpp_source=grid.mpp_source,
                    tissue_fraction=round(grid.tissue.tissue_fraction, 4))
        if thumbnail:
            _write_thumbnail(slide, grid.tissue, thumbnail)
            info["thumbnail"] = str(thumbnail)
    return info


def _write_thumbnail(slide, tissue, out: str) -> None:
    import cv2
    import numpy as np

    thumb = slide.thumbnail(max(tissue.mask.shape))
    bgr = np.ascontiguousarray(thumb[..., ::-1])
    dx, dy = tissue.downsample
    contours = [np.round(c / (dx, dy)).astype(np.int32).reshape(-1, 1, 2)
                for c in tissue.contours]
    cv2.drawContours(bgr, contours, -1, (0, 200, 0), 2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), bgr):
        from care_scale.exceptions import StorageError

        raise StorageError(f"{out}: could not write the thumbnail PNG")
