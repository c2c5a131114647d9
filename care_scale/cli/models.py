"""``care-scale models``: the model registry as a table (``care_scale.models.model_table``)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models", help="list the registered patch and slide encoders",
        description="Every registered encoder: kind, input and output size, tiling preset, "
        "the Hugging Face repository of its published weights and whether a snapshot of "
        "them is in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME; never the network).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.models.registry import model_table

    rows = model_table()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    from care_scale.cli.sql import format_table

    print(format_table(rows, ["name", "kind", "in", "out", "tiling", "hf_repo", "weights"]))
    return 0
