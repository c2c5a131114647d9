"""The pretraining comparison (care_scale/training/compare.py) and its parts: cohort wiring,
seeded initialisation, training-only statistics, contiguous crops, the baselines and the
metrics. The full comparison (3 seeds, demo schedules) is `care-scale train evaluate --demo`;
here it runs end to end at a toy size (slow-marked)."""

from __future__ import annotations

import numpy as np
import pytest

from care_scale.config import load_config
from care_scale.training.config import Stage2Config
from care_scale.training.data import load_slides_for, nearest_indices, synthetic_slides


def _cfg(*extra: str) -> Stage2Config:
    return load_config(Stage2Config, None, ["data.synthetic=true", "model.name=care_tiny",
                                            *extra])


def test_the_arrangement_cohort_feeds_training_with_both_labels():
    cfg = _cfg("data.synthetic_cohort=arrangement", "data.synthetic_slides=20",
               "data.holdout_fraction=0.5")
    train, hold = load_slides_for(cfg, train_only=False)
    assert len(train) == len(hold) == 10
    assert set(train[0].labels) == {"dominant_type", "arrangement", "focus"}
    assert train[0].label == train[0].labels["arrangement"]
    ys = [s.labels["focus"] for s in train + hold]
    assert sum(ys) == 10  # balanced by construction
    # the composition cohort stays the default
    slides, _ = synthetic_slides(_cfg("data.synthetic_slides=4").data, embed_dim=192)
    assert set(slides[0].labels) == {"dominant_type"}


def test_init_seed_changes_the_untrained_weights_and_none_keeps_the_registry_seed():
    import warnings

    from care_scale.models import create_slide_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = create_slide_encoder("care_tiny"), create_slide_encoder("care_tiny")
        c = create_slide_encoder("care_tiny", init_seed=1)
        d = create_slide_encoder("care_tiny", init_seed=1)
    w = "input_proj.weight"
    assert np.array_equal(a.state_dict()[w], b.state_dict()[w])
    assert np.array_equal(c.state_dict()[w], d.state_dict()[w])
    assert not np.array_equal(a.state_dict()[w], c.state_dict()[w])


def test_molecular_statistics_come_from_training_slides_only():
    from care_scale.training.align import load_molecular

    cfg = _cfg("data.synthetic_cohort=arrangement", "data.synthetic_slides=40",
               "data.holdout_fraction=0.5", "molecular.n_genes=50")
    train, hold = load_slides_for(cfg, train_only=False)
    _, cohort = synthetic_slides(cfg.data, embed_dim=192)
    mol = load_molecular(cfg, cohort, fit_slides=[s.slide_id for s in train])
    mapping = dict(zip(cohort.mapping()["slide_id"], cohort.mapping()["sample_id"]))
    z_train = np.stack([mol.rna[mapping[s.slide_id]] for s in train])
    z_hold = np.stack([mol.rna[mapping[s.slide_id]] for s in hold])
    np.testing.assert_allclose(z_train.mean(0), 0, atol=1e-4)  # standardised on these
    np.testing.assert_allclose(z_train.std(0), 1, atol=1e-3)
    assert np.abs(z_hold.mean(0)).max() > 0.05  # not on these
    assert len(mol.genes) == 50
    everything = load_molecular(cfg, cohort)
    assert not np.allclose(everything.rna_mean, mol.rna_mean)


def test_a_gene_list_is_capped_at_n_genes_most_variable_on_training_rows():
    from care_scale.training.molecular import MolecularTable, select_genes

    base = np.array([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0])[:, None]
    values = base * np.array([1, 5, 2, 4, 3])  # spread on the training rows: B > D > E > C > A
    values[4:, 0] = [100.0, -100.0]  # gene A varies only on the last two (held-out) rows
    table = MolecularTable(uri="t", samples=list("abcdef"), features=list("ABCDE"),
                           values=values.astype(np.float32))
    sel = select_genes(table, gene_list=["A", "B", "C", "D"], n_genes=2,
                       fit_rows=np.arange(4))
    assert sel.features == ["B", "D"]  # E is not in the list; A's variance is held-out only
    assert select_genes(table, gene_list=["A", "B"], n_genes=10).features == ["A", "B"]


def test_crops_of_large_slides_are_contiguous():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:100, 0:100]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    idx = nearest_indices(grid, rng, 400)
    assert len(idx) == 400 == len(np.unique(idx))
    kept = {tuple(p) for p in grid[idx]}
    with_neighbour = sum(any((x + dx, y + dy) in kept for dx, dy in
                             ((1, 0), (-1, 0), (0, 1), (0, -1))) for x, y in kept)
    assert with_neighbour == 400  # a random subset of 4% would leave most patches alone
    ext = grid[idx].max(0) - grid[idx].min(0) + 1
    assert ext.max() <= 30


def test_retrieval_topk_and_window_purity_on_known_answers():
    from care_scale.training.data import SlideFeatures
    from care_scale.training.evaluate import retrieval_topk, window_purity

    targets = np.eye(4, dtype=np.float32)
    queries = targets[[0, 1, 3, 2]] + 0.01  # pairs 2 and 3 swapped
    hits = retrieval_topk(queries, targets, ks=(1, 2))
    assert hits[1] == 0.5 and hits[2] == 1.0
    yy, xx = np.mgrid[0:8, 0:16]
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    types = (grid[:, 0] >= 8).astype(np.int64)  # left half type 0, right half type 1
    s = SlideFeatures("s", np.zeros((len(grid), 2), np.float32), grid, types)
    assert window_purity([s], 8) == 1.0
    shifted = SlideFeatures("s", s.features, grid + [4, 0], types)
    assert window_purity([shifted], 8) == 1.0  # windows start at the slide's own origin
    assert window_purity([s], 16) == 0.5


