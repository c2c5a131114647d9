"""The Delta Lake warehouse: slides, regions, patches, failures, runs under one URI.

Who writes what. The embedding tables (slides, regions, patches) are written as data files by
the workers that compute the rows (``write_files``: one Parquet file per table per slide, see
``files``); the driver only commits them (``commit``), from the files' metadata. ``failures``
and ``runs`` hold one small row per slide or run and are MERGEd by the driver.

Exactly once per (slide_id, model_version). A commit of a table is one transaction that adds
the new files and removes every active file holding rows of the same (slide_id,
model_version): files of a crashed attempt that got as far as this table, or of a concurrent
job that embedded the same slide. Re-writing a slide therefore converges to one clean write,
whatever was committed before. Each file holds one slide, so its statistics say exactly which
key it holds and the removal is part of the same atomic commit. A file holding several slides
(``optimize`` compacts them; tables written by care-scale before data files) is rewritten
without those slides by a ``delete`` first. We chose replacing files over ``app_transactions``
because transaction ids dedupe whole commits, while a re-run batches different slides per
commit.

Order: patches, then regions, then slides LAST; a slide is visible (and counted as done by
``completed_slide_ids``) only when its other rows are committed. One commit per table per call.

Concurrency: every data-file commit is made at exactly the version it was planned on
(``max_commit_retries=0``), so a concurrent writer's commit in between fails it with
``CommitFailedError``; we then reload the table, plan the removals again (now seeing the other
writer's files) and retry with jittered exponential back-off. Without that, deltalake would
rebase a blind append over a concurrent append of the same slide and keep both. MERGEs
(failures, runs) keep deltalake's own conflict resolution, retried the same way.

S3: deltalake commits with conditional PUT. On AWS nothing is needed beyond credentials.
S3-compatible servers (MinIO, moto, Ceph) need ``aws_conditional_put=etag`` (and
``aws_allow_http=true`` for http endpoints); ``care_scale.storage.to_delta`` sets both when a
custom endpoint is given.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from care_scale.exceptions import SchemaVersionError, TableError
from care_scale.storage import join, redact, store_error, to_delta, url_to_fs
from care_scale.warehouse import schemas as S
from care_scale.warehouse.files import DataFile, write_data_file
from care_scale.warehouse.rows import FailureRow, SlideResult

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 30
# Transient store errors (resets, timeouts, 5xx) retried per operation, on top of the
# store client's own retries.
MAX_TRANSIENT = 6
# The tables whose rows workers write as data files, in commit order (slides last).
FILE_TABLES = ("patches", "regions", "slides")
_FILE_SCHEMAS = {"slides": S.slides_schema, "regions": S.regions_schema,
                 "patches": S.patches_schema}


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _keys_predicate(keys: set[tuple[str, str]]) -> str:
    by_version: dict[str, list[str]] = {}
    for sid, mv in sorted(keys):
        by_version.setdefault(mv, []).append(sid)
    return " OR ".join(f"(model_version = {_sql_str(mv)} AND slide_id IN "
                       f"({', '.join(map(_sql_str, ids))}))" for mv, ids in by_version.items())


def _vector(value: Any) -> list[float] | None:
    """An embedding as a list for arrow; None (a model that does not expose it) -> null."""
    return None if value is None else np.asarray(value, np.float32).ravel().tolist()


def result_dims(result: SlideResult) -> dict[str, int]:
    """Embedding width of each table one slide's rows go to."""
    dim = len(np.asarray(result.slide["slide_embedding"]).ravel())
    dims = {"slides": dim, "regions": dim}
    if result.patches is not None:
        dims["patches"] = int(np.asarray(result.patches["feature"]).shape[1])
    return dims


