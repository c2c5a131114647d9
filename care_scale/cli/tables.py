"""``care-scale tables optimize|vacuum|history|export-features``: compaction, clean-up, audit,
and patch features out to CLAM/TRIDENT files."""

from __future__ import annotations

import argparse
import json
from typing import Any

from care_scale.choices import FeatureFormat, values
from care_scale.cli.options import add_storage_option_arg, storage_options

# care_scale.warehouse.schemas.TABLES, spelt out: importing it would import pyarrow with the CLI.
TABLES = ("slides", "regions", "patches", "failures", "runs", "probes")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tables", help="optimize, vacuum, show the history of the warehouse tables, or export "
        "patch features", description="Maintenance of the Delta tables: optimize (compact "
        "small files), vacuum (delete files no version references any more), history (commit "
        "log); export-features: one CLAM/TRIDENT .h5 or .pt file per slide from the patches "
        "table (written by `care-scale embed --keep-patches`).")
    p.add_argument("action", choices=["optimize", "vacuum", "history", "export-features"])
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--table", default=None, choices=list(TABLES),
                   help="one table (default: all that exist)")
    p.add_argument("--retention-hours", type=int, default=168,
                   help="vacuum: keep files younger than this (default 168 = 7 days)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: only list the files")
    p.add_argument("--limit", type=int, default=20, help="history: newest N commits")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="export-features: folder for the files (created if missing; never "
                   "emptied)")
    p.add_argument("--format", default="h5", choices=values(FeatureFormat),
                   help="export-features: h5 (features + coords with TRIDENT's attributes) or "
                   "pt (CLAM's pt_files tensor); default h5")
    p.add_argument("--slides", nargs="+", default=None, metavar="ID",
                   help="export-features: only these slides (default: every complete slide)")
    p.add_argument("--model-version", default=None,
                   help="export-features: the model version (needed when there are several)")
    p.add_argument("--overwrite", action="store_true",
                   help="export-features: replace existing files (default: refuse, write "
                   "nothing)")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.warehouse import Warehouse

    if args.action == "export-features":
        return _export_features(args)
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


def _export_features(args: argparse.Namespace) -> int:
    from care_scale.exceptions import ConfigError
    from care_scale.warehouse.feature_files import export_features

    if not args.out:
        raise ConfigError("tables export-features needs --out DIR")
    report = export_features(args.warehouse, args.out, format=args.format, slides=args.slides,
                             model_version=args.model_version, overwrite=args.overwrite,
                             storage_options=storage_options(args.storage_option))
    n = sum(f.num_patches for f in report.files)
    print(f"{len(report.files)} {args.format} files ({n} patches, model version "
          f"{report.model_version}) in {args.out}")
    if report.without_patches:
        print(f"{len(report.without_patches)} slides without patch rows (embedded without "
              f"--keep-patches), not exported: {', '.join(report.without_patches)}")
    return 0
