"""One feature vector per slide from the tables, for probes: slide, ROI or mean of regions.

- ``slide``: ``slides.slide_embedding`` (CARE's fused slide embedding);
- ``roi``: ``slides.roi_embedding`` (the region with the largest fused weight: the paper's
  ROI feature);
- ``regions_mean``: the unweighted mean of the slide's ``regions.embedding`` rows (every
  adaptive region counts once, whatever its size: the fused slide embedding already is the
  size- and attention-weighted view).

Only slides with a ``slides`` row are used: that row is written last and marks a slide
complete, so regions of a slide whose run crashed are never averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from care_scale.choices import FeatureKind, values
from care_scale.exceptions import ConfigError, TableError
from care_scale.storage import redact
from care_scale.warehouse import Warehouse
from care_scale.warehouse.versions import pick_model_version

FEATURES: tuple[str, ...] = values(FeatureKind)


@dataclass
class SlideVectors:
    model_version: str
    slide_ids: list[str]
    vectors: np.ndarray  # (n_slides, D) float32, rows in slide_ids order
    metadata: list[dict[str, str]]  # each slide's manifest metadata (case_id lives here)


def _fixed_list_to_numpy(col: Any) -> np.ndarray:
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1).astype(np.float32, copy=False)


def load_slide_vectors(wh: Warehouse, *, feature: FeatureKind = "slide",
                       model_version: str | None = None) -> SlideVectors:
    """Every complete slide's vector of one model version (chosen, or the only one)."""
    if feature not in FEATURES:
        raise ConfigError(f"unknown --feature {feature!r}; use {', '.join(FEATURES)}")
    dt = wh.open("slides")
    if dt is None:
        raise TableError("slides", f"no table at {redact(wh.table_uri('slides'))}")
    versions = dt.to_pyarrow_table(columns=["model_version"]).column("model_version")
    mv = pick_model_version(versions.to_pylist(), model_version, table="slides")
    cols = ["slide_id", "metadata"] + (["roi_embedding"] if feature == "roi" else
                                       ["slide_embedding"] if feature == "slide" else [])
    t = dt.to_pyarrow_table(columns=cols, filters=[("model_version", "=", mv)])
    ids = t.column("slide_id").to_pylist()
    meta = [dict(m or []) for m in t.column("metadata").to_pylist()]
    if feature != "regions_mean":
        vecs = _fixed_list_to_numpy(t.column(cols[-1]))
        return SlideVectors(mv, ids, vecs, meta)
    rdt = wh.open("regions")
    if rdt is None:
        raise TableError("regions", f"no table at {redact(wh.table_uri('regions'))}")
    r = rdt.to_pyarrow_table(columns=["slide_id", "embedding"],
                             filters=[("model_version", "=", mv)])
    emb = _fixed_list_to_numpy(r.column("embedding")).astype(np.float64)
    pos = {sid: i for i, sid in enumerate(ids)}
    # Regions of slides without a slides row (an unfinished run) are left out here.
    rows = np.array([pos.get(s, -1) for s in r.column("slide_id").to_pylist()], np.int64)
    keep = rows >= 0
    sums = np.zeros((len(ids), emb.shape[1]))
    np.add.at(sums, rows[keep], emb[keep])
    counts = np.bincount(rows[keep], minlength=len(ids))
    if (counts == 0).any():
        missing = [ids[i] for i in np.nonzero(counts == 0)[0][:5]]
        raise TableError("regions", f"{int((counts == 0).sum())} slides of model version {mv} "
                                    f"have no region rows (e.g. {', '.join(missing)})")
    return SlideVectors(mv, ids, (sums / counts[:, None]).astype(np.float32), meta)
