"""``care-scale show``: a slide's CARE regions as pictures and QuPath GeoJSON."""

from __future__ import annotations

import argparse
from typing import Any

from care_scale.cli.options import add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    what = ("OUT/SLIDE_ID/regions.png (tissue contour, patch grid, regions, ROI), heatmap.png "
            "(fused weights), regions.geojson and tissue.geojson (QuPath, level-0 pixels)")
    p = subparsers.add_parser("show", description=f"Writes {what}, from the warehouse rows "
                              "and a thumbnail of the source slide.",
                              help="a slide's regions: overlay PNG, heatmap, QuPath GeoJSON")
    p.add_argument("slide_id", metavar="SLIDE_ID", help="the slide to show")
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--out", default="overlays",
                   help="folder (or URI) that gets SLIDE_ID/ with the files (default overlays)")
    p.add_argument("--level", type=int, default=None, metavar="N",
                   help="draw on pyramid level N read whole (default: a 1,600 px thumbnail)")
    p.add_argument("--model-version", default=None,
                   help="the model version (needed when the slide has several)")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.overlays.show import show_slide

    res = show_slide(args.warehouse, args.slide_id, out=args.out, level=args.level,
                     model_version=args.model_version,
                     storage_options=storage_options(args.storage_option))
    w, h = res.thumbnail_size
    print(f"{res.slide_id} (model {res.model_version}), drawn on a {w} x {h} px thumbnail:")
    for name, uri in res.files.items():
        print(f"  {name:16s} {uri}")
    return 0