def replaced_files(dt: Any, keys: set[tuple[str, str]]
                   ) -> tuple[list[tuple[str, int]], list[str]]:
    """Active files holding rows of ``keys`` ((slide_id, model_version) pairs), from their
    statistics: ``exact`` files hold one of the keys and nothing else (path, size); ``loose``
    files may hold one of them among other slides, or have no statistics."""
    acts = pa.table(dt.get_add_actions(flatten=True))
    if acts.num_rows == 0:
        return [], []
    cols = set(acts.column_names)

    def col(name: str) -> list[Any]:
        return acts.column(name).to_pylist() if name in cols else [None] * acts.num_rows

    sids = sorted({s for s, _ in keys})
    versions = {v for _, v in keys}
    exact: list[tuple[str, int]] = []
    loose: list[str] = []
    for path, size, s0, s1, v0, v1 in zip(col("path"), col("size_bytes"), col("min.slide_id"),
                                         col("max.slide_id"), col("min.model_version"),
                                         col("max.model_version")):
        if v0 is not None and v0 == v1 and v0 not in versions:
            continue  # another model version's rows only
        if s0 is not None and s0 == s1 and v0 is not None and v0 == v1:
            if (s0, v0) in keys:
                exact.append((path, int(size)))
            continue
        # A range (or no statistics): may hold one of the keys. Prefix comparison, because
        # writers may truncate long string statistics.
        if s0 is None or s1 is None or any(s0 <= s and s[:len(s1)] <= s1 for s in sids):
            loose.append(path)
    return exact, loose


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
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=self._opts(name)):
                return None
            dt = DeltaTable(uri, storage_options=self._opts(name))
        except OSError as exc:  # the store itself: wrong bucket, endpoint, credentials
            raise store_error(f"table {name} at {redact(uri)}", exc) from None
        found = dt.metadata().configuration.get(S.VERSION_KEY)
        if found != str(S.SCHEMA_VERSION):
            raise SchemaVersionError(name,
                f"at {redact(uri)} has schema version {found}, this care-scale "
                f"writes {S.SCHEMA_VERSION}; migrate or use a new warehouse")
        return dt

    def _create(self, name: str, schema: pa.Schema):
        """The table ``name``, created if absent. Idempotent under races: when several
        writers create a fresh warehouse at once, all but one commit of version 0 fail
        (``CommitFailedError``: protocol changed); the losers then find the winner's table."""
        from deltalake import DeltaTable
        from deltalake.exceptions import CommitFailedError

        for attempt in range(MAX_ATTEMPTS):
            dt = self.open(name)
            if dt is not None:
                return dt
            try:
                DeltaTable.create(self.table_uri(name), schema, mode="ignore",
                                  configuration={S.VERSION_KEY: str(S.SCHEMA_VERSION)},
                                  storage_options=self._opts(name),
                                  # Our own (non-"delta.") property key; the kernel rejects
                                  # unknown keys unless told to keep them.
                                  raise_if_key_not_exists=False)
            except CommitFailedError as exc:
                if attempt == MAX_ATTEMPTS - 1:
                    raise TableError(name, f"could not create it at "
                                           f"{redact(self.table_uri(name))}: {redact(exc)}"
                                     ) from exc
                time.sleep(0.02 * (0.5 + random.random()))  # another writer's create won
        return self.open(name)

    def ensure_tables(self) -> None:
        """Create ``failures`` and ``runs`` (the embedding tables need the model's width and
        are created on the first write); check versions of the ones that exist."""
        self._create("failures", S.FAILURES_SCHEMA)
        self._create("runs", S.RUNS_SCHEMA)
        for name in ("slides", "regions", "patches"):
            self.open(name)

    def ensure_embedding_tables(self, dim: int, feature_dim: int | None = None) -> None:
        for name in ("slides", "regions"):
            self._ensure_file_table(name, dim)
        if feature_dim is not None:
            self._ensure_file_table("patches", feature_dim)

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

    def known_slide_ids(self) -> set[str]:
        """Every slide id in the slides table, whatever its model version."""
        dt = self.open("slides")
        if dt is None:
            return set()
        return set(dt.to_pyarrow_table(columns=["slide_id"]).column("slide_id").to_pylist())

    def run_configs(self) -> list[dict[str, Any]]:
        """Every run's recorded config, oldest first ([] before the first run)."""
        dt = self.open("runs")
        if dt is None:
            return []
        t = dt.to_pyarrow_table(columns=["config_json", "started_at"]).sort_by("started_at")
        return [json.loads(c) for c in t.column("config_json").to_pylist() if c]

    # -- commits --------------------------------------------------------------------------
    def _retry(self, name: str, op: Callable[[], Any]) -> Any:
        """Run ``op`` (which reloads the table itself) until it commits."""
        from deltalake.exceptions import CommitFailedError

        transient = 0
        for attempt in range(MAX_ATTEMPTS):
            try:
                return op()
            except CommitFailedError as exc:
                if attempt == MAX_ATTEMPTS - 1:
                    raise TableError(name, f"commit failed {MAX_ATTEMPTS} times: "
                                           f"{redact(exc)}") from exc
            except OSError as exc:
                # A reset, timeout or 5xx the object store client gave up on: retried a
                # few times with the same back-off. Each op reloads the table; a repeat
                # after an applied-but-unanswered commit is harmless for commit_files (it
                # finds its own files) and for keyed merges (failures, runs); only a probes
                # append could repeat its row (same probe_id). Others surface at once.
                err = store_error(f"table {name} at {redact(self.table_uri(name))}", exc)
                transient += 1
                if not err.transient or transient > MAX_TRANSIENT:
                    raise err from None
                log.warning("%s; retrying", err)
            # Jittered exponential back-off: concurrent writers spread out.
            time.sleep(min(5.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
        # Only reached when the last attempt met a transient error: never report success.
        raise TableError(name, f"no commit after {MAX_ATTEMPTS} attempts (conflicts and "
                               "store errors)")

    def _merge(self, name: str, source: pa.Table) -> None:
        keys = S.KEYS[name]
        pred = " AND ".join(f"t.{k} = s.{k}" for k in keys)

        def op() -> None:
            dt = self.open(name)
            m = dt.merge(source, pred, source_alias="s", target_alias="t")
            m.when_matched_update_all().when_not_matched_insert_all().execute()

        self._retry(name, op)

    # -- rows -> arrow --------------------------------------------------------------------
    @staticmethod
    def _slides_table(results: list[SlideResult], dim: int) -> pa.Table:
        schema = S.slides_schema(dim)
        rows = []
        for r in results:
            row = {f.name: r.slide.get(f.name) for f in schema}
            for k in ("slide_embedding", "roi_embedding"):
                row[k] = _vector(row[k])
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
                row["embedding"] = _vector(row["embedding"])
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
                "region_id": (pa.nulls(n, pa.int64()) if p["region_id"] is None
                              else pa.array(np.asarray(p["region_id"], np.int64))),
                "tissue_fraction": pa.array(np.asarray(p["tissue_fraction"], np.float32)),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), dim),
            }
            parts.append(pa.table(cols, schema=schema))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    # -- data files (workers) ---------------------------------------------------------------
    def _table_for(self, name: str, result: SlideResult, dim: int) -> pa.Table:
        build = getattr(self, f"_{name}_table")  # _slides_table, _regions_table, ...
        return build([result], dim)

    def write_files(self, results: list[SlideResult]) -> list[DataFile]:
        """Write each slide's rows as new data files (one per table; patches only if kept);
        nothing is visible until ``commit``. Runs wherever the rows are (a worker)."""
        files = []
        for r in results:
            dims = result_dims(r)
            for name in FILE_TABLES:
                if name == "patches" and r.patches is None:
                    continue
                files.append(self._write_file(name, r, dims[name]))
        return files

    def _write_file(self, name: str, result: SlideResult, dim: int) -> DataFile:
        return write_data_file(self.table_uri(name), name, self._table_for(name, result, dim),
                               slide_id=result.slide_id, model_version=result.model_version,
                               storage_options=self.storage_options)

    # -- commits (driver) -----------------------------------------------------------------
    def commit(self, files: list[DataFile], *, dims: dict[str, int] | None = None) -> None:
        """Commit data files: patches, then regions, then slides last, one commit per table.

        ``dims``: embedding width per table, to create tables that do not exist yet (the
        first write fixes a table's width).
        """
        by_table: dict[str, list[DataFile]] = {n: [] for n in FILE_TABLES}
        for f in files:
            by_table[f.table].append(f)
        for name in FILE_TABLES:
            if by_table[name]:
                self._ensure_file_table(name, (dims or {}).get(name))
                self.commit_files(name, by_table[name])

    def _ensure_file_table(self, name: str, dim: int | None) -> None:
        if self.open(name) is not None:
            return
        if dim is None:
            raise TableError(name, f"no table at {redact(self.table_uri(name))} and no "
                                   "embedding width to create it with")
        self._create(name, _FILE_SCHEMAS[name](dim))

    def commit_files(self, name: str, files: list[DataFile]) -> None:
        """One transaction: add ``files`` and remove the active files they replace."""
        from deltalake.transaction import CommitProperties, RemoveAction

        keys = {(f.slide_id, f.model_version) for f in files}

        def op() -> None:
            dt = self.open(name)
            exact, loose = replaced_files(dt, keys)
            if loose:
                # Files holding several slides: drop these slides' rows from them first (a
                # separate commit; none of these slides is complete until its slides row).
                dt.delete(_keys_predicate(keys))
                dt = self.open(name)
                exact, _ = replaced_files(dt, keys)
            # Our own files already active: an earlier attempt of this very commit was
            # applied although its answer was lost (a reset after the PUT). Then there is
            # nothing left to do; never remove and re-add them.
            ours = {f.path for f in files}
            active = {p for p, _ in exact}
            if ours <= active:
                return
            now = int(time.time() * 1000)
            actions = [RemoveAction(p, True, now, size=size) for p, size in exact
                       if p not in ours]
            actions += [f.add_action() for f in files if f.path not in active]
            dt.create_write_transaction(
                actions, "append", dt.schema(),
                commit_properties=CommitProperties(max_commit_retries=0))

        self._retry(name, op)

    # -- in-process writes (tests, small tools): files and commit in one call ------------
    def write_results(self, results: list[SlideResult]) -> None:
        """Write and commit patches (if kept), then regions, then slides last."""
        if results:
            self.commit(self.write_files(results), dims=result_dims(results[0]))

    # The three steps are public so tests can simulate a crash between them.
    def write_patches(self, results: list[SlideResult], dim: int) -> None:
        self.commit_files("patches", [self._write_file("patches", r, dim) for r in results])

    def write_regions(self, results: list[SlideResult], dim: int) -> None:
        self.commit_files("regions", [self._write_file("regions", r, dim) for r in results])

    def write_slides(self, results: list[SlideResult], dim: int) -> None:
        self.commit_files("slides", [self._write_file("slides", r, dim) for r in results])

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

    def append_probe(self, row: dict[str, Any]) -> None:
        """Add one ``probes`` row (columns of ``PROBES_SCHEMA``; ``created_at`` epoch s)."""
        from deltalake import write_deltalake

        self._create("probes", S.PROBES_SCHEMA)
        table = pa.Table.from_pylist([{**row, "created_at": _ts(row.get("created_at")
                                                                  or time.time())}],
                                     schema=S.PROBES_SCHEMA)
        # A plain append: probe ids are new uuids, so concurrent probes never collide.
        self._retry("probes", lambda: write_deltalake(
            self.table_uri("probes"), table, mode="append",
            storage_options=self._opts("probes")))

    # -- maintenance ----------------------------------------------------------------------
    def _existing(self, table: str | None) -> list[str]:
        names = [table] if table else list(S.TABLES)
        return [n for n in names if self.open(n) is not None]

    def optimize(self, table: str | None = None) -> dict[str, Any]:
        return {n: self._retry(n, lambda n=n: self.open(n).optimize.compact())
                for n in self._existing(table)}

    def vacuum(self, table: str | None = None, *, retention_hours: int = 168,
               dry_run: bool = False) -> dict[str, list[str]]:
        """Delete files no table version references and older than ``retention_hours``: files
        replaced or compacted away, and data files of killed runs that never reached a commit
        (``full``: the table folder is listed, not only the log). With ``table=None`` also the
        job's feature shards under ``_staging`` that a killed run left behind (key
        ``_staging``). Never vacuum with a short retention while a job writes: its files
        wait for the next commit."""
        out = {n: self.open(n).vacuum(retention_hours=retention_hours, dry_run=dry_run,
                                      enforce_retention_duration=retention_hours >= 168,
                                      full=True)
               for n in self._existing(table)}
        if table is None:
            out["_staging"] = self._vacuum_staging(retention_hours, dry_run)
        return out

    def staging_uri(self, run_id: str) -> str:
        """Scratch space of one run (patch-feature shards between the stages): under the
        warehouse, so every node of a cluster reaches it; ``_`` keeps it out of the tables."""
        return join(self.uri, "_staging", run_id)

    def _vacuum_staging(self, retention_hours: int, dry_run: bool) -> list[str]:
        fs, path = url_to_fs(join(self.uri, "_staging"), self.storage_options)
        if not fs.exists(path):
            return []
        cutoff = time.time() - retention_hours * 3600
        old = []
        for f, info in fs.find(path, detail=True).items():
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            ts = mtime.timestamp() if isinstance(mtime, datetime) else float(mtime or 0)
            if ts <= cutoff:
                old.append(f)
        if old and not dry_run:
            fs.rm(old)
        return old

    def history(self, table: str | None = None, limit: int | None = None
                ) -> dict[str, list[dict[str, Any]]]:
        return {n: self.open(n).history(limit) for n in self._existing(table)}
