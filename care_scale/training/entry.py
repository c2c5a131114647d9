"""The body of ``care-scale train`` (and so of ``train/stage*.py``): train, print JSON."""

from __future__ import annotations

import json
import logging


def main_stage(stage: str, *, config: str | None = None, overrides: list[str] | None = None,
               demo: bool = False, workdir: str | None = None) -> int:
    # Our own INFO lines (resumes, pruned checkpoints) but not every library's: the run's
    # progress is the status line (care_scale.training.progress).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("care_scale").setLevel(logging.INFO)
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

