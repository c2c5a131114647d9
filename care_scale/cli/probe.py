"""``care-scale probe``: linear-probe / kNN (or Cox survival) evaluation of the embeddings on a
labels CSV."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from care_scale.choices import FeatureKind, ProbeModel, Unit, values
from care_scale.cli.options import add_storage_option_arg, storage_options


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "probe", help="how well the embeddings predict a label (CARE's linear probe / kNN)",
        description="Join the slides table with a labels CSV (slide_id and/or case_id column "
        "+ the target column), fit logistic regression or kNN on frozen features per fold "
        "(the CARE repository's protocol), and report balanced accuracy, macro AUROC and "
        "weighted F1 (mean, std over folds, bootstrap 95%% interval); with --time and --event "
        "a ridge-penalised Cox model scored by Harrell's C-index. The result is also "
        "appended to the warehouse's probes table.")
    p.add_argument("--warehouse", required=True, help="warehouse URI (path or s3://...)")
    p.add_argument("--labels", required=True, metavar="CSV",
                   help="labels CSV with a slide_id or case_id column and the target column")
    p.add_argument("--target", default=None, metavar="COLUMN",
                   help="class-label column to predict (not with --time/--event)")
    p.add_argument("--time", default=None, metavar="COLUMN",
                   help="survival: follow-up time column (> 0); with --event")
    p.add_argument("--event", default=None, metavar="COLUMN",
                   help="survival: event column (1 = event observed, 0 = censored)")
    p.add_argument("--feature", default="slide", choices=values(FeatureKind),
                   help="slide embedding, ROI embedding, or the mean of region embeddings "
                   "(default slide)")
    p.add_argument("--model", default=None, choices=values(ProbeModel),
                   help="logistic regression (C chosen on validation), kNN, or cox (survival; "
                   "default: logistic, cox with --time/--event)")
    p.add_argument("--unit", default="auto", choices=values(Unit),
                   help="one sample per slide, or per case with its slides averaged (default: "
                   "slide when the CSV has slide_id, else case)")
    p.add_argument("--splits", default=None, metavar="DIR",
                   help="folder of CARE/CLAM splits_K.csv files (train,val,test columns), used "
                   "as they are; default: stratified K-fold")
    p.add_argument("--folds", type=int, default=5, help="K of the generated folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, models and bootstrap")
    p.add_argument("--model-version", default=None,
                   help="the model version to probe (needed when the tables hold several)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of the 95%% interval (default 1000, at most "
                   "10000)")
    p.add_argument("--no-standardize", action="store_true",
                   help="logistic: fit raw features, as the CARE authors' code does")
    p.add_argument("--no-record", action="store_true",
                   help="do not append the result to the probes table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_storage_option_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from care_scale.evaluation import ProbeConfig, run_probe
    from care_scale.evaluation.metrics import MAX_RESAMPLES
    from care_scale.exceptions import ConfigError

    if not 1 <= args.bootstrap <= MAX_RESAMPLES:
        raise ConfigError(f"--bootstrap must be 1..{MAX_RESAMPLES}, got {args.bootstrap}")
    config = ProbeConfig(
        warehouse=args.warehouse, labels=args.labels, target=args.target,
        time=args.time, event=args.event, feature=args.feature,
        model=args.model or ("cox" if args.time or args.event else "logistic"), unit=args.unit, splits=args.splits,
        folds=args.folds, seed=args.seed, model_version=args.model_version,
        bootstrap=args.bootstrap, standardize=not args.no_standardize,
        record=not args.no_record, storage_options=storage_options(args.storage_option))
    result = run_probe(config)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(result.format())
    return 0
