"""Nearest slides or regions by cosine similarity, in DuckDB over the warehouse tables.

One SQL query per call: the query vector is selected in a CTE and every candidate row of the
same model version is scored with ``list_cosine_similarity`` (embeddings are ``FLOAT[]`` lists
through ``delta_scan``), then ``ORDER BY ... LIMIT k``. DuckDB keeps only the top k while it
scans (a heap), so memory stays flat; time is one pass over the embedding column
(``benchmarks/bench_similar.py`` measures it at 1M regions).

Levels:

- ``slide``: slide embeddings of the other slides;
- ``roi``: ROI embeddings of the other slides (``slides.roi_embedding``);
- ``region``: regions of the other slides, nearest to one region of the query slide (its ROI
  unless ``region_id`` is given). The query slide's own regions are left out: they are near
  by construction and would crowd out every other slide.

Only complete slides (with a ``slides`` row) are candidates, as everywhere else.
"""

from __future__ import annotations

from typing import Any

from care_scale.choices import Level, values
from care_scale.exceptions import ConfigError, TableError
from care_scale.storage import redact
from care_scale.warehouse.versions import pick_model_version

LEVELS: tuple[str, ...] = values(Level)

_SLIDE_SQL = """
WITH q AS (SELECT {col} AS e FROM slides WHERE slide_id = ? AND model_version = ?)
SELECT s.slide_id,
       list_cosine_similarity(s.{col}, q.e) AS similarity,
       1 - list_cosine_similarity(s.{col}, q.e) AS distance,
       s.cohort, s.num_patches, s.num_regions, s.roi_region_id, s.source_uri
FROM slides s, q
WHERE s.model_version = ? AND s.slide_id <> ?
ORDER BY similarity DESC, s.slide_id
LIMIT ?
"""

_REGION_SQL = """
WITH q AS (SELECT embedding AS e FROM regions
           WHERE slide_id = ? AND model_version = ? AND region_id = ?)
SELECT r.slide_id, r.region_id,
       list_cosine_similarity(r.embedding, q.e) AS similarity,
       1 - list_cosine_similarity(r.embedding, q.e) AS distance,
       r.num_patches, r.coverage, r.is_roi, r.bbox_x0, r.bbox_y0, r.bbox_x1, r.bbox_y1,
       s.cohort
FROM regions r
JOIN slides s ON s.slide_id = r.slide_id AND s.model_version = r.model_version, q
WHERE r.model_version = ? AND r.slide_id <> ?
ORDER BY similarity DESC, r.slide_id, r.region_id
LIMIT ?
"""


def similar(warehouse: str, slide_id: str, *, k: int = 10, level: Level = "slide",
            region_id: int | None = None, model_version: str | None = None,
            storage_options: dict[str, Any] | None = None) -> Any:
    """The ``k`` nearest slides (``level="slide"``/``"roi"``) or regions (``"region"``) of
    ``slide_id``, most similar first, as a ``pyarrow.Table`` with ``similarity`` (cosine) and
    ``distance`` (1 - cosine) and the rows' metadata."""
    import duckdb

    from care_scale.query.duckdb import connect_duckdb

    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; use {', '.join(LEVELS)}")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    con = connect_duckdb(warehouse, storage_options=storage_options)
    try:
        views = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views() "
                                       "WHERE NOT internal").fetchall()}
        for need in ("slides", "regions") if level == "region" else ("slides",):
            if need not in views:
                raise TableError(need, f"no table in {redact(warehouse)}")
        rows = con.execute("SELECT model_version, roi_region_id FROM slides WHERE slide_id = ?",
                           [slide_id]).fetchall()
        if not rows:
            raise TableError("slides", f"no slide {slide_id!r} in {redact(warehouse)}")
        mv = pick_model_version((r[0] for r in rows), model_version, table="slides")
        if level == "region":
            rid = region_id if region_id is not None else dict(rows)[mv]
            found = con.execute("SELECT count(*) FROM regions WHERE slide_id = ? AND "
                                "model_version = ? AND region_id = ?",
                                [slide_id, mv, rid]).fetchone()[0]
            if not found:
                raise TableError("regions", f"slide {slide_id!r} has no region {rid} "
                                            f"(model version {mv})")
            return con.execute(_REGION_SQL, [slide_id, mv, rid, mv, slide_id, k]
                               ).to_arrow_table()
        col = "slide_embedding" if level == "slide" else "roi_embedding"
        return con.execute(_SLIDE_SQL.format(col=col), [slide_id, mv, mv, slide_id, k]
                           ).to_arrow_table()
    except duckdb.Error as exc:
        raise TableError("slides", f"{redact(warehouse)}: {redact(exc)}") from exc
    finally:
        con.close()
