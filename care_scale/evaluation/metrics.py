"""Probe metrics, their summary over folds and a bootstrap 95% interval.

The three metrics of the CARE paper's tables, written in numpy because the bootstrap calls
them thousands of times (scikit-learn's functions validate their input on every call, which
costs more than the arithmetic; tests check these equal scikit-learn's):

- ``balanced_accuracy``: mean recall over the classes present in ``y_true``;
- ``macro_auroc``: one-vs-rest AUROC (Mann-Whitney, ties counted half) averaged over the
  classes that have both positives and negatives in ``y_true``; the binary AUROC for two
  classes (both one-vs-rest AUROCs equal it);
- ``weighted_f1``: per-class F1 (0 where undefined) weighted by support in ``y_true``.

Survival: ``c_index``, Harrell's concordance index of a risk score (higher risk = earlier
event), with scikit-survival's ``concordance_index_censored`` rules: a pair is comparable when
the earlier time is an event (a censored time tied with an event time counts as later), tied
risks count half.

Summary: mean and standard deviation (ddof=1) over folds; the interval is the 2.5 / 97.5
percentiles of the fold-mean under resampling each fold's test predictions with replacement
(``n_resamples`` resamples, seeded), i.e. the uncertainty of the reported mean from the finite
test sets, with the trained models held fixed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

METRICS = ("balanced_accuracy", "auroc", "weighted_f1")
SURVIVAL_METRICS = ("c_index",)
MAX_RESAMPLES = 10_000


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    total = 0.0
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        total += (2 * tp / denom if denom else 0.0) * np.sum(y_true == c)
    return float(total / len(y_true)) if len(y_true) else float("nan")


def _auroc(pos: np.ndarray, score: np.ndarray) -> float:
    from scipy.stats import rankdata

    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    ranks = rankdata(score)  # average ranks: ties count half
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """``proba``: (n, n_classes) scores of classes 0..n_classes-1."""
    y_true = np.asarray(y_true)
    aucs = []
    for c in np.unique(y_true):
        pos = y_true == c
        if 0 < pos.sum() < len(pos):
            aucs.append(_auroc(pos, proba[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def compute(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """All three metrics of one set of predictions (label = argmax of ``proba``)."""
    pred = np.argmax(proba, axis=1)
    return {"balanced_accuracy": balanced_accuracy(y_true, pred),
            "auroc": macro_auroc(y_true, proba), "weighted_f1": weighted_f1(y_true, pred)}


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
              *, tied_tol: float = 1e-8) -> float:
    """Harrell's C-index (NaN when no pair is comparable)."""
    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk)
    ti, tj = time[:, None], time[None, :]
    # i had the event first; j outlived i, or was censored at the same time.
    comparable = event[:, None] & ((tj > ti) | ((tj == ti) & ~event[None, :]))
    diff = risk[:, None] - risk[None, :]
    tied = np.abs(diff) <= tied_tol
    concordant = (diff > 0) & ~tied
    n = comparable.sum()
    if n == 0:
        return float("nan")
    return float(((concordant & comparable).sum() + 0.5 * (tied & comparable).sum()) / n)


def compute_survival(time: np.ndarray, event: np.ndarray, risk: np.ndarray
                     ) -> dict[str, float]:
    return {"c_index": harrell_c(time, event, risk)}


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "ci_low": self.ci_low,
                "ci_high": self.ci_high}


def summarise(folds: list[tuple[np.ndarray, ...]], *, n_resamples: int = 1000,
              seed: int = 0, score: Callable[..., dict[str, float]] = compute,
              names: tuple[str, ...] = METRICS) -> dict[str, Summary]:
    """Mean, std over folds and bootstrap 95% interval of each metric; ``folds``: each fold's
    test arrays for ``score`` ((y_true, proba) for ``compute``, (time, event, risk) for
    ``compute_survival``), resampled together."""
    if not 1 <= n_resamples <= MAX_RESAMPLES:
        raise ValueError(f"n_resamples must be 1..{MAX_RESAMPLES}, got {n_resamples}")
    per_fold = [score(*arrays) for arrays in folds]
    rng = np.random.default_rng(seed)
    boot = np.full((n_resamples, len(folds), len(names)), np.nan)
    for b in range(n_resamples):
        for f, arrays in enumerate(folds):
            idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
            m = score(*(a[idx] for a in arrays))
            boot[b, f] = [m[k] for k in names]
    out = {}
    with warnings.catch_warnings():
        # A resample whose every fold lacks a class has no AUROC: NaN, left out below.
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(boot, axis=1)  # (resamples, metrics): the fold-mean per resample
    for j, name in enumerate(names):
        vals = np.array([m[name] for m in per_fold], dtype=np.float64)
        ok = vals[np.isfinite(vals)]
        dist = means[:, j][np.isfinite(means[:, j])]
        lo, hi = (np.percentile(dist, [2.5, 97.5]) if dist.size else (np.nan, np.nan))
        out[name] = Summary(float(ok.mean()) if ok.size else float("nan"),
                            float(ok.std(ddof=1)) if ok.size > 1 else 0.0 if ok.size else
                            float("nan"), float(lo), float(hi))
    return out
