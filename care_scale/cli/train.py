"""``care-scale train stage1|stage2``: CARE pretraining on Ray Train (see care_scale.training)."""

from __future__ import annotations

import argparse

from care_scale.choices import Stage, values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain CARE: stage1 (self-supervised) or stage2 (RNA/protein alignment)",
        description="Train CARE with Ray Train. Resumes from the latest checkpoint when "
        "<run.storage_path>/<run.name> already holds one.")
    p.add_argument("stage", choices=values(Stage))
    p.add_argument("--config", help="YAML config (local path or URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--demo", action="store_true",
                   help="train on a generated known-answer cohort (tiny model, 2 workers) and "
                   "print one JSON line of before/after figures")
    p.add_argument("--workdir", help="where the demo writes its runs (default: a temp dir)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from care_scale.training.entry import main_stage

    return main_stage(args.stage, config=args.config, overrides=args.overrides, demo=args.demo,
                      workdir=args.workdir)
