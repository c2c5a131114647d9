"""Does pretraining learn? Both stages against untrained CARE and simple baselines, one run.

``care-scale train evaluate --demo`` calls :func:`run_comparison`: on the arrangement cohort
(``care_scale.synthetic.regions``: labels that need region structure, mean pooling at chance
by construction) it trains stage I (:data:`STAGE1_RECIPE`) and then stage II (the demo
schedule) for each of ``seeds`` seeds on Ray Train, and measures on the held-out slides, side
by side:

- linear-probe and kNN balanced accuracy, stratified 5-fold CV over the held-out slides, for
  the slide and the ROI embedding, for both labels (``arrangement``, ``focus``);
- untrained CARE over the same number of initialisation seeds; mean pooling of the patch
  features; ABMIL trained on the labels (supervised: an upper reference);
- slide -> RNA and slide -> protein retrieval top-1 / top-5 among held-out pairs with the
  stage II aligner, against ridge regression from mean features;
- region purity (share of patches carrying their region's majority tissue type) against fixed
  k x k windows, and the mean expected candidate rank against the RSL's target E*.

Seeds vary the model initialisation and the training order; the cohort and its train /
held-out split are fixed (``data.synthetic_seed``). The goals of issue 14 are evaluated on the
numbers and printed with them (met or not); nothing is tuned after the fact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

LABEL_NAMES = ("arrangement", "focus")
FEATURES = ("slide", "roi")
CLASSIFIERS = ("probe", "knn")


#: Stage I as the comparison trains it (README, "Does pretraining learn?"; chosen by screens
#: on the cohorts of data.synthetic_seed 0 and 1 and confirmed on seed 2, which nothing was
#: selected on): each view's stain offset redrawn along the training slides' top 8 mean
#: directions with twice their between-slide spread, the region contrast at weight 3, and
#: twice the demo's steps. ``ssl.shift_rank`` is a cohort prior neither iBOT nor the paper
#: has, so SSLConfig keeps it off; ``plain_stage1`` (``--plain-stage1``) trains stage I with
#: SSLConfig's defaults and the demo schedule instead.
STAGE1_RECIPE = ("ssl.shift_rank=8", "ssl.global_shift=2", "ssl.region_loss=contrast",
                 "ssl.loss_weight_region=3")
STAGE1_RECIPE_STEPS = 280


@dataclasses.dataclass
class ComparisonConfig:
    seeds: int = 3
    slides: int = 240
    holdout_fraction: float = 0.5
    cohort: str = "arrangement"
    folds: int = 5
    # None: STAGE1_RECIPE_STEPS, or with plain_stage1 the demo schedule (training.demo)
    stage1_steps: int | None = None
    stage2_steps: int | None = None  # None: the demo schedule
    plain_stage1: bool = False  # stage I without STAGE1_RECIPE
    overrides: list[str] = dataclasses.field(default_factory=list)  # applied to both stages
    # Applied to one stage only, after ``overrides``: settings the other stage's config has
    # not got (e.g. ``ssl.region_loss=contrast`` for stage I; stage II rejects ``ssl.*``).
    stage1_overrides: list[str] = dataclasses.field(default_factory=list)
    stage2_overrides: list[str] = dataclasses.field(default_factory=list)


def _mean_std(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4),
            "values": [round(float(x), 4) for x in v]}


def _classification(encoded: list[dict[str, Any]], labels: dict[str, np.ndarray], folds: int
                    ) -> dict[str, Any]:
    """{label: {feature: {classifier: mean/std over encoders}}} for a list of encodings."""
    from care_scale.training.evaluate import cv_balanced_accuracy

    out: dict[str, Any] = {}
    for name, y in labels.items():
        out[name] = {feat: {clf: _mean_std([cv_balanced_accuracy(e[feat], y, classifier=clf,
                                                                 folds=folds) for e in encoded])
                            for clf in CLASSIFIERS} for feat in FEATURES if feat in encoded[0]}
    return out


def _stage_overrides(stage: str, cfg: ComparisonConfig, seed: int, workdir: str) -> list[str]:
    steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
    recipe = stage == "stage1" and not cfg.plain_stage1
    if recipe and steps is None:
        steps = STAGE1_RECIPE_STEPS
    out = [f"data.synthetic_cohort={cfg.cohort}", f"data.synthetic_slides={cfg.slides}",
           f"data.holdout_fraction={cfg.holdout_fraction}", f"run.seed={seed}",
           f"model.init_seed={seed}", f"run.name=compare-{stage}-seed{seed}",
           f"run.storage_path={os.path.join(workdir, 'runs')}"]
    if stage == "stage2":
        out.append("align.shift_rank=0")  # the default; the demo sets 8 for its own cohort
    if steps is not None:
        out.append(f"optim.steps={steps}")
        if stage == "stage2":
            out.append(f"align.phase_steps={steps - steps // 4},{steps // 4}")
    own = cfg.stage1_overrides if stage == "stage1" else cfg.stage2_overrides
    return out + (list(STAGE1_RECIPE) if recipe else []) + list(cfg.overrides) + list(own)


def _retrieval_baseline(train: list, holdout: list, cohort: Any, mol: Any) -> dict[str, Any]:
    """Ridge from mean features to the standardised profiles (training statistics only)."""
    from care_scale.training.baselines import mean_pool, ridge_retrieval

    mapping = dict(zip(cohort.mapping()["slide_id"], cohort.mapping()["sample_id"]))
    out = {}
    for kind, frame in (("rna", cohort.rna.loc[:, mol.genes]), ("protein", cohort.protein)):
        prof = {smp: row for smp, row in zip(frame.index, frame.to_numpy(np.float32))}
        tr_y = np.stack([prof[mapping[s.slide_id]] for s in train])
        te_y = np.stack([prof[mapping[s.slide_id]] for s in holdout])
        hits = ridge_retrieval(mean_pool(train), tr_y, mean_pool(holdout), te_y)
        out[kind] = {"top1": round(hits[1], 4), "top5": round(hits[5], 4)}
    return out


def _goals(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's goals, checked on the measured numbers."""
    rows = table["classification"]
    goals = []
    for label in LABEL_NAMES:
        s1 = rows["stage1"][label]["slide"]["probe"]
        best_untrained = max(rows["untrained"][label]["slide"]["probe"]["values"])
        mean_pool = rows["mean_pooling"][label]["slide"]["probe"]["mean"]
        bar = max(best_untrained, mean_pool) + 0.10
        goals.append({
            "goal": f"stage I beats the best untrained seed and mean pooling by >= 0.10 "
                    f"({label}, slide probe; mean - std above the bar)",
            "measured": f"{s1['mean']:.3f} +- {s1['std']:.3f} vs bar {bar:.3f} (best untrained "
                        f"{best_untrained:.3f}, mean pooling {mean_pool:.3f})",
            "met": bool(s1["mean"] - s1["std"] > bar)})
        s2 = rows["stage2"][label]["slide"]["probe"]
        goals.append({
            "goal": f"stage II beats stage I on the molecular-dependent label ({label})",
            "measured": f"{s2['mean']:.3f} +- {s2['std']:.3f} vs {s1['mean']:.3f} +- "
                        f"{s1['std']:.3f}",
            "met": bool(s2["mean"] > s1["mean"])})
    pur = table["region_purity"]
    goals.append({"goal": "stage II region purity above stage I",
                  "measured": f"{pur['stage2']['mean']:.3f} vs {pur['stage1']['mean']:.3f} "
                              f"(windows {pur['windows']:.3f})",
                  "met": bool(pur["stage2"]["mean"] > pur["stage1"]["mean"])})
    for kind in ("rna", "protein"):
        got = table["retrieval"]["stage2"][kind]["top1"]
        ridge = table["retrieval"]["ridge"][kind]["top1"]
        goals.append({"goal": f"stage II {kind} retrieval top-1 above ridge from mean features",
                      "measured": f"{got['mean']:.3f} +- {got['std']:.3f} vs {ridge:.3f}",
                      "met": bool(got["mean"] > ridge)})
    return goals


