"""Demo runs on the generated known-answer cohort: train, then measure what was learned.

``care-scale train stage1 --demo`` / ``stage2 --demo`` (and ``train/stage*.py --demo``) call
:func:`run_demo`, which prints ONE JSON line, e.g. for stage II::

    {"stage": "stage2", "probe_accuracy_before": 0.53, "probe_accuracy_after": 0.9,
     "retrieval_top1": 0.4, "retrieval_chance": 0.02, "region_purity_before": 0.82,
     "region_purity_after": 0.83, ...}

Every figure is computed on held-out slides of the cohort; nothing is asserted here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from care_scale.config import load_config
from care_scale.training.config import Stage1Config, Stage2Config

DEMO_STEPS = {"stage1": 140, "stage2": 240}


def demo_overrides(stage: str, workdir: str) -> list[str]:
    """The demo configuration: generated cohort, tiny CARE, 2 CPU workers, short schedule."""
    common = [
        "data.synthetic=true", "data.synthetic_slides=128", "data.holdout_fraction=0.4",
        "model.name=care_tiny", "run.num_workers=2", "run.use_gpu=false",
        f"run.storage_path={os.path.join(workdir, 'runs')}",
        f"run.name=demo-{stage}-{int(time.time())}", "run.checkpoint_every=40",
        "run.log_every=10", "optim.batch_size=8", "optim.warmup_steps=10",
        f"optim.steps={DEMO_STEPS[stage]}",
    ]
    if stage == "stage1":
        return common + ["optim.lr=5e-4", "ssl.out_dim=64", "ssl.patch_out_dim=64",
                         "ssl.teacher_momentum=0.95"]
    # The composition cohort's large batch effect: stage II's stain jitter helps there
    # (README, Pretraining); the comparison (training.compare) switches it off again.
    return common + ["optim.lr=1e-3", "align.phases=rna,protein", "align.phase_steps=180,60",
                     "align.shift_rank=8"]


def load_stage_config(stage: str, path: str | None, overrides: list[str] | None, *,
                      demo: bool = False, workdir: str | None = None) -> Any:
    cls = Stage1Config if stage == "stage1" else Stage2Config
    extra = list(overrides or [])
    if demo:
        extra = demo_overrides(stage, workdir or tempfile.mkdtemp(prefix="care-demo-")) + extra
    return load_config(cls, path, extra)


def build_encoder(cfg: Any, checkpoint: str | None, init_seed: int | None = None
             ) -> torch.nn.Module:
    """The config's slide encoder from ``checkpoint`` (None: untrained, seeded), quietly."""
    import warnings

    from care_scale.models import create_slide_encoder
    from care_scale.models.registry import UntrainedWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWeightsWarning)
        return create_slide_encoder(cfg.model.name, checkpoint,
                                    storage_options=cfg.run.storage_options or None,
                                    init_seed=init_seed, **cfg.model.overrides)


def evaluate_stage2(cfg: Stage2Config, output: str, holdout: list, cohort: Any
                    ) -> dict[str, float]:
    """Held-out slide -> RNA (and -> protein) retrieval with the trained aligner."""
    from care_scale.training.align import load_aligner
    from care_scale.training.evaluate import molecular_retrieval

    encoder = build_encoder(cfg, output)
    model, meta = load_aligner(output, encoder, cfg=cfg,
                               storage_options=cfg.run.storage_options or None)
    hits = molecular_retrieval(model, meta, holdout, cohort)
    out = {"retrieval_chance": 1.0 / len(holdout)}
    if "rna" in hits:
        out["retrieval_top1"] = hits["rna"][1]
    if "protein" in hits:
        out["protein_retrieval_top1"] = hits["protein"][1]
    return out


def run_demo(stage: str, *, overrides: list[str] | None = None, config: str | None = None,
             workdir: str | None = None) -> dict[str, Any]:
    """Train ``stage`` on the generated cohort and measure before / after (held-out)."""
    from care_scale.training.data import load_slides_for, model_in_dim, synthetic_slides
    from care_scale.training.evaluate import slide_metrics
    from care_scale.training.loop import fit

    t0 = time.time()
    cfg = load_stage_config(stage, config, overrides, demo=True, workdir=workdir)
    train, holdout = load_slides_for(cfg, train_only=False)
    before = slide_metrics(build_encoder(cfg, cfg.model.checkpoint), train, holdout)
    result = fit(stage, cfg)
    after = slide_metrics(build_encoder(cfg, result.output), train, holdout)
    hist = result.history
    report: dict[str, Any] = {
        "stage": stage,
        "probe_accuracy_before": round(before["probe_accuracy"], 4),
        "probe_accuracy_after": round(after["probe_accuracy"], 4),
        "knn_accuracy_before": round(before["knn_accuracy"], 4),
        "knn_accuracy_after": round(after["knn_accuracy"], 4),
        "majority_baseline": round(before["majority_baseline"], 4),
        "region_purity_before": round(before["region_purity"], 4),
        "region_purity_after": round(after["region_purity"], 4),
    }
    if stage == "stage1" and hist:
        report["emb_std_first"] = round(hist[0]["emb_std"], 4)
        report["emb_std_last"] = round(hist[-1]["emb_std"], 4)
    if stage == "stage2":
        _, cohort = synthetic_slides(cfg.data, embed_dim=model_in_dim(cfg.model))
        report.update({k: round(v, 4) for k, v in
                       evaluate_stage2(cfg, result.output, holdout, cohort).items()})
    report.update({
        "loss_first": round(hist[0]["loss"], 4) if hist else None,
        "loss_last": round(hist[-1]["loss"], 4) if hist else None,
        "steps": hist[-1]["step"] if hist else 0, "steps_planned": cfg.optim.steps,
        "workers": cfg.run.num_workers, "train_slides": len(train),
        "heldout_slides": len(holdout), "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.time() - t0, 1), "checkpoint": result.output,
        "model_version": result.model_version,
    })
    return report


def print_demo(stage: str, **kwargs: Any) -> dict[str, Any]:
    report = run_demo(stage, **kwargs)
    print(json.dumps(report), flush=True)
    return report
