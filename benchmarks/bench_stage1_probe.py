"""Where does stage I lose the arrangement label? Quick in-process screens (no Ray).

    python benchmarks/bench_stage1_probe.py untrained [--seeds 3]
    python benchmarks/bench_stage1_probe.py supervised [--label arrangement] [--steps 100]
    python benchmarks/bench_stage1_probe.py ssl [--steps 140] [--seeds 1] [--set ssl.region_loss=contrast ...]
    python benchmarks/bench_stage1_probe.py stage2 [--set ssl.* ...] [--variant "align.shift_rank=8;align.slide_lr_scale=0.3" ...]

On the comparison's cohort and split (``care-scale train evaluate --demo``: arrangement cohort,
240 slides, half held out), with its classifier (standardised logistic regression, 5-fold CV
balanced accuracy on the held-out slides), for several read-outs of one CARE:

- ``slide`` / ``roi``: what the comparison scores;
- ``tok_mean``: the mean contextualised patch token;
- ``reg_mean`` / ``reg_std`` / ``reg_max``: mean, std and max over a slide's region
  embeddings (not CARE outputs: they show whether the *regions* hold the label when the
  slide embedding, a weighted mean of them, does not).

``untrained``: seeded random CARE, and how much of the slide embedding's variance the slide's
stain offset (the top 4 principal directions of the slide mean features) and its composition
explain (cross-validated R^2). ``supervised``: CARE + a linear head trained on the label of
the training slides (an upper reference for the architecture). ``ssl``: SSLTask trained on one
process (one worker, batch 16 = the demo's 2 x 8; the demo's stage I settings), then probed.
``stage2``: that stage I (``--set``), then for each ``--variant`` (``;``-separated Stage2Config
overrides; none: one default variant) AlignTask from its weights on one process with the
comparison's stage II settings plus the variant's (240 steps, RNA then protein); all probed.
``data.*`` settings given with ``--set`` apply to the split and to both stages.
This is a screen: figures for the README come from ``care-scale train evaluate --demo``.
Prints one JSON line per encoder and the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch

COHORT = ["data.synthetic=true", "data.synthetic_cohort=arrangement",
          "data.synthetic_slides=240", "data.holdout_fraction=0.5", "model.name=care_tiny"]
# training.demo's stage I settings, one worker carrying the demo's global batch
SSL = ["optim.batch_size=16", "optim.warmup_steps=10", "optim.lr=5e-4", "ssl.out_dim=64",
       "ssl.patch_out_dim=64", "ssl.teacher_momentum=0.95"]
LABELS = ("arrangement", "focus")


def _config(extra: list[str]):
    from care_scale.config import load_config
    from care_scale.training.config import Stage1Config

    return load_config(Stage1Config, None, COHORT + SSL + extra)


@torch.no_grad()
def readouts(enc: torch.nn.Module, slides: list) -> dict[str, np.ndarray]:
    from care_scale.training.data import collate

    enc.eval()
    rows: dict[str, list] = {k: [] for k in ("slide", "roi", "tok_mean", "reg_mean", "reg_std",
                                             "reg_max")}
    for i in range(0, len(slides), 8):
        chunk = slides[i:i + 8]
        b = collate([{"features": s.features, "augmented": s.features,
                      "grid": s.grid - s.grid.min(0)} for s in chunk])
        out = enc(b["features"], b["num_valid"], b["grid"])
        for j, s in enumerate(chunk):
            reg = out.region_embeddings[j][out.region_mask[j]]
            rows["slide"].append(out.slide_embedding[j])
            rows["roi"].append(out.roi_embedding[j])
            rows["tok_mean"].append(out.patch_tokens[j, :len(s)].mean(0))
            rows["reg_mean"].append(reg.mean(0))
            rows["reg_std"].append(reg.std(0) if len(reg) > 1 else reg[0] * 0)
            rows["reg_max"].append(reg.max(0).values)
    return {k: torch.stack(v).float().numpy() for k, v in rows.items()}


def probe(enc: torch.nn.Module, holdout: list) -> dict[str, dict[str, float]]:
    from care_scale.training.evaluate import cv_balanced_accuracy

    parts = readouts(enc, holdout)
    return {lab: {k: round(cv_balanced_accuracy(v, np.array([s.labels[lab] for s in holdout]),
                                                classifier="probe"), 3)
                  for k, v in parts.items()} for lab in LABELS}


def variance_explained(enc: torch.nn.Module, holdout: list) -> dict[str, float]:
    """Cross-validated R^2 of the slide embedding from the stain offset / the composition."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_predict

    emb = readouts(enc, holdout)["slide"]
    emb = emb - emb.mean(0)
    means = np.stack([s.features.mean(0) for s in holdout])
    means -= means.mean(0)
    offset = means @ np.linalg.svd(means, full_matrices=False)[2][:4].T
    comp = np.stack([np.bincount(s.patch_types, minlength=7) / len(s) for s in holdout])

    def r2(x):
        pred = cross_val_predict(LinearRegression(), x, emb, cv=5)
        return round(float(1 - ((emb - pred) ** 2).sum() / (emb ** 2).sum()), 3)

    return {"r2_offset": r2(offset), "r2_composition": r2(comp)}


