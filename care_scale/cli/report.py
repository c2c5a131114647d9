"""``care-scale report``: one self-contained HTML page of a warehouse or of one run."""

from __future__ import annotations

import argparse
from typing import Any

from care_scale.cli.options import add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    sections = ("the slides, tiles, throughput, model versions and backends; a gallery of the "
                "overlay pictures (embed --overlays) with their regions; the failures; tiles/s")
    p = subparsers.add_parser("report", help="one static HTML page of a warehouse or run",
                              description="Writes one HTML file that opens from disk (pictures "
                              f"inlined, no script): {sections}.")
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--out", default="report.html", help="the HTML file (default report.html)")
    p.add_argument("--run", dest="run_id", default=None, metavar="RUN_ID",
                   help="only this run (default: the whole warehouse)")
    p.add_argument("--max-slides", type=int, default=200,
                   help="slides in the gallery at most (default 200)")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.overlays.report import write_report

    data = write_report(args.warehouse, args.out, run_id=args.run_id,
                        max_slides=args.max_slides,
                        storage_options=storage_options(args.storage_option))
    print(f"{args.out}: {len(data.slides)} slides, {len(data.failures)} failures, "
          f"{len(data.runs)} runs")
    return 0
