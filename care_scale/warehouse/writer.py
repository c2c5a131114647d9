"""The Delta Lake warehouse: slides, regions, patches, failures, runs under one URI.

Exactly once per (slide_id, model_version): every write is a MERGE on the table's keys
(``schemas.KEYS``) with ``when_matched_update_all`` + ``when_not_matched_insert_all`` and, for
the slides being written, ``when_not_matched_by_source_delete`` (rows of those slides that a
crashed earlier attempt left and this attempt does not produce). Re-writing a slide therefore
converges to one clean write, whatever was committed before. We chose MERGE over
``app_transactions`` because transaction ids dedupe whole commits, while a re-run batches
different slides per commit; MERGE dedupes per row.

Order: patches, then regions, then slides LAST; a slide is visible (and counted as done by
``completed_slide_ids``) only when its other rows are committed. One commit per table per call.

Concurrency: deltalake detects conflicts and retries itself; when it gives up
(``CommitFailedError``) we reload the table and redo the whole MERGE with jittered
exponential back-off, so no rows are lost.

S3: deltalake commits with conditional PUT. On AWS nothing is needed beyond credentials.
S3-compatible servers (MinIO, moto, Ceph) need ``aws_conditional_put=etag`` (and
``aws_allow_http=true`` for http endpoints); ``care_scale.storage.to_delta`` sets both when a
custom endpoint is given.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from care_scale.exceptions import SchemaVersionError, TableError
from care_scale.storage import join, redact, to_delta
from care_scale.warehouse import schemas as S
from care_scale.warehouse.rows import FailureRow, SlideResult

MAX_ATTEMPTS = 30


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


class Warehouse:
    """Delta tables of one warehouse URI (local path or ``s3://``)."""

    def __init__(self, uri: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = str(uri).rstrip("/")
        self.storage_options = dict(storage_options or {})

    # -- tables ---------------------------------------------------------------------------
    def table_uri(self, name: str) -> str:
        if name not in S.TABLES:
            raise TableError(name, f"unknown table; known: {', '.join(S.TABLES)}")
        return join(self.uri, name)

    def _opts(self, name: str) -> dict[str, str]:
        return to_delta(self.storage_options, self.table_uri(name))

    def open(self, name: str):
        """The DeltaTable ``name``, or None when it does not exist; checks the schema version."""
        from deltalake import DeltaTable

        uri = self.table_uri(name)
        if not DeltaTable.is_deltatable(uri, storage_options=self._opts(name)):
            return None
        dt = DeltaTable(uri, storage_options=self._opts(name))
        found = dt.metadata().configuration.get(S.VERSION_KEY)
        if found != str(S.SCHEMA_VERSION):
            raise SchemaVersionError(name,
                f"at {redact(uri)} has schema version {found}, this care-scale "
                f"writes {S.SCHEMA_VERSION}; migrate or use a new warehouse")
        return dt

    def _create(self, name: str, schema: pa.Schema):
        from deltalake import DeltaTable

        DeltaTable.create(self.table_uri(name), schema, mode="ignore",
                          configuration={S.VERSION_KEY: str(S.SCHEMA_VERSION)},
                          storage_options=self._opts(name),
                          # Our own (non-"delta.") property key; the kernel rejects unknown
                          # keys unless told to keep them.
                          raise_if_key_not_exists=False)
        return self.open(name)

    def ensure_tables(self) -> None:
        """Create ``failures`` and ``runs`` (the embedding tables need the model's width and
        are created on the first write); check versions of the ones that exist."""
        self._create("failures", S.FAILURES_SCHEMA)
        self._create("runs", S.RUNS_SCHEMA)
        for name in ("slides", "regions", "patches"):
            self.open(name)

    def ensure_embedding_tables(self, dim: int, feature_dim: int | None = None) -> None:
        self._create("slides", S.slides_schema(dim))
        self._create("regions", S.regions_schema(dim))
        if feature_dim is not None:
            self._create("patches", S.patches_schema(feature_dim))

    def read(self, name: str) -> pa.Table:
        dt = self.open(name)
        if dt is None:
            raise TableError(name, f"no table at {redact(self.table_uri(name))}")
        return dt.to_pyarrow_table()

    def completed_slide_ids(self, model_version: str) -> set[str]:
        dt = self.open("slides")
        if dt is None:
            return set()
        t = dt.to_pyarrow_table(columns=["slide_id", "model_version"])
        ids = t.column("slide_id").to_pylist()
        mv = t.column("model_version").to_pylist()
        return {s for s, m in zip(ids, mv) if m == model_version}

    # -- commits --------------------------------------------------------------------------
    def _retry(self, name: str, op: Callable[[], Any]) -> Any:
        """Run ``op`` (which reloads the table itself) until it commits."""
        from deltalake.exceptions import CommitFailedError

        for attempt in range(MAX_ATTEMPTS):
            try:
                return op()
            except CommitFailedError as exc:
                if attempt == MAX_ATTEMPTS - 1:
                    raise TableError(name, f"commit failed {MAX_ATTEMPTS} times: "
                                           f"{redact(exc)}") from exc
                # Jittered exponential back-off: concurrent writers spread out.
                time.sleep(min(5.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
        return None

    def _merge(self, name: str, source: pa.Table, *, replace_slides: list[tuple[str, str]]
               | None = None) -> None:
        keys = S.KEYS[name]
        pred = " AND ".join(f"t.{k} = s.{k}" for k in keys)

        def op() -> None:
            dt = self.open(name)
            m = dt.merge(source, pred, source_alias="s", target_alias="t")
            m = m.when_matched_update_all().when_not_matched_insert_all()
            if replace_slides:
                # Rows of these slides a crashed attempt left behind and this write lacks.
                mv = sorted({v for _, v in replace_slides})
                ids = sorted({s for s, _ in replace_slides})
                cond = (f"t.slide_id IN ({', '.join(map(_sql_str, ids))}) AND "
                        f"t.model_version IN ({', '.join(map(_sql_str, mv))})")
                m = m.when_not_matched_by_source_delete(cond)
            m.execute()

        self._retry(name, op)

    # -- rows -> arrow --------------------------------------------------------------------
    @staticmethod
    def _slides_table(results: list[SlideResult], dim: int) -> pa.Table:
        schema = S.slides_schema(dim)
        rows = []
        for r in results:
            row = {f.name: r.slide.get(f.name) for f in schema}
            for k in ("slide_embedding", "roi_embedding"):
                row[k] = np.asarray(row[k], np.float32).ravel().tolist()
            meta = r.slide.get("metadata") or {}
            row["metadata"] = [(str(k), None if v is None else str(v)) for k, v in meta.items()]
            if row["metadata_json"] is None:
                row["metadata_json"] = json.dumps(meta, sort_keys=True, default=str)
            row["embedded_at"] = _ts(row["embedded_at"] or time.time())
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=schema)

    @staticmethod
    def _regions_table(results: list[SlideResult], dim: int) -> pa.Table:
        schema = S.regions_schema(dim)
        rows = []
        for r in results:
            for reg in r.regions:
                row = {f.name: reg.get(f.name) for f in schema}
                row.update(slide_id=r.slide_id, model_version=r.model_version,
                           run_id=r.slide.get("run_id"))
                row["embedding"] = np.asarray(row["embedding"], np.float32).ravel().tolist()
                rows.append(row)
        return pa.Table.from_pylist(rows, schema=schema)

    @staticmethod
    def _patches_table(results: list[SlideResult], dim: int) -> pa.Table:
        schema = S.patches_schema(dim)
        parts = []
        for r in results:
            p = r.patches
            if p is None:
                continue
            feats = np.ascontiguousarray(np.asarray(p["feature"], np.float32))
            n = len(feats)
            cols = {
                "slide_id": pa.array([r.slide_id] * n, pa.string()),
                "model_version": pa.array([r.model_version] * n, pa.string()),
                "x": pa.array(np.asarray(p["x"], np.int64)),
                "y": pa.array(np.asarray(p["y"], np.int64)),
                "patch_size_level0": pa.array(np.asarray(p["patch_size_level0"], np.int64)),
                "region_id": pa.array(np.asarray(p["region_id"], np.int64)),
                "tissue_fraction": pa.array(np.asarray(p["tissue_fraction"], np.float32)),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), dim),
            }
            parts.append(pa.table(cols, schema=schema))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    # -- public writes --------------------------------------------------------------------
    def write_results(self, results: list[SlideResult]) -> None:
        """Commit patches (if kept), then regions, then slides last: one MERGE per table."""
        if not results:
            return
        dim = len(np.asarray(results[0].slide["slide_embedding"]).ravel())
        with_patches = [r for r in results if r.patches is not None]
        fdim = (np.asarray(with_patches[0].patches["feature"]).shape[1]
                if with_patches else None)
        self.ensure_embedding_tables(dim, fdim)
        if with_patches:
            self.write_patches(with_patches, fdim)
        self.write_regions(results, dim)
        self.write_slides(results, dim)

    # The three steps are public so tests can simulate a crash between them.
    def write_patches(self, results: list[SlideResult], dim: int) -> None:
        self._merge("patches", self._patches_table(results, dim),
                    replace_slides=[(r.slide_id, r.model_version) for r in results])

    def write_regions(self, results: list[SlideResult], dim: int) -> None:
        self._merge("regions", self._regions_table(results, dim),
                    replace_slides=[(r.slide_id, r.model_version) for r in results])

    def write_slides(self, results: list[SlideResult], dim: int) -> None:
        self._merge("slides", self._slides_table(results, dim))

    def record_failures(self, failures: list[FailureRow]) -> None:
        if not failures:
            return
        self._create("failures", S.FAILURES_SCHEMA)
        rows = [{**f.__dict__, "failed_at": _ts(f.failed_at)} for f in failures]
        self._merge("failures", pa.Table.from_pylist(rows, schema=S.FAILURES_SCHEMA))

    def start_run(self, run_id: str, config: dict[str, Any]) -> None:
        self._create("runs", S.RUNS_SCHEMA)
        row = {"run_id": run_id, "config_json": json.dumps(config, sort_keys=True, default=str),
               "started_at": _ts(time.time()), "finished_at": None, "counts_json": None}
        self._merge("runs", pa.Table.from_pylist([row], schema=S.RUNS_SCHEMA))

    def finish_run(self, run_id: str, counts: dict[str, Any]) -> None:
        self._create("runs", S.RUNS_SCHEMA)
        src = pa.Table.from_pylist([{"run_id": run_id, "finished_at": _ts(time.time()),
                                     "counts_json": json.dumps(counts, sort_keys=True)}],
                                   schema=pa.schema([S.RUNS_SCHEMA.field(n) for n in (
                                       "run_id", "finished_at", "counts_json")]))

        def op() -> None:
            dt = self.open("runs")
            (dt.merge(src, "t.run_id = s.run_id", source_alias="s", target_alias="t")
             .when_matched_update({"finished_at": "s.finished_at",
                                   "counts_json": "s.counts_json"})
             .execute())

        self._retry("runs", op)

    # -- maintenance ----------------------------------------------------------------------
    def _existing(self, table: str | None) -> list[str]:
        names = [table] if table else list(S.TABLES)
        return [n for n in names if self.open(n) is not None]

    def optimize(self, table: str | None = None) -> dict[str, Any]:
        return {n: self._retry(n, lambda n=n: self.open(n).optimize.compact())
                for n in self._existing(table)}

    def vacuum(self, table: str | None = None, *, retention_hours: int = 168,
               dry_run: bool = False) -> dict[str, list[str]]:
        return {n: self.open(n).vacuum(retention_hours=retention_hours, dry_run=dry_run,
                                       enforce_retention_duration=retention_hours >= 168)
                for n in self._existing(table)}

    def history(self, table: str | None = None, limit: int | None = None
                ) -> dict[str, list[dict[str, Any]]]:
        return {n: self.open(n).history(limit) for n in self._existing(table)}