def train_supervised(train: list, label: str, steps: int, seed: int) -> torch.nn.Module:
    from care_scale.models import create_slide_encoder
    from care_scale.training.data import collate

    enc = create_slide_encoder("care_tiny", None, init_seed=seed)
    head = torch.nn.Linear(enc.config.hidden_dim, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)
    y = torch.tensor([s.labels[label] for s in train])
    rng = np.random.default_rng(seed)
    enc.train()
    for _ in range(steps):
        idx = rng.choice(len(train), 16, replace=False)
        b = collate([{"features": train[i].features, "augmented": train[i].features,
                      "grid": train[i].grid - train[i].grid.min(0)} for i in idx])
        out = enc(b["features"], b["num_valid"], b["grid"])
        loss = torch.nn.functional.cross_entropy(head(out.slide_embedding), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc


def optimise(task) -> torch.nn.Module:
    """The loop of care_scale.training.loop on one process (no DDP) for an SSLTask or an
    AlignTask: same lr schedule per phase, clipping and after-step hook (stage I's teacher
    EMA); returns what the stage saves (stage I: the teacher's encoder)."""
    from care_scale.training.loop import lr_at

    o = task.cfg.optim
    opt = torch.optim.AdamW(task.param_groups(o.lr), lr=o.lr, weight_decay=o.weight_decay)
    for step in range(o.steps):
        _, start, length = task.phase_of(step)
        lr = lr_at(step, base=o.lr, min_lr=o.min_lr, warmup=o.warmup_steps, start=start,
                   length=length)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        task.trainable.train()
        loss, _ = task.loss(step, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.trainable.parameters(), o.grad_clip)
        opt.step()
        task.after_step(step)
    return task.final_encoder()


def train_ssl(train: list, extra: list[str], steps: int, seed: int) -> torch.nn.Module:
    """Stage I (SSLTask) on one process (:func:`optimise`)."""
    from care_scale.training.ssl import SSLTask

    cfg = _config([f"optim.steps={steps}", f"run.seed={seed}", f"model.init_seed={seed}",
                   *extra])
    return optimise(SSLTask(cfg, rank=0, world=1, device=torch.device("cpu"), slides=train))


# training.demo's stage II settings, one worker carrying the demo's global batch, with the
# comparison's align.shift_rank=0 (training.compare)
ALIGN = ["optim.batch_size=16", "optim.warmup_steps=10", "optim.lr=1e-3",
         "align.phases=rna,protein", "align.phase_steps=180,60", "optim.steps=240",
         "align.shift_rank=0"]


def train_align(stage1: torch.nn.Module, extra: list[str], seed: int) -> torch.nn.Module:
    """Stage II (AlignTask) from ``stage1``'s weights on one process (:func:`optimise`)."""
    from care_scale.config import load_config
    from care_scale.training.align import AlignTask
    from care_scale.training.config import Stage2Config

    cfg = load_config(Stage2Config, None, COHORT + ALIGN + [f"run.seed={seed}",
                                                          f"model.init_seed={seed}", *extra])
    task = AlignTask(cfg, rank=0, world=1, device=torch.device("cpu"))  # its own split
    task.align_model.encoder.load_state_dict(stage1.state_dict())
    return optimise(task)


def main() -> None:
    from care_scale.training.data import load_slides_for

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["untrained", "supervised", "ssl", "stage2"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=140)
    p.add_argument("--label", default="arrangement", choices=LABELS)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="Stage1Config override for the ssl mode, e.g. ssl.region_loss=contrast")
    p.add_argument("--variant", dest="variants", action="append", default=[],
                   help="stage2 mode: one stage II variant, ';'-separated Stage2Config "
                        "overrides, e.g. 'align.shift_rank=8;align.slide_lr_scale=0.3'")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    data = [o for o in args.overrides if o.startswith("data.")]
    train, holdout = load_slides_for(_config(data), train_only=False)
    for seed in range(args.seeds):
        t0 = time.time()
        if args.mode == "untrained":
            from care_scale.models import create_slide_encoder

            enc = create_slide_encoder("care_tiny", None, init_seed=seed)
            extra = variance_explained(enc, holdout)
        elif args.mode == "supervised":
            enc, extra = train_supervised(train, args.label, args.steps, seed), {}
        elif args.mode == "ssl":
            enc, extra = train_ssl(train, args.overrides, args.steps, seed), {}
        else:
            enc1 = train_ssl(train, args.overrides, args.steps, seed)
            print(json.dumps({"mode": "stage1", "seed": seed, "overrides": args.overrides,
                              **probe(enc1, holdout)}), flush=True)
            for variant in args.variants or [""]:
                extra2 = [o for o in variant.split(";") if o]
                t1 = time.time()
                enc = train_align(enc1, data + extra2, seed)
                print(json.dumps({"mode": "stage2", "seed": seed, "variant": extra2,
                                  **probe(enc, holdout),
                                  "seconds": round(time.time() - t1, 1)}), flush=True)
            continue
        print(json.dumps({"mode": args.mode, "seed": seed, "steps": args.steps,
                          "overrides": args.overrides, **probe(enc, holdout), **extra,
                          "seconds": round(time.time() - t0, 1),
                          "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
