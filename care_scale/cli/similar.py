"""``care-scale similar``: nearest slides or regions of a slide, by cosine similarity."""

from __future__ import annotations

import argparse
from typing import Any

from care_scale.choices import Level, values
from care_scale.cli.options import add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "similar", help="nearest slides or regions of a slide (cosine similarity, DuckDB)",
        description="The K most similar slides (slide or ROI embeddings) or regions of other "
        "slides (nearest to the query slide's ROI, or --region-id), with their similarity, "
        "distance (1 - cosine) and metadata.")
    p.add_argument("slide_id", metavar="SLIDE_ID", help="the query slide")
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")
    p.add_argument("--level", default="slide", choices=values(Level),
                   help="compare slide embeddings, regions, or ROI embeddings (default slide)")
    p.add_argument("--region-id", type=int, default=None,
                   help="region level: the query region (default: the slide's ROI)")
    p.add_argument("--model-version", default=None,
                   help="the model version (needed when the slide has several)")
    p.add_argument("--json", action="store_true", help="print one JSON array of row objects")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.cli.sql import print_rows
    from care_scale.query.similar import similar

    table = similar(args.warehouse, args.slide_id, k=args.k, level=args.level,
                    region_id=args.region_id, model_version=args.model_version,
                    storage_options=storage_options(args.storage_option))
    print_rows(table, as_json=args.json)
    return 0
