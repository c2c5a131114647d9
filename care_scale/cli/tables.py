"""``care-scale tables optimize|vacuum|history``: compaction, clean-up and audit."""

from __future__ import annotations

import argparse
import json
from typing import Any

from care_scale.cli.options import add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tables", help="optimize, vacuum or show the history of the warehouse tables",
        description="Maintenance of the Delta tables: optimize (compact small files), vacuum "
        "(delete files no version references any more), history (commit log).")
    p.add_argument("action", choices=["optimize", "vacuum", "history"])
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--table", default=None,
                   choices=["slides", "regions", "patches", "failures", "runs"],
                   help="one table (default: all that exist)")
    p.add_argument("--retention-hours", type=int, default=168,
                   help="vacuum: keep files younger than this (default 168 = 7 days)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: only list the files")
    p.add_argument("--limit", type=int, default=20, help="history: newest N commits")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.warehouse import Warehouse

    wh = Warehouse(args.warehouse, storage_options=storage_options(args.storage_option))
    if args.action == "optimize":
        for name, m in wh.optimize(args.table).items():
            print(f"{name}: {m.get('numFilesRemoved', 0)} files -> {m.get('numFilesAdded', 0)}")
    elif args.action == "vacuum":
        for name, files in wh.vacuum(args.table, retention_hours=args.retention_hours,
                                     dry_run=args.dry_run).items():
            print(f"{name}: {len(files)} files {'to delete' if args.dry_run else 'deleted'}")
    else:
        for name, entries in wh.history(args.table, limit=args.limit).items():
            print(f"== {name}")
            for h in entries:
                print(json.dumps({k: h.get(k) for k in ("version", "timestamp", "operation",
                                                         "operationMetrics")}, default=str))
    return 0
