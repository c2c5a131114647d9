"""The body of ``care-scale train`` (and so of ``train/stage*.py``): train, print JSON."""

from __future__ import annotations

import json
import logging


def _logging() -> None:
    # Our own INFO lines (resumes, pruned checkpoints) but not every library's: the run's
    # progress is the status line (care_scale.training.progress).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("care_scale").setLevel(logging.INFO)


def main_evaluate(*, demo: bool, seeds: int, slides: int, stage1_steps: int | None,
                  stage2_steps: int | None, overrides: list[str], workdir: str | None,
                  as_json: bool, stage1_overrides: list[str] | None = None,
                  stage2_overrides: list[str] | None = None, plain_stage1: bool = False
                  ) -> int:
    """``care-scale train evaluate --demo``: the pretraining comparison (training.compare)."""
    from care_scale.exceptions import ConfigError
    from care_scale.training.compare import ComparisonConfig, format_table, run_comparison

    if not demo:
        raise ConfigError("train evaluate measures on the generated known-answer cohort: run "
                          "`care-scale train evaluate --demo`")
    if seeds < 2 or slides < 20:
        raise ConfigError("train evaluate needs --seeds >= 2 (a spread) and --slides >= 20")
    _logging()
    table = run_comparison(ComparisonConfig(
        seeds=seeds, slides=slides, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
        overrides=list(overrides), stage1_overrides=list(stage1_overrides or []),
        stage2_overrides=list(stage2_overrides or []), plain_stage1=plain_stage1),
        workdir=workdir)
    print(json.dumps(table) if as_json else format_table(table), flush=True)
    return 0


def main_stage(stage: str, *, config: str | None = None, overrides: list[str] | None = None,
               demo: bool = False, workdir: str | None = None) -> int:
    _logging()
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

