"""Data files written by workers, committed by the driver.

A worker (the slide-encoder actor of the embedding job) turns one slide's rows into one
Parquet file per table, written straight into the table's location, and returns a
:class:`DataFile`: the file's path, size and Delta statistics. That is all the driver ever
receives of a slide's rows; it commits the files with ``DeltaTable.create_write_transaction``
(see ``writer.Warehouse.commit``). A file that no commit names is invisible to every reader
(Delta lists the log, not the folder) and ``Warehouse.vacuum`` deletes it later.

One file holds exactly one (slide_id, model_version): its ``minValues`` and ``maxValues`` for
both columns are equal, which is how a later commit finds the files it must replace.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from care_scale.storage import is_remote, join, strip_file_scheme, url_to_fs

# Columns whose min/max go into the Delta statistics: the keys readers filter on (data
# skipping in DuckDB, Spark and deltalake) and that replacement matches on.
STATS_COLUMNS = ("slide_id", "model_version", "region_id", "x", "y", "run_id")


@dataclass(frozen=True)
class DataFile:
    """One Parquet file in a table's location, not yet (or already) in a commit."""

    table: str
    path: str  # relative to the table root, as Delta's add action names it
    size: int
    num_records: int
    stats: str  # Delta statistics JSON
    slide_id: str
    model_version: str
    modification_time: int  # ms since the epoch

    def add_action(self) -> Any:
        from deltalake.transaction import AddAction

        return AddAction(self.path, self.size, {}, self.modification_time, True, self.stats)


def file_stats(table: pa.Table) -> str:
    """Delta statistics (numRecords, min/max/nullCount) for the key columns present."""
    import pyarrow.compute as pc

    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for name in STATS_COLUMNS:
        if name not in table.column_names or table.num_rows == 0:
            continue
        col = table.column(name)
        nulls[name] = int(col.null_count)
        mm = pc.min_max(col).as_py()
        if mm["min"] is not None:
            mins[name], maxs[name] = mm["min"], mm["max"]
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs,
                       "nullCount": nulls})


def write_data_file(table_uri: str, name: str, data: pa.Table, *, slide_id: str,
                    model_version: str,
                    storage_options: dict[str, Any] | None = None) -> DataFile:
    """Write ``data`` as one new Parquet file under ``table_uri`` (never overwrites one)."""
    import pyarrow.parquet as pq

    rel = f"part-{time.strftime('%Y%m%d')}-{uuid.uuid4().hex}.zstd.parquet"
    uri = join(table_uri, rel)
    if is_remote(uri):
        # Serialised in memory, then one PUT: the size is known without a HEAD request.
        buf = pa.BufferOutputStream()
        pq.write_table(data, buf, compression="zstd")
        body = buf.getvalue().to_pybytes()
        fs, path = url_to_fs(uri, storage_options)
        fs.pipe_file(path, body)
        size = len(body)
    else:
        import os

        path = strip_file_scheme(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(data, path, compression="zstd")
        size = os.path.getsize(path)
    return DataFile(table=name, path=rel, size=size, num_records=data.num_rows,
                    stats=file_stats(data), slide_id=slide_id, model_version=model_version,
                    modification_time=int(time.time() * 1000))


__all__ = ["STATS_COLUMNS", "DataFile", "file_stats", "write_data_file"]
