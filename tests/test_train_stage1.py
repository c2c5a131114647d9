"""Stage I learns on the known-answer cohort (2 Ray Train workers, CPU, tiny CARE)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import demo_in_new_process

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
def test_stage1_demo_trains_without_collapse(tmp_path):
    """Mechanics of the stage I demo (2 Ray Train workers). Whether stage I learns what a
    pooling baseline cannot is `care-scale train evaluate --demo`'s question (README: not yet,
    stage I stays at chance on the arrangement cohort); a probe gain on this composition
    cohort came only from the earlier teacher view without the top principal directions."""
    from care_scale.models import create_slide_encoder, model_version
    from care_scale.training.loop import read_metrics

    report = demo_in_new_process("stage1", tmp_path)
    print(json.dumps(report))
    assert report["steps"] == report["steps_planned"]
    # the loss falls (measured 6.24 -> 2.17)
    assert report["loss_last"] < report["loss_first"] - 0.5, report
    # no collapse: embeddings of a batch keep their spread
    assert report["emb_std_last"] > 0.5 * report["emb_std_first"], report
    assert report["emb_std_last"] > 1e-2
    # the RSL moves the expected candidate rank toward E* = 0.5
    hist = read_metrics(report["checkpoint"].rsplit("/final", 1)[0])
    first, last = hist[0]["expected_rank"], hist[-1]["expected_rank"]
    assert abs(last - 0.5) < abs(first - 0.5) - 0.01, (first, last)  # measured 0.043 -> 0.062
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


def _task(*extra: str):
    import torch

    from care_scale.config import load_config
    from care_scale.training.config import Stage1Config
    from care_scale.training.ssl import SSLTask

    cfg = load_config(Stage1Config, None, [
        "data.synthetic=true", "data.synthetic_cohort=arrangement", "data.synthetic_slides=8",
        "model.name=care_tiny", "optim.batch_size=4", "ssl.out_dim=16", "ssl.patch_out_dim=16",
        *extra])
    return SSLTask(cfg, rank=0, world=1, device=torch.device("cpu"))


def test_multi_crop_views_are_ibot_s():
    """Teacher: the 2 global views, unmasked; student: the same views (masked) + local crops,
    smaller, never masked."""
    task = _task("ssl.local_crops=2")
    teacher, student, mask = task._batch(0, 0)
    b = 4
    assert len(teacher["num_valid"]) == 2 * b and len(student["num_valid"]) == 4 * b
    assert (student["num_valid"][:2 * b] == teacher["num_valid"]).all()
    n = teacher["features"].shape[1]
    assert (student["features"][:2 * b, :n] == teacher["features"]).all()  # the same views
    assert mask[:2 * b].any() and not mask[2 * b:].any()
    assert student["num_valid"][2 * b:].float().mean() < teacher["num_valid"].float().mean()


def test_loss_falls_on_a_fixed_batch():
    import torch

    from care_scale.training.optim import param_groups

    task = _task("ssl.local_crops=1")
    opt = torch.optim.AdamW(param_groups(task.student.named_parameters()), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, _ = task.loss(0, 0)  # step 0, micro 0: the same batch every time
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def test_region_lr_scale_lets_the_rsl_move_the_expected_rank():
    """Only the RSL on a fixed batch: with the region scalars' own lr group the expected
    candidate rank moves toward E* over twice as far as at the weights' lr (measured: from
    0.176 to 0.225 at 1x, to 0.308 at 20x in 15 steps; E* = 0.5)."""
    import torch

    from care_scale.training.optim import param_groups

    moved = {}
    for scale in (1.0, 20.0):
        task = _task()
        teacher, _, _ = task._batch(0, 0)
        enc = task.student.encoder
        groups = param_groups(enc.named_parameters(), region_lr_scale=scale)
        opt = torch.optim.AdamW([{**g, "lr": 1e-3 * g["lr_scale"]} for g in groups])
        first = None
        for _ in range(15):
            out = enc(teacher["features"], teacher["num_valid"], teacher["grid"])
            rank = float(out.expected_rank.mean())
            first = rank if first is None else first
            opt.zero_grad()
            out.rsl_loss.backward()
            opt.step()
        e_star = enc.config.e_star
        moved[scale] = abs(first - e_star) - abs(rank - e_star)
    assert moved[1.0] >= 0 and moved[20.0] > 2 * max(moved[1.0], 1e-4), moved



def test_shared_patches_match_views_of_one_grid():
    """Two crops of a 6 x 6 grid: the pairs are exactly the patches both crops hold, at the
    right positions in each view; padding never matches."""
    import torch

    from care_scale.training.ssl import shared_patches

    yy, xx = np.mgrid[0:6, 0:6]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    a = np.nonzero((grid[:, 0] < 4) & (grid[:, 1] < 4))[0]  # top-left 4 x 4
    b = np.nonzero(grid[:, 0] >= 2)[0][::-1].copy()  # right 4 columns, reversed order
    pad = lambda idx, n: np.concatenate([idx, -np.ones(n - len(idx), np.int64)])
    s_index = torch.tensor(np.stack([pad(a, 24), pad(b[:5], 24)]))  # row 1: another item
    t_index = torch.tensor(np.stack([pad(b, 30)]))
    rs, ps, rt, pt = shared_patches(s_index, t_index, torch.tensor([[0, 0]]))
    assert (s_index[rs, ps] == t_index[rt, pt]).all()
    expect = sorted(set(a) & set(b))  # the 4 x 2 overlap
    assert sorted(s_index[rs, ps].tolist()) == expect and len(expect) == 8
    assert (rs == 0).all() and (rt == 0).all()


@pytest.mark.parametrize("kind", ["dino", "contrast", "bow"])
def test_region_loss_falls_on_a_fixed_batch(kind):
    """Each region-level objective alone: matched across the two global views, finite, and
    falling when trained on one batch."""
    import torch

    from care_scale.training.optim import param_groups

    task = _task("ssl.local_crops=0", f"ssl.region_loss={kind}", "ssl.loss_weight_slide=0",
                 "ssl.loss_weight_patch=0", "ssl.lambda_rsl=0")
    opt = torch.optim.AdamW(param_groups(task.student.named_parameters()), lr=2e-3)
    losses = []
    for _ in range(6):
        loss, metrics = task.loss(0, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["loss_region"])
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.02, losses


def test_block_mask_masks_contiguous_blocks():
    from care_scale.training.ssl import block_token_mask, random_token_mask

    yy, xx = np.mgrid[0:12, 0:12]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)[None].repeat(4, 0)
    num_valid = np.array([144, 144, 100, 30])
    rng = np.random.default_rng(0)

    def neighbour_share(mask):  # masked tokens with a masked 4-neighbour
        m = mask[0].reshape(12, 12)
        nb = np.zeros_like(m)
        nb[1:] |= m[:-1]
        nb[:-1] |= m[1:]
        nb[:, 1:] |= m[:, :-1]
        nb[:, :-1] |= m[:, 1:]
        return (m & nb).sum() / max(m.sum(), 1)

    block = block_token_mask(grid, num_valid, (0.2, 0.3), rng)
    share = block.sum(1) / num_valid
    assert ((share >= 0.19) & (share <= 0.31)).all(), share
    assert not block[2, 100:].any() and not block[3, 30:].any()  # padding never masked
    rand = random_token_mask(num_valid, 144, (0.2, 0.3), rng)
    assert neighbour_share(block) > 0.9 > neighbour_share(rand) + 0.3
