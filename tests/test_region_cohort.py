"""The arrangement cohort (care_scale/synthetic/regions.py): labels a mean of the patch
features cannot tell apart, but the spatial structure of the tissue types can."""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from care_scale.synthetic.regions import (
    LABELS,
    N_TYPES,
    TUMOUR,
    largest_component_share,
    make_region_cohort,
)


def _cv_balanced_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return balanced_accuracy_score(y, cross_val_predict(probe, x, y, cv=folds))


def _grid(coords: np.ndarray) -> np.ndarray:
    step = np.diff(np.unique(coords[:, 0])).min()
    return (coords - coords.min(0)) // step


def test_cohort_is_deterministic_and_labels_are_balanced():
    a, b = make_region_cohort(24, seed=3), make_region_cohort(24, seed=3)
    other = make_region_cohort(24, seed=4)
    assert np.array_equal(a.slides[0].features, b.slides[0].features)
    assert not np.array_equal(a.slides[0].features, other.slides[0].features)
    assert np.array_equal(a.rna, b.rna)
    for name in LABELS:
        y = np.asarray(a.label_sets[name])
        assert len(y) == 24 and y.sum() == 12, name  # exactly half each class


def test_mean_pooling_is_at_chance_while_the_tumour_focus_answers_arrangement():
    cohort = make_region_cohort(160, seed=0)
    means = np.stack([s.features.mean(0) for s in cohort.slides])
    for name in LABELS:
        y = np.asarray(cohort.label_sets[name])
        assert _cv_balanced_accuracy(means, y) < 0.65, name
    # The same probe on one region-level statistic (the share of the slide in the tumour's
    # largest connected component) solves the arrangement label: the answer is spatial.
    share = np.array([[largest_component_share(_grid(s.coords), s.patch_types, N_TYPES)[TUMOUR]]
                      for s in cohort.slides])
    assert _cv_balanced_accuracy(share, np.asarray(cohort.label_sets["arrangement"])) > 0.95