def test_abmil_finds_the_focus_that_mean_pooling_cannot():
    """The baselines: on the focus label (mean identical in both classes by construction)
    a probe on mean features stays near chance, ABMIL trained on the labels does not."""
    from sklearn.model_selection import StratifiedKFold

    from care_scale.evaluation.metrics import balanced_accuracy
    from care_scale.training.baselines import abmil_predict, mean_pool
    from care_scale.training.evaluate import cv_balanced_accuracy

    cfg = _cfg("data.synthetic_cohort=arrangement", "data.synthetic_slides=64")
    slides = load_slides_for(cfg)
    y = np.array([s.labels["focus"] for s in slides])
    assert cv_balanced_accuracy(mean_pool(slides), y, classifier="probe") < 0.65
    pred = np.zeros_like(y)
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=0).split(y, y):
        pred[te] = abmil_predict([slides[i] for i in tr], y[tr], [slides[i] for i in te])
    assert balanced_accuracy(y, pred) > 0.8


def test_train_evaluate_needs_the_demo_flag(capsys):
    from care_scale.cli import main

    assert main(["train", "evaluate"]) == 2
    assert "care-scale train evaluate --demo" in capsys.readouterr().err


def test_stage_only_settings_reach_their_stage_alone(tmp_path):
    """``--stage1-set`` goes to stage I only (stage II's config has no ``ssl`` section and
    rejects it), ``--set`` to both."""
    from care_scale.exceptions import ConfigError
    from care_scale.training.compare import ComparisonConfig, _stage_overrides
    from care_scale.training.demo import load_stage_config

    cfg = ComparisonConfig(overrides=["optim.lr=0.0007"],
                           stage1_overrides=["ssl.region_loss=contrast"],
                           stage2_overrides=["align.init_temperature=0.2"])
    c1, c2 = (load_stage_config(st, None, _stage_overrides(st, cfg, 1, str(tmp_path)),
                                demo=True, workdir=str(tmp_path)) for st in ("stage1", "stage2"))
    assert c1.ssl.region_loss == "contrast" and c2.align.init_temperature == 0.2
    assert c1.optim.lr == c2.optim.lr == 0.0007
    with pytest.raises(ConfigError, match="ssl"):  # what --set ssl.* would have done
        load_stage_config("stage2", None, ["ssl.region_loss=contrast"], demo=True,
                          workdir=str(tmp_path))


def test_stage_one_trains_the_recipe_unless_plain(tmp_path):
    """The comparison's stage I is STAGE1_RECIPE for STAGE1_RECIPE_STEPS (settings given on
    top still win); ``plain_stage1`` is SSLConfig's defaults on the demo schedule."""
    from care_scale.training.compare import (
        STAGE1_RECIPE_STEPS,
        ComparisonConfig,
        _stage_overrides,
    )
    from care_scale.training.config import SSLConfig
    from care_scale.training.demo import DEMO_STEPS, load_stage_config

    def stage1(**kw):
        return load_stage_config("stage1", None, _stage_overrides(
            "stage1", ComparisonConfig(**kw), 0, str(tmp_path)), demo=True,
            workdir=str(tmp_path))

    c = stage1()
    assert (c.ssl.shift_rank, c.ssl.global_shift, c.ssl.region_loss,
            c.ssl.loss_weight_region) == (8, 2.0, "contrast", 3.0)
    assert c.optim.steps == STAGE1_RECIPE_STEPS
    assert stage1(stage1_overrides=["ssl.shift_rank=0"], stage1_steps=50).ssl.shift_rank == 0
    assert stage1(stage1_steps=50).optim.steps == 50
    plain, default = stage1(plain_stage1=True), SSLConfig()
    assert (plain.ssl.shift_rank, plain.ssl.region_loss) == (default.shift_rank,
                                                             default.region_loss)
    assert plain.optim.steps == DEMO_STEPS["stage1"]
    s2 = load_stage_config("stage2", None, _stage_overrides(
        "stage2", ComparisonConfig(), 0, str(tmp_path)), demo=True, workdir=str(tmp_path))
    assert s2.optim.steps == DEMO_STEPS["stage2"]  # stage II: the demo schedule


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_at_toy_size(tmp_path, ray_local):
    """Mechanics only (6 steps a stage): every row, column and goal is measured and printed."""
    from care_scale.training.compare import ComparisonConfig, format_table, run_comparison

    # One Ray Train worker per fit: the mechanics are the same, the four fits start faster.
    overrides = ["run.log_every=2", "optim.warmup_steps=2", "run.num_workers=1"]
    table = run_comparison(ComparisonConfig(seeds=2, slides=40, stage1_steps=6,
                                            stage2_steps=8, overrides=overrides),
                           workdir=str(tmp_path))
    rows = table["classification"]
    assert set(rows) == {"untrained", "stage1", "stage2", "mean_pooling", "abmil_supervised"}
    for name in ("untrained", "stage1", "stage2"):
        cell = rows[name]["focus"]["roi"]["knn"]
        assert len(cell["values"]) == 2 and 0 <= cell["mean"] <= 1
    assert table["heldout_slides"] == 20
    assert 0 < table["region_purity"]["windows"] <= 1
    assert set(table["retrieval"]["stage2"]) == {"rna", "protein"}
    assert table["retrieval"]["chance_top1"] == pytest.approx(1 / 20)
    assert len(table["goals"]) == 7 and all(isinstance(g["met"], bool) for g in table["goals"])
    text = format_table(table)
    assert "mean_pooling" in text and "ridge top-1" in text and "NOT met" in text or "[met]" in text
    assert (tmp_path / "comparison.json").exists()
