"""CARE.forward as its steps (care_scale.models.care): the split forward reproduces the
outputs saved before the split (tests/data/care_forward.npz, made by
tests/data/make_care_forward_fixture.py), and each step method does what its step says.

Integer and boolean outputs (regions, assignment, ROI) must be equal; float outputs within
1e-6 absolute: bit for bit on the machine that made the fixture (AVX-512), but CPUs with other
vector units (AVX2-only) round float32 matrix products differently, by up to 4e-7 here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from care_scale.models.care import CARE, CARE_OUTPUT_FIELDS, CareConfig

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_care_forward_fixture as fixture

FIXTURE = np.load(DATA / "care_forward.npz")


def saved_model(case: str) -> CARE:
    cfg = CareConfig(**json.loads(str(FIXTURE[f"{case}/config"])))
    model = CARE(cfg).eval()
    prefix = f"{case}/w/"
    state = {k[len(prefix):]: torch.from_numpy(FIXTURE[k]) for k in FIXTURE.files
             if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


def saved_inputs(case: str) -> dict[str, np.ndarray]:
    prefix = f"{case}/in/"
    return {k[len(prefix):]: FIXTURE[k] for k in FIXTURE.files if k.startswith(prefix)}


@pytest.mark.parametrize("case", sorted(fixture.CASES))
def test_forward_equals_the_outputs_saved_before_the_split(case):
    out = fixture.run_forward(saved_model(case), saved_inputs(case))
    for field in CARE_OUTPUT_FIELDS:
        got, want = getattr(out, field), torch.from_numpy(FIXTURE[f"{case}/out/{field}"])
        assert got.dtype == want.dtype, field
        if got.dtype.is_floating_point:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=field)
        else:
            assert torch.equal(got, want), field


def test_fixture_script_reproduces_the_saved_inputs_and_weights():
    case = "k4_aug"
    cname, aug, mask = fixture.CASES[case]
    i = list(fixture.CASES).index(case)
    inputs = fixture.make_inputs(i, fixture.CONFIGS[cname].in_dim, aug, mask)
    for k, v in saved_inputs(case).items():
        assert np.array_equal(inputs[k], v), k
    built = fixture.build(fixture.CONFIGS[cname], seed=100 + i).state_dict()
    saved = saved_model(case).state_dict()
    assert all(torch.equal(built[k], saved[k]) for k in saved)


# ---------------------------------------------------------------------------- one step each

@pytest.fixture
def steps():
    """The k4_aug model and its inputs run step by step (eval, no grad)."""
    model = saved_model("k4_aug")
    t = {k: torch.from_numpy(v) for k, v in saved_inputs("k4_aug").items()}
    with torch.no_grad():
        fp = model.flatten(t["features"], t["num_valid"], t["grid"])
        x, xa = model.embed(fp, t["features"], t["augmented"], None)
        sub = model.subregions(fp, x, xa)
        asg = model.assign(sub)
        reg = model.attend_regions(fp, sub, asg)
        fus = model.fuse(fp, reg, asg)
    return model, t, fp, sub, asg, reg, fus


def test_flatten_keeps_valid_patches_relative_to_each_slides_origin(steps):
    _, t, fp, *_ = steps
    nv = t["num_valid"]
    assert fp.flat.shape[0] == int(nv.sum()) and (fp.bsz, fp.n) == tuple(t["grid"].shape[:2])
    assert torch.equal(torch.bincount(fp.slide), nv)
    for b in range(fp.bsz):
        g = fp.grid[fp.slide == b]
        assert torch.equal(g.amin(0), torch.zeros(2, dtype=torch.long))
        assert torch.equal(g + t["grid"][b, :nv[b]].amin(0), t["grid"][b, :nv[b]])


def test_subregion_step_groups_patches_by_slide_and_window(steps):
    model, _, fp, sub, *_ = steps
    k = model.config.subregion_size
    assert torch.equal(sub.window, torch.div(sub.grid, k, rounding_mode="floor"))
    assert torch.equal(sub.grid, fp.grid[sub.perm]) and torch.equal(sub.slide, fp.slide[sub.perm])
    members = {}
    for i, gid in enumerate(sub.groups.gid.tolist()):
        members.setdefault(gid, set()).add((int(sub.slide[i]), *sub.window[i].tolist()))
    assert all(len(v) == 1 for v in members.values())  # one (slide, window) per sub-region
    assert len({next(iter(v)) for v in members.values()}) == len(members)  # and no two alike
    assert bool((sub.keys[1:] > sub.keys[:-1]).all())
    assert bool((sub.groups.counts <= k * k).all())
    centre = sub.window[sub.groups.starts].double() * k + (k - 1) / 2
    assert torch.equal(sub.anchor.double(), centre)
    h = model.config.hidden_dim
    assert sub.g_cls.shape == sub.g_q.shape == (sub.keys.shape[0], h)


def test_arg_assigns_each_patch_to_one_of_its_candidates(steps):
    *_, sub, asg, _, _ = steps
    m = sub.x.shape[0]
    chosen = asg.cand[torch.arange(m), asg.choice]
    assert torch.equal(asg.region, chosen)
    assert bool(asg.cand_ok[torch.arange(m), asg.choice].all())
    own = sub.groups.gid  # a patch's own window is always among its candidates
    assert bool(((asg.cand == own[:, None]) & asg.cand_ok).any(1).all())
    torch.testing.assert_close(asg.prob.sum(1), torch.ones(m))
    assert bool((asg.prob[~asg.cand_ok] == 0).all())
    assert torch.equal(asg.choice, asg.prob.argmax(1))
    torch.testing.assert_close(asg.gate, torch.ones(m, 1))  # 1 + p - p: 1 up to rounding


def test_arsa_regions_are_the_chosen_sub_regions_laid_out_per_slide(steps):
    _, _, fp, sub, asg, reg, _ = steps
    assert reg.g_ar.shape[0] == int(torch.unique(asg.region).numel())
    assert torch.equal(reg.slide, sub.slide[reg.perm][reg.groups.starts])
    assert torch.equal(reg.count, torch.bincount(reg.slide, minlength=fp.bsz))
    assert torch.equal(reg.mask.sum(1), reg.count)
    assert torch.equal(reg.embeddings[reg.mask], reg.g_ar)
    assert bool((reg.embeddings[~reg.mask] == 0).all())
    assert reg.tokens.shape == sub.x.shape


def test_spf_fused_weights_sum_to_one_per_slide_and_roi_is_their_argmax(steps):
    model, _, _, _, _, reg, fus = steps
    ones = torch.ones(fus.fused.shape[0])
    for w in (fus.coverage, fus.semantic, fus.fused):
        torch.testing.assert_close(w.sum(1), ones)
        assert bool((w[~reg.mask] == 0).all())
    lam = model.config.lambda_spf
    torch.testing.assert_close(fus.fused, lam * fus.coverage + (1 - lam) * fus.semantic)
    assert torch.equal(fus.roi, fus.fused.argmax(1))
    b = torch.arange(fus.roi.shape[0])
    assert torch.equal(fus.roi_embedding, reg.embeddings[b, fus.roi])
    torch.testing.assert_close(fus.slide_embedding,
                               (fus.fused[..., None] * reg.embeddings).sum(1))


def test_rsl_is_zero_when_e_bar_is_e_star_and_grows_away_from_it(steps):
    model = steps[0]
    e_star, k = model.config.e_star, model.config.num_candidates
    slide = torch.tensor([0, 0, 1, 1, 1])
    nv = torch.tensor([2, 3])
    middle = torch.zeros(5, k)
    middle[:, (k - 1) // 2] = 1.0  # rank (k-1)//2 / (k-1) = 0.5 = e_star for k = 3
    assert e_star == 0.5 and k == 3
    rsl = model.structuring(middle, slide, nv)
    assert torch.equal(rsl.rank_slide, torch.full((2,), 0.5)) and float(rsl.loss) == 0.0
    nearest = torch.zeros(5, k)
    nearest[:, 0] = 1.0  # everyone in the nearest candidate: E_bar = 0
    rsl = model.structuring(nearest, slide, nv)
    assert torch.equal(rsl.rank_patch, torch.zeros(5))
    assert float(rsl.loss) == pytest.approx(e_star**2)


def test_unflatten_returns_the_callers_layout_with_padding_marked(steps):
    model, t, fp, sub, _, reg, _ = steps
    tokens, region_of_patch = model.unflatten(fp, sub, reg)
    nv = t["num_valid"]
    assert tokens.shape == (fp.bsz, fp.n, model.config.hidden_dim)
    for b in range(fp.bsz):
        assert bool((region_of_patch[b, nv[b]:] == -1).all())
        assert bool((tokens[b, nv[b]:] == 0).all())
        assert bool(((region_of_patch[b, :nv[b]] >= 0)
                     & (region_of_patch[b, :nv[b]] < reg.count[b])).all())
