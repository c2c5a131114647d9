"""Stage I learns on the known-answer cohort (2 Ray Train workers, CPU, tiny CARE)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from care_scale.training.data import SlideFeatures, split_sub_wsis


def _slide(grid: np.ndarray) -> SlideFeatures:
    return SlideFeatures("s", np.zeros((len(grid), 4), np.float32), grid.astype(np.int64))


def test_sub_wsis_by_dbscan_and_bound():
    yy, xx = np.mgrid[0:30, 0:30]
    big = np.stack([xx.ravel(), yy.ravel()], 1)  # 900 patches, one piece
    small = np.stack([xx[:5, :5].ravel() + 100, yy[:5, :5].ravel()], 1)  # far away: own piece
    speck = np.array([[200, 200], [202, 202]])  # isolated patches: dropped (< 8)
    slide = _slide(np.concatenate([big, small, speck]))
    subs = split_sub_wsis(slide, max_patches=360, eps=1.5)
    sizes = [len(s) for s in subs]
    assert max(sizes) <= 360 and sum(sizes) == 925
    assert 25 in sizes  # the separate tissue piece stays whole
    # every sub-WSI is spatially compact (bisection halves along the longer side)
    for s in subs:
        ext = s.grid.max(0) - s.grid.min(0) + 1
        assert len(s) >= 0.8 * ext.prod() or len(s) == 25
    again = [len(s) for s in split_sub_wsis(slide, max_patches=360, eps=1.5)]
    assert again == sizes  # deterministic
    assert [len(s) for s in split_sub_wsis(slide, max_patches=1000)] == [900, 25]


@pytest.mark.slow
def test_stage1_learns(tmp_path, ray_local):
    from care_scale.models import create_slide_encoder, model_version
    from care_scale.training.demo import run_demo

    report = run_demo("stage1", workdir=str(tmp_path), overrides=["run.checkpoint_every=1000"])
    print(json.dumps(report))
    assert report["steps"] == report["steps_planned"]
    # the loss falls
    assert report["loss_last"] < report["loss_first"] - 0.5, report
    # no collapse: embeddings of a batch keep their spread
    assert report["emb_std_last"] > 0.5 * report["emb_std_first"], report
    assert report["emb_std_last"] > 1e-2
    # the linear probe on held-out slides beats the same probe on the untrained encoder
    assert report["probe_accuracy_after"] > report["probe_accuracy_before"] + 0.05, report
    assert report["probe_accuracy_after"] > report["majority_baseline"] + 0.2, report
    # the final artifact is a CARE checkpoint the embedding job loads, with its version
    enc = create_slide_encoder("care_tiny", report["checkpoint"])
    assert model_version(enc) == report["model_version"]


def test_collapse_is_reported():
    import warnings

    import torch

    from care_scale.config import load_config
    from care_scale.training.config import Stage1Config
    from care_scale.training.ssl import CollapseWarning, SSLTask

    cfg = load_config(Stage1Config, None, ["data.synthetic=true", "data.synthetic_slides=6",
                                           "optim.batch_size=4", "ssl.out_dim=16",
                                           "ssl.patch_out_dim=16"])
    task = SSLTask(cfg, rank=0, world=1, device=torch.device("cpu"))
    _, metrics = task.loss(0, 0)
    assert metrics["emb_std"] > cfg.ssl.collapse_std  # healthy at start
    # Collapse the student for real: every slide embedding becomes the same vector.
    with torch.no_grad():
        for p in task.student.encoder.parameters():
            p.zero_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, metrics = task.loss(1, 0)
    assert metrics["emb_std"] < cfg.ssl.collapse_std
    assert any(issubclass(w.category, CollapseWarning) for w in caught)


@pytest.mark.gpu
def test_stage1_gpu_amp_nccl(tmp_path, ray_local):
    from care_scale.config import load_config
    from care_scale.training.config import Stage1Config
    from care_scale.training.loop import fit

    cfg = load_config(Stage1Config, None, [
        "data.synthetic=true", "data.synthetic_slides=16", "run.num_workers=1",
        "run.use_gpu=true", f"run.storage_path={tmp_path}", "optim.steps=4",
        "optim.warmup_steps=1", "optim.batch_size=4", "optim.mixed_precision=true"])
    result = fit("stage1", cfg)
    assert result.history[-1]["step"] == 4