def run_comparison(cfg: ComparisonConfig | None = None, *, workdir: str | None = None
                   ) -> dict[str, Any]:
    """Train, measure, compare (see the module doc); returns the whole table as a dict."""
    from care_scale.training.align import load_aligner, load_molecular
    from care_scale.training.baselines import mean_pool
    from care_scale.training.data import load_slides_for, model_in_dim, synthetic_slides
    from care_scale.training.demo import build_encoder, load_stage_config
    from care_scale.training.evaluate import (
        encode_for_eval,
        molecular_retrieval,
        region_purity,
        window_purity,
    )
    from care_scale.training.loop import fit

    cfg = cfg or ComparisonConfig()
    workdir = workdir or tempfile.mkdtemp(prefix="care-compare-")
    t0 = time.time()
    base = load_stage_config("stage2", None, _stage_overrides("stage2", cfg, 0, workdir),
                             demo=True, workdir=workdir)
    train, holdout = load_slides_for(base, train_only=False)
    _, cohort = synthetic_slides(base.data, embed_dim=model_in_dim(base.model))
    labels = {k: np.array([s.labels[k] for s in holdout]) for k in LABEL_NAMES}
    types = [s.patch_types for s in holdout]
    care_cfg = build_encoder(base, None).config

    encodings: dict[str, list[dict[str, Any]]] = {"untrained": [], "stage1": [], "stage2": []}
    retrieval: dict[str, list[dict[str, Any]]] = {"rna": [], "protein": []}
    train_seconds = []
    for seed in range(cfg.seeds):
        encodings["untrained"].append(encode_for_eval(build_encoder(base, None, seed), holdout))
        c1 = load_stage_config("stage1", None, _stage_overrides("stage1", cfg, seed, workdir),
                               demo=True, workdir=workdir)
        r1 = fit("stage1", c1)
        encodings["stage1"].append(encode_for_eval(build_encoder(c1, r1.output), holdout))
        c2 = load_stage_config("stage2", None, _stage_overrides("stage2", cfg, seed, workdir)
                               + [f"model.checkpoint={r1.output}"], demo=True, workdir=workdir)
        r2 = fit("stage2", c2)
        enc2 = build_encoder(c2, r2.output)
        encodings["stage2"].append(encode_for_eval(enc2, holdout))
        aligner, meta = load_aligner(r2.output, enc2, cfg=c2)
        for kind, hits in molecular_retrieval(aligner, meta, holdout, cohort).items():
            retrieval[kind].append(hits)
        train_seconds.append(round(r1.seconds + r2.seconds, 1))

    pooled = [{"slide": mean_pool(holdout)}]
    classification = {name: _classification(enc, labels, cfg.folds)
                      for name, enc in encodings.items()}
    classification["mean_pooling"] = _classification(pooled, labels, cfg.folds)
    classification["abmil_supervised"] = _abmil(holdout, labels, cfg)
    mol = load_molecular(base, cohort, fit_slides=[s.slide_id for s in train])
    table: dict[str, Any] = {
        "cohort": cfg.cohort, "train_slides": len(train), "heldout_slides": len(holdout),
        "seeds": cfg.seeds, "folds": cfg.folds,
        "classification": classification,
        "region_purity": {
            **{name: _mean_std([region_purity(e["regions"], types) for e in enc])
               for name, enc in encodings.items()},
            "windows": round(window_purity(holdout, int(care_cfg.subregion_size)), 4)},
        "expected_rank": {name: [e["expected_rank"] for e in enc]
                          for name, enc in encodings.items()},
        "e_star": float(care_cfg.e_star),
        "retrieval": {
            "stage2": {kind: {f"top{n}": _mean_std([h[n] for h in hits]) for n in (1, 5)}
                       for kind, hits in retrieval.items()},
            "ridge": _retrieval_baseline(train, holdout, cohort, mol),
            "chance_top1": round(1 / len(holdout), 4)},
        "train_seconds_per_seed": train_seconds,
        "total_seconds": None,
    }
    table["goals"] = _goals(table)
    table["total_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(workdir, "comparison.json"), "w") as fh:
        json.dump(table, fh, indent=1)
    table["workdir"] = workdir
    return table


def _abmil(holdout: list, labels: dict[str, np.ndarray], cfg: ComparisonConfig
           ) -> dict[str, Any]:
    """ABMIL's out-of-fold balanced accuracy per label, one value per seed (probe column)."""
    from sklearn.model_selection import StratifiedKFold

    from care_scale.evaluation.metrics import balanced_accuracy
    from care_scale.training.baselines import abmil_predict

    out: dict[str, Any] = {}
    for name, y in labels.items():
        scores = []
        for seed in range(cfg.seeds):
            pred = np.zeros_like(y)
            for tr, te in StratifiedKFold(cfg.folds, shuffle=True, random_state=0).split(y, y):
                pred[te] = abmil_predict([holdout[i] for i in tr], y[tr],
                                         [holdout[i] for i in te], seed=seed)
            scores.append(balanced_accuracy(y, pred))
        out[name] = {"slide": {"probe": _mean_std(scores)}}
    return out


def format_table(table: dict[str, Any]) -> str:
    """The comparison as plain text (what the demo prints and the README quotes)."""
    lines = [(f"cohort {table['cohort']}: {table['train_slides']} training / "
             f"{table['heldout_slides']} held-out slides; {table['seeds']} seeds; balanced "
             f"accuracy, {table['folds']}-fold CV on held-out slides (mean +- std over seeds)")]
    head = f"{'encoder':<18}" + "".join(f"{lab[:5] + ' ' + feat + ' ' + clf:>20}"
                                        for lab in LABEL_NAMES for feat in FEATURES
                                        for clf in CLASSIFIERS)
    lines.append(head)
    for name, rows in table["classification"].items():
        cells = []
        for lab in LABEL_NAMES:
            for feat in FEATURES:
                for clf in CLASSIFIERS:
                    v = rows[lab].get(feat, {}).get(clf)
                    cells.append(f"{v['mean']:.3f} +- {v['std']:.3f}" if v else "-")
        lines.append(f"{name:<18}" + "".join(f"{c:>20}" for c in cells))
    pur = table["region_purity"]
    lines.append("region purity: " + ", ".join(
        f"{k} {v['mean']:.3f} +- {v['std']:.3f}" if isinstance(v, dict) else f"{k} {v:.3f}"
        for k, v in pur.items()))
    ranks = {k: [round(x, 3) for x in v if x is not None] for k, v in
             table["expected_rank"].items()}
    lines.append(f"expected candidate rank (E* = {table['e_star']}): {ranks}")
    ret = table["retrieval"]
    for kind in ("rna", "protein"):
        s2 = ret["stage2"][kind]
        lines.append(f"{kind} retrieval: stage II top-1 {s2['top1']['mean']:.3f} +- "
                     f"{s2['top1']['std']:.3f}, top-5 {s2['top5']['mean']:.3f} +- "
                     f"{s2['top5']['std']:.3f}; ridge top-1 {ret['ridge'][kind]['top1']:.3f}, "
                     f"top-5 {ret['ridge'][kind]['top5']:.3f}; chance {ret['chance_top1']:.3f}")
    for g in table["goals"]:
        lines.append(f"[{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']}")
    lines.append(f"training seconds per seed: {table['train_seconds_per_seed']}; total "
                 f"{table['total_seconds']} s")
    return "\n".join(lines)
