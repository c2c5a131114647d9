"""``care-scale sql``: DuckDB over the warehouse tables (views via ``delta_scan``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from care_scale.cli.options import add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sql", help="query the warehouse tables with DuckDB",
        description="Run one SQL query over the warehouse: slides, regions, patches, failures "
        "and runs are views (DuckDB delta_scan), local or on S3.")
    p.add_argument("query", help='SQL, e.g. "SELECT slide_id, num_regions FROM slides"')
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--json", action="store_true", help="print one JSON array of row objects")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def _cell(v: Any) -> str:
    if isinstance(v, list) and len(v) > 4:
        return "[" + ", ".join(_cell(x) for x in v[:3]) + f", ... ({len(v)})]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Aligned plain-text table (long vectors abbreviated)."""
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from care_scale.query import sql

    table = sql(args.warehouse, args.query, storage_options=storage_options(args.storage_option))
    print_rows(table, as_json=args.json)
    return 0


def print_rows(table: Any, *, as_json: bool) -> None:
    """A query result (pyarrow.Table) on stdout: one JSON array of row objects, or a table."""
    rows = table.to_pylist()
    if as_json:
        json.dump(rows, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_table(rows, table.column_names))
