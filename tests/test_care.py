"""Properties of the CARE slide encoder (care_scale.models.care), on the CPU, seeded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from care_scale.exceptions import ConfigError, ModelInputError
from care_scale.models import (
    CARE_OUTPUT_FIELDS,
    CareConfig,
    UntrainedWeightsWarning,
    coords_to_grid,
    create_slide_encoder,
    get_patch_encoder_spec,
    get_slide_encoder_spec,
    reference_adapter,
)

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::care_scale.models.UntrainedWeightsWarning")

D = 192  # care_tiny in_dim


@pytest.fixture
def care():
    return create_slide_encoder("care_tiny")


def grid_xy(w: int, h: int) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2)


def rand_feats(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def three_blob_slide(rng, side=28, means=None, noise=0.8):
    """Tissue = three touching blobs (Voronoi cells of random centres, cut to a disk)."""
    centres = rng.uniform(0, side, size=(3, 2))
    pts = grid_xy(side, side)
    d = ((pts[:, None, :] - centres[None]) ** 2).sum(-1)
    lab = d.argmin(1)
    keep = d.min(1) < (side * 0.45) ** 2
    pts, lab = pts[keep], lab[keep]
    f = means[lab] + noise * rng.normal(size=(len(lab), D))
    return f.astype(np.float32), pts, lab


def purity(assign: np.ndarray, lab: np.ndarray) -> float:
    return sum(np.bincount(lab[assign == r]).max() for r in np.unique(assign)) / len(lab)


# ------------------------------------------------------------------------------ basic contract

def test_untrained_model_warns_loudly():
    with pytest.warns(UntrainedWeightsWarning, match="UNTRAINED"):
        create_slide_encoder("care_tiny")


def test_registry_entries_pair_with_patch_encoders():
    for name in ("care", "care_tiny"):
        spec = get_slide_encoder_spec(name)
        assert spec.in_dim == get_patch_encoder_spec(spec.patch_encoder).embed_dim
    cfg = get_slide_encoder_spec("care").config
    assert (cfg["in_dim"], cfg["hidden_dim"], cfg["num_heads"], cfg["subregion_size"],
            cfg["lambda_spf"], cfg["lambda_rsl"], cfg["e_star"]) == (768, 512, 8, 8, 0.5, 0.1, 0.5)


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="divisible"):
        create_slide_encoder("care_tiny", hidden_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="unknown fields"):
        create_slide_encoder("care_tiny", hiden_dim=64)
    with pytest.raises(ConfigError):
        CareConfig(lambda_spf=1.5).validate()


def test_output_shapes_and_partition(care):
    xy = grid_xy(30, 20)
    enc = care.encode(rand_feats(len(xy)), xy * 224)
    r = enc.num_regions
    assert enc.slide_embedding.shape == (64,)
    assert enc.region_embeddings.shape == (r, 64) and enc.roi_embedding.shape == (64,)
    assert enc.patch_step == 224
    # Every patch is in exactly one region and every region has patches.
    assert enc.region_of_patch.shape == (len(xy),)
    assert enc.region_of_patch.min() == 0 and enc.region_of_patch.max() == r - 1
    assert (np.bincount(enc.region_of_patch, minlength=r) > 0).all()
    # Coverage is the share of the slide's patches per region.
    np.testing.assert_allclose(enc.coverage, np.bincount(enc.region_of_patch) / len(xy),
                               rtol=1e-6)
    np.testing.assert_allclose(enc.semantic_weight.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(enc.fused_weight, 0.5 * enc.coverage + 0.5 * enc.semantic_weight,
                               rtol=1e-5)
    assert enc.roi_index == int(np.argmax(enc.fused_weight))
    np.testing.assert_allclose(enc.roi_embedding, enc.region_embeddings[enc.roi_index])
    # z = sum_i fused_i * g_ar_i
    np.testing.assert_allclose(enc.slide_embedding, enc.fused_weight @ enc.region_embeddings,
                               rtol=1e-4, atol=1e-5)
    assert enc.model_version.startswith("care_tiny-")
    # 30 x 20 positions in 8 x 8 windows: 4 x 3 non-empty sub-regions -> 12 candidate regions.
    assert 1 <= r <= 12


def test_regions_are_adaptive_not_the_fixed_grid(care):
    xy = grid_xy(32, 32)
    enc = care.encode(rand_feats(len(xy), seed=3), xy)
    window = (xy[:, 1] // 8) * 4 + xy[:, 0] // 8
    # Irregular: some patches leave their own window ...
    assert 0 < (enc.region_of_patch != window).mean() < 0.5
    # ... but only for a neighbouring one (spatially coherent).
    for r in range(enc.num_regions):
        pts = xy[enc.region_of_patch == r]
        assert np.ptp(pts[:, 0]) < 24 and np.ptp(pts[:, 1]) < 24


def test_deterministic_in_eval_and_across_builds(care):
    xy = grid_xy(20, 20)
    f = rand_feats(len(xy), seed=1)
    a = care.encode(f, xy)
    b = care.encode(f, xy)
    c = create_slide_encoder("care_tiny").encode(f, xy)
    for other in (b, c):
        np.testing.assert_array_equal(a.slide_embedding, other.slide_embedding)
        np.testing.assert_array_equal(a.region_of_patch, other.region_of_patch)
    assert a.model_version == c.model_version


def test_order_invariance_and_equivariance(care):
    xy = grid_xy(25, 18)
    f = rand_feats(len(xy), seed=2)
    perm = np.random.default_rng(7).permutation(len(xy))
    a = care.encode(f, xy)
    b = care.encode(f[perm], xy[perm])
    np.testing.assert_allclose(a.slide_embedding, b.slide_embedding, atol=1e-5)
    np.testing.assert_array_equal(a.region_of_patch[perm], b.region_of_patch)
    np.testing.assert_allclose(a.fused_weight, b.fused_weight, atol=1e-6)
    assert a.roi_index == b.roi_index
    with torch.no_grad():
        ta = care(torch.from_numpy(f)[None], torch.tensor([len(xy)]), torch.from_numpy(xy)[None])
        tb = care(torch.from_numpy(f[perm])[None], torch.tensor([len(xy)]),
                  torch.from_numpy(xy[perm])[None])
    torch.testing.assert_close(ta.patch_tokens[0, perm], tb.patch_tokens[0], atol=1e-5, rtol=0)


def test_float16_features_and_duplicate_positions(care):
    xy = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [5, 5]])
    f = rand_feats(5)
    with torch.no_grad():
        out = care(torch.from_numpy(f).half()[None], torch.tensor([5]), torch.from_numpy(xy)[None])
    assert out.slide_embedding.dtype == torch.float32
    assert (out.region_of_patch[0] >= 0).all()
    assert care.encode(f, xy, patch_step=1).region_of_patch.shape == (5,)


def test_translation_invariance(care):
    xy = grid_xy(20, 15)
    f = rand_feats(len(xy), seed=4)
    a = care.encode(f, xy, patch_step=1)
    b = care.encode(f, xy + np.array([1003, 517]), patch_step=1)
    np.testing.assert_allclose(a.slide_embedding, b.slide_embedding, atol=1e-6)


def test_batch_with_padding_equals_single_slides(care):
    slides = [(grid_xy(20, 20), rand_feats(400, seed=10)),
              (grid_xy(9, 7), rand_feats(63, seed=11)),
              (grid_xy(1, 1), rand_feats(1, seed=12))]
    n = max(len(xy) for xy, _ in slides)
    feats = torch.full((3, n, D), 1e6)  # padding content must not matter
    grid = torch.full((3, n, 2), 10**6, dtype=torch.long)
    nv = torch.tensor([len(xy) for xy, _ in slides])
    for i, (xy, f) in enumerate(slides):
        feats[i, : len(xy)] = torch.from_numpy(f)
        grid[i, : len(xy)] = torch.from_numpy(xy)
    with torch.no_grad():
        out = care(feats, nv, grid)
    assert tuple(out.region_of_patch.shape) == (3, n)
    for i, (xy, f) in enumerate(slides):
        single = care.encode(f, xy, patch_step=1)
        r = single.num_regions
        assert int(out.num_regions[i]) == r
        np.testing.assert_allclose(out.slide_embedding[i].numpy(), single.slide_embedding,
                                   atol=1e-5)
        np.testing.assert_array_equal(out.region_of_patch[i, : len(xy)].numpy(),
                                      single.region_of_patch)
        assert (out.region_of_patch[i, len(xy):] == -1).all()
        assert not out.region_mask[i, r:].any() and out.region_mask[i, :r].all()
        assert (out.patch_tokens[i, len(xy):] == 0).all()


# ------------------------------------------------------------------------------ edge cases

def test_one_patch_and_fewer_than_a_window(care):
    one = care.encode(rand_feats(1), np.array([[5000, 7000]]))
    assert one.num_regions == 1 and one.region_of_patch.tolist() == [0]
    np.testing.assert_allclose(one.slide_embedding, one.region_embeddings[0], rtol=1e-6)
    few = care.encode(rand_feats(5), np.array([[0, 0], [224, 0], [448, 0], [0, 224],
                                                [224, 224]]))
    assert few.num_regions == 1 and (few.region_of_patch == 0).all()


def test_disconnected_pieces_never_share_a_region(care):
    a, b = grid_xy(12, 10), grid_xy(7, 9) + np.array([400, 250])
    xy = np.concatenate([a, b])
    enc = care.encode(rand_feats(len(xy), seed=5), xy * 256, patch_step=256)
    piece = np.r_[np.zeros(len(a), int), np.ones(len(b), int)]
    for r in range(enc.num_regions):
        assert len(set(piece[enc.region_of_patch == r])) == 1


def test_coordinates_off_the_step_lattice():
    xy = grid_xy(6, 5)
    coords = 37 + xy * 256 + np.random.default_rng(0).integers(-3, 4, size=xy.shape)
    grid, step = coords_to_grid(coords)
    assert step == 256
    grid, step = coords_to_grid(coords, 256)
    np.testing.assert_array_equal(grid, xy)
    grid, step = coords_to_grid(13 + xy * 224)
    assert step == 224
    np.testing.assert_array_equal(grid, xy)


def test_encode_with_offset_coordinates_matches_clean_grid(care):
    xy = grid_xy(12, 12)
    f = rand_feats(len(xy), seed=6)
    a = care.encode(f, xy * 224, patch_step=224)
    b = care.encode(f, 101 + xy * 224)
    np.testing.assert_allclose(a.slide_embedding, b.slide_embedding, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(care, bad):
    f = rand_feats(50)
    f[7, 3] = bad
    with pytest.raises(ModelInputError, match="NaN or inf"):
        care.encode(f, grid_xy(10, 5))


def test_empty_input_is_refused(care):
    with pytest.raises(ModelInputError, match="empty|non-empty"):
        care.encode(np.zeros((0, D), np.float32), np.zeros((0, 2)))
    with pytest.raises(ModelInputError, match="empty"):
        care(torch.zeros(2, 4, D), torch.tensor([4, 0]), torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ModelInputError, match=r"\(B, N, 192\)"):
        care(torch.zeros(1, 4, 10), torch.tensor([4]), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ModelInputError, match="coords"):
        care.encode(rand_feats(4), None)
    huge = torch.tensor([[[0, 0], [10**10, 10**10], [3, 4]]])
    with pytest.raises(ModelInputError, match="pixel coordinates"):
        care(torch.zeros(1, 3, D), torch.tensor([3]), huge)


# ------------------------------------------------------------------------------ training signal

def test_contrastive_gradients_reach_region_shaping_parameters(care):
    care.train()
    rng = np.random.default_rng(0)
    xy = grid_xy(16, 16)
    f = torch.from_numpy(rng.normal(size=(4, len(xy), D)).astype(np.float32))
    g = torch.from_numpy(xy)[None].repeat(4, 1, 1)
    nv = torch.full((4,), len(xy))
    za = care(f + 0.3 * torch.randn_like(f), nv, g, augmented=f).slide_embedding
    zb = care(f + 0.3 * torch.randn_like(f), nv, g).slide_embedding
    logits = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T / 0.1
    loss = F.cross_entropy(logits, torch.arange(4))  # slide-level loss only, no aux loss
    loss.backward()
    shaping = {"log_sigma": care.log_sigma, "log_tau": care.log_tau,
               "sub_query.query": care.sub_query.query, "sub_query.k.weight": care.sub_query.k.weight,
               "sub_cls": care.sub_cls, "sub_pos.weight": care.sub_pos.weight}
    for name, p in shaping.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_region_structuring_loss(care):
    xy = grid_xy(16, 16)
    f = torch.from_numpy(rand_feats(len(xy)))[None]
    out = care.train()(f, torch.tensor([len(xy)]), torch.from_numpy(xy)[None])
    assert 0.0 <= out.rsl_loss.item() <= 0.25
    torch.testing.assert_close(out.aux_loss, 0.1 * out.rsl_loss)
    out.aux_loss.backward()
    assert care.log_sigma.grad.abs() > 0  # RSL moves the inclusion width


def test_adaptive_regions_purer_than_fixed_windows_after_training(care):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, D))
    opt = torch.optim.AdamW(care.parameters(), lr=1e-3)
    care.train()
    for _ in range(8):  # brief slide-level contrastive training on fresh synthetic slides
        slides = [three_blob_slide(rng, side=20, means=means) for _ in range(4)]
        n = max(len(s[0]) for s in slides)
        feats = torch.zeros(4, n, D)
        grid = torch.zeros(4, n, 2, dtype=torch.long)
        nv = torch.tensor([len(s[0]) for s in slides])
        for i, (f, p, _) in enumerate(slides):
            feats[i, : len(f)], grid[i, : len(f)] = torch.from_numpy(f), torch.from_numpy(p)
        a = care(feats + 0.5 * torch.randn_like(feats), nv, grid)
        b = care(feats + 0.5 * torch.randn_like(feats), nv, grid)
        logits = (F.normalize(a.slide_embedding, dim=-1)
                  @ F.normalize(b.slide_embedding, dim=-1).T / 0.1)
        loss = F.cross_entropy(logits, torch.arange(4)) + a.aux_loss + b.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    care.eval()
    adaptive, fixed = [], []
    for seed in range(3):
        f, pts, lab = three_blob_slide(np.random.default_rng(100 + seed), means=means)
        enc = care.encode(f, pts, patch_step=1)
        adaptive.append(purity(enc.region_of_patch, lab))
        fixed.append(purity((pts[:, 1] // 8) * 1000 + pts[:, 0] // 8, lab))
    print(f"purity adaptive {np.mean(adaptive):.3f} fixed {np.mean(fixed):.3f}")
    assert np.mean(adaptive) > np.mean(fixed) + 0.03, (adaptive, fixed)


# ------------------------------------------------------------------------------ interfaces

def test_reference_call_shape(care):
    xy = grid_xy(10, 10)
    x = torch.zeros(2, 100, D)
    x[0] = torch.from_numpy(rand_feats(100))
    x[1, :40] = torch.from_numpy(rand_feats(40, seed=1))
    coords = torch.from_numpy(xy * 512)[None].repeat(2, 1, 1)
    slide, regions, num_regions, aux = reference_adapter(care)(x, torch.tensor([100, 40]), coords)
    assert slide.shape == (2, 64) and regions.shape[0] == 2 and regions.shape[2] == 64
    assert num_regions.tolist()[1] <= num_regions.tolist()[0] and aux.ndim == 0
    single = care.encode(x[1, :40].numpy(), xy[:40] * 512)
    np.testing.assert_allclose(slide[1].detach().numpy(), single.slide_embedding, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_forward_traces_for_onnx_with_dynamic_patch_count(care, tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, f, nv, g):
            return self.m(f, nv, g).as_tuple()

    def data(w, h, seed):
        xy = grid_xy(w, h)
        return (torch.from_numpy(rand_feats(len(xy), seed))[None], torch.tensor([len(xy)]),
                torch.from_numpy(xy)[None])

    path = tmp_path / "care.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(Wrapper(care), data(20, 15, 0), str(path), dynamo=False,
                          opset_version=17, input_names=["features", "num_valid", "grid"],
                          output_names=list(CARE_OUTPUT_FIELDS),
                          dynamic_axes={"features": {1: "N"}, "grid": {1: "N"}})
    sess = ort.InferenceSession(str(path))
    for w, h in ((40, 31), (3, 2), (1, 1)):
        f, nv, g = data(w, h, 1)
        with torch.no_grad():
            ref = care(f, nv, g)
        got = sess.run(None, {"features": f.numpy(), "num_valid": nv.numpy(), "grid": g.numpy()})
        np.testing.assert_allclose(got[0], ref.slide_embedding.numpy(), atol=1e-4)
        np.testing.assert_array_equal(got[4], ref.region_of_patch.numpy())


@pytest.mark.slow
def test_paper_size_care_on_20k_patches_fits_in_memory():
    # Own process: ru_maxrss is per process and must not include other tests' peaks.
    code = textwrap.dedent("""
        import resource, warnings, torch, numpy as np
        warnings.simplefilter("ignore")
        torch.set_num_threads(2)
        from care_scale.models import create_slide_encoder
        m = create_slide_encoder("care")
        n = 20000
        xy = np.stack(np.meshgrid(np.arange(160), np.arange(125)), -1).reshape(-1, 2)
        f = torch.randn(1, n, 768)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            out = m(f, torch.tensor([n]), torch.from_numpy(xy)[None])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert int(out.num_regions[0]) > 250
        print((after - before) // 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    grown_mb = int(res.stdout.strip().splitlines()[-1])
    assert grown_mb < 2500, f"CARE on 20k patches grew the process by {grown_mb} MB"
