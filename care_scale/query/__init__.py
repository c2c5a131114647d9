"""Queries over the warehouse: DuckDB (``connect_duckdb``, ``sql``, nearest neighbours with
``similar``) and Spark (``care_scale.query.spark.read_table``, imported on use so DuckDB users
need no pyspark)."""

from care_scale.query.duckdb import connect_duckdb, sql
from care_scale.query.similar import similar

__all__ = ["connect_duckdb", "similar", "sql"]
