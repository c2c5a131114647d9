"""``care-scale train stage1|stage2``: CARE pretraining on Ray Train (see care_scale.training)."""

from __future__ import annotations

import argparse

from care_scale.choices import Stage, values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain CARE: stage1 (self-supervised) or stage2 (RNA/protein alignment)",
        description="Train CARE with Ray Train. Resumes from the latest checkpoint when "
        "<run.storage_path>/<run.name> already holds one.")
    p.add_argument("stage", choices=[*values(Stage), "evaluate"],
                   help="stage1 / stage2: train that stage; evaluate (with --demo): train both "
                   "stages over several seeds on the arrangement cohort and print the "
                   "comparison with untrained CARE, mean pooling, ABMIL and ridge baselines")
    p.add_argument("--config", help="YAML config (local path or URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--demo", action="store_true",
                   help="train on a generated known-answer cohort (tiny model, 2 workers) and "
                   "print one JSON line of before/after figures")
    p.add_argument("--workdir", help="where the demo writes its runs (default: a temp dir)")
    g = p.add_argument_group("evaluate")
    g.add_argument("--seeds", type=int, default=3, help="training / initialisation seeds")
    g.add_argument("--slides", type=int, default=240, help="slides of the generated cohort")
    g.add_argument("--stage1-steps", type=int,
                   help="default: the comparison's stage I recipe's (care_scale.training."
                   "compare.STAGE1_RECIPE_STEPS), with --plain-stage1 the stage I demo schedule")
    g.add_argument("--stage2-steps", type=int, help="default: the stage II demo schedule")
    g.add_argument("--stage1-set", dest="stage1_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a stage I field only (--set goes to "
                   "both stages), e.g. --stage1-set ssl.region_loss=contrast (repeatable)")
    g.add_argument("--stage2-set", dest="stage2_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a stage II field only (repeatable)")
    g.add_argument("--plain-stage1", action="store_true",
                   help="stage I with the library's defaults, not the comparison's recipe "
                   "(care_scale.training.compare.STAGE1_RECIPE)")
    g.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from care_scale.training.entry import main_evaluate, main_stage

    if args.stage == "evaluate":
        return main_evaluate(demo=args.demo, seeds=args.seeds, slides=args.slides,
                             stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                             overrides=args.overrides, stage1_overrides=args.stage1_overrides,
                             stage2_overrides=args.stage2_overrides, workdir=args.workdir,
                             as_json=args.json, plain_stage1=args.plain_stage1)
    return main_stage(args.stage, config=args.config, overrides=args.overrides, demo=args.demo,
                      workdir=args.workdir)
