"""Shared body of ``train/stage*.py`` and ``care-scale train``: parse, train, print JSON."""

from __future__ import annotations

import argparse
import json
import logging


def main_stage(stage: str, *, config: str | None = None, overrides: list[str] | None = None,
               demo: bool = False, workdir: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if demo:
        from care_scale.training.demo import print_demo

        print_demo(stage, overrides=overrides, config=config, workdir=workdir)
        return 0
    from care_scale.training.demo import load_stage_config
    from care_scale.training.loop import fit

    cfg = load_stage_config(stage, config, overrides)
    result = fit(stage, cfg)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"stage": stage, "checkpoint": result.output,
                      "model_version": result.model_version, "steps": last.get("step"),
                      "loss_last": last.get("loss"), "run_dir": result.run_dir,
                      "seconds": round(result.seconds, 1)}), flush=True)
    return 0


def script_main(stage: str, argv: list[str] | None = None) -> int:
    """``python train/stage1_ssl.py [--config X] [--set k=v ...] [--demo]``."""
    import sys

    from care_scale.exceptions import CareScaleError

    p = argparse.ArgumentParser(prog=f"train/{stage}", description=f"CARE {stage} on Ray Train")
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--demo", action="store_true")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    try:
        return main_stage(stage, config=args.config, overrides=args.overrides, demo=args.demo,
                          workdir=args.workdir)
    except CareScaleError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
