"""Queries over the warehouse: DuckDB (``connect_duckdb``, ``sql``) and Spark (``spark``)."""

from care_scale.query.duckdb import connect_duckdb, sql

__all__ = ["connect_duckdb", "sql"]
