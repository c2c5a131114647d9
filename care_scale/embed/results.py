"""One slide's CARE output -> the rows the warehouse stores (slides, regions, patches).

The slide-encoder actor (``slide_stage``) hands a slide's assembled patch features here once
all its tiles are encoded; CARE runs on them and the result becomes a
:class:`care_scale.warehouse.SlideResult`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from care_scale.embed.geometry import region_wkt
from care_scale.embed.sources import SlideSource
from care_scale.storage import redact

# Stages named in the failures table.
STAGE_OPEN = "open"
STAGE_TILE = "tile"
STAGE_DECODE = "decode"
STAGE_ENCODE = "encode"
STAGE_FEATURES = "features"
STAGE_SLIDE_ENCODER = "slide_encoder"


@dataclass(frozen=True)
class RowContext:
    """What every row of one run shares; small and picklable (it travels to the actors)."""

    run_id: str
    version: str
    care_version: str
    patch_version: str
    keep_patches: bool



def _at(values: Any, r: int) -> float | None:
    return None if values is None else float(values[r])


def region_rows(encoding: Any, coords: np.ndarray, patch_size_level0: int,
                step: int) -> list[dict[str, Any]]:
    """One dict per adaptive region: counts, weights, ROI flag, level-0 box, WKT, embedding.
    A model that does not say which patches form a region (a remote-code model) gets rows
    with its embedding and nulls for the patches, outline, box and whatever else it hides."""
    if encoding.region_of_patch is None:
        roi = encoding.roi_index
        return [{"region_id": r, "embedding": np.asarray(encoding.region_embeddings[r],
                                                         np.float32),
                 "coverage": _at(encoding.coverage, r),
                 "semantic_weight": _at(encoding.semantic_weight, r),
                 "fused_weight": _at(encoding.fused_weight, r),
                 "is_roi": None if roi is None else r == int(roi)}
                for r in range(int(encoding.num_regions))]
    rows = []
    rop = np.asarray(encoding.region_of_patch)
    for r in range(int(encoding.num_regions)):
        sel = rop == r
        c = coords[sel]
        if len(c) == 0:  # CARE keeps only non-empty regions; guard against a stray index
            continue
        rows.append({
            "region_id": r,
            "num_patches": int(sel.sum()),
            "coverage": _at(encoding.coverage, r),
            "semantic_weight": _at(encoding.semantic_weight, r),
            "fused_weight": _at(encoding.fused_weight, r),
            "is_roi": None if encoding.roi_index is None else r == int(encoding.roi_index),
            "bbox_x0": int(c[:, 0].min()),
            "bbox_y0": int(c[:, 1].min()),
            "bbox_x1": int(c[:, 0].max()) + int(patch_size_level0),
            "bbox_y1": int(c[:, 1].max()) + int(patch_size_level0),
            "geometry": region_wkt(c, step),
            "embedding": np.asarray(encoding.region_embeddings[r], np.float32),
        })
    return rows


def encode_slide(care: Any, coords: np.ndarray, features: np.ndarray, step: int) -> Any:
    """CARE on one slide (numpy SlideEncoding): the torch model, or an ONNX Runtime
    :class:`care_scale.inference.SlideBackend` (no torch imported for it)."""
    from care_scale.inference.base import SlideBackend

    if isinstance(care, SlideBackend):
        return care.encode(features, coords, patch_step=int(step))
    import torch

    with torch.inference_mode():
        return care.encode(features, coords, patch_step=int(step))


def slide_row(ctx: RowContext, src: SlideSource, meta: dict[str, Any], encoding: Any,
              n_patches: int, backend: str) -> dict[str, Any]:
    return {
        "slide_id": src.slide_id,
        "source_uri": redact(src.uri),  # a presigned URL's signature is not stored
        "source_size": meta.get("source_size"),
        "source_etag": meta.get("source_etag"),
        "width": meta.get("width"),
        "height": meta.get("height"),
        "mpp": meta.get("mpp"),
        "mpp_source": meta.get("mpp_source"),
        "target_mpp": meta.get("target_mpp"),
        "patch_size": meta.get("patch_size"),
        "patch_size_level0": meta.get("patch_size_level0"),
        "num_patches": int(n_patches),
        "num_regions": int(encoding.num_regions),
        "slide_embedding": np.asarray(encoding.slide_embedding, np.float32),
        "roi_region_id": None if encoding.roi_index is None else int(encoding.roi_index),
        "roi_embedding": (None if encoding.roi_embedding is None
                          else np.asarray(encoding.roi_embedding, np.float32)),
        "model_version": ctx.version,
        "slide_encoder_version": ctx.care_version,
        "patch_encoder_version": ctx.patch_version,
        "backend": backend,
        "slide_backend": meta.get("slide_backend"),
        "run_id": ctx.run_id,
        "cohort": src.cohort,
        # The manifest's columns, and what an annotation file did (care_scale.annotations).
        "metadata": {**src.metadata, **(meta.get("annotations") or {})},
        "metadata_json": json.dumps({**src.metadata, **(meta.get("annotations") or {})},
                                    sort_keys=True),
        "embedded_at": time.time(),
    }


def patch_columns(src: SlideSource, coords: np.ndarray, tissue: np.ndarray, feats: np.ndarray,
                  encoding: Any, patch_size_level0: int) -> dict[str, np.ndarray]:
    n = len(coords)
    return {
        "slide_id": np.array([src.slide_id] * n, dtype=object),
        "x": coords[:, 0].astype(np.int64),
        "y": coords[:, 1].astype(np.int64),
        "patch_size_level0": np.full(n, int(patch_size_level0), np.int64),
        "region_id": (None if encoding.region_of_patch is None
                      else np.asarray(encoding.region_of_patch, np.int64)),
        "tissue_fraction": np.asarray(tissue, np.float32),
        "feature": np.asarray(feats, np.float32),
    }


def build_result(care: Any, ctx: RowContext, src: SlideSource, meta: dict[str, Any],
                 coords: np.ndarray, tissue: np.ndarray, feats: np.ndarray, *,
                 backend: str) -> Any:
    """CARE on one slide's features -> a ``SlideResult`` for ``Warehouse.write_files``.
    ``backend``: the patch-encoder backend that made the features."""
    from care_scale.warehouse import SlideResult

    step = int(meta["step_level0"])
    psl0 = int(meta["patch_size_level0"])
    enc = encode_slide(care, coords, feats, step)
    slide = slide_row(ctx, src, meta, enc, len(coords), backend)
    regions = region_rows(enc, coords, psl0, step)
    patches = (patch_columns(src, coords, tissue, feats, enc, psl0)
               if ctx.keep_patches else None)
    return SlideResult(slide=slide, regions=regions, patches=patches)


def feature_file_meta(row: dict[str, Any], coords: np.ndarray, patch_size_level0: int | None,
                      step: int, target_mpp: float) -> dict[str, Any]:
    """The per-slide metadata a precomputed feature file gives (no slide was opened)."""
    return {
        "uri": row["uri"],
        "source_size": None,
        "source_etag": None,
        "width": int(coords[:, 0].max() + step),
        "height": int(coords[:, 1].max() + step),
        "mpp": row.get("mpp"),
        "mpp_source": "override" if row.get("mpp") else None,
        "target_mpp": target_mpp,
        "level": 0,
        "patch_size": int(patch_size_level0 or step),
        "patch_size_level0": int(patch_size_level0 or step),
        "step_level0": int(step),
        "slide_backend": "features",
        "vendor": None,
        "objective_power": None,
    }


def build_failure(ctx: RowContext, src: SlideSource, stage: str, error_type: str, message: str) -> Any:
    from care_scale.warehouse import FailureRow

    return FailureRow(slide_id=src.slide_id, uri=redact(src.uri), run_id=ctx.run_id,
                      stage=stage,
                      error_type=error_type, message=redact(message),
                      model_version=ctx.version)
