"""The frozen-feature classifiers of the CARE paper's probes, as its code fits them.

From the CARE repository (zdipath/CARE, ``train_wsi_model.py`` -> ``utils/core_utils.py``):

- Logistic regression (``train_logistic_regression_loop``): lbfgs, ``max_iter=1000``, one fit
  per regularisation strength lambda in ``logspace(-5, 6, 45)`` (``C = 1 / lambda``); the fit
  with the lowest log-loss on the validation split is kept (fitted on train only). Without a
  validation split: ``C = 0.5``, ``max_iter=10000``.
- kNN (``train_knn``): ``StandardScaler`` + ``KNeighborsClassifier`` (euclidean); k in
  (3, 5, ..., 19, 23) x weights uniform/distance, the best balanced accuracy on validation
  wins. Without a validation split: k = sqrt(n_train) made odd, clipped to 3..13, distance
  weights (the authors' rule for many folds).

Survival (``fit_cox_probe``; the CARE code has no survival probe, the paper reports linear
survival models scored by C-index): standardised features, scikit-survival's
``CoxPHSurvivalAnalysis`` with a ridge penalty alpha from ``COX_ALPHAS``, the alpha of best
validation C-index kept (fitted on train only); without validation alpha = 1. Chosen over
lifelines because it is a scikit-learn estimator (same pipelines and folds as the other
probes), its releases track our scikit-learn pin, and it needs no plotting stack.

One deliberate difference, on by default: features are standardised on the training split
for the logistic regression too (the issue asks for standardised features; the authors fit it
on raw features: ``standardize=False`` reproduces that). The training demos' quick probes
(``care_scale.training.evaluate``) use ``logistic`` and ``knn`` below with fixed settings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

#: CARE's regularisation grid: 45 values of lambda from 1e-5 to 1e6, C = 1 / lambda.
LAMBDAS = np.logspace(-5, 6, num=45)
KNN_KS = (3, 5, 7, 9, 11, 13, 15, 17, 19, 23)
KNN_WEIGHTS = ("uniform", "distance")
#: Ridge penalties of the Cox probe (on standardised features).
COX_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))


@dataclass
class Fitted:
    """A fitted classifier and what was chosen on validation (for the record)."""

    estimator: Any
    chosen: dict[str, Any]

    def predict_proba(self, x: np.ndarray, n_classes: int) -> np.ndarray:
        """Probabilities (n, n_classes) for classes 0..n_classes-1 (a class missing from the
        training split gets 0)."""
        p = self.estimator.predict_proba(x)
        out = np.zeros((len(x), n_classes))
        out[:, np.asarray(self.estimator.classes_, dtype=np.int64)] = p
        return out


def logistic(*, C: float = 1.0, max_iter: int = 1000, standardize: bool = True,
             seed: int = 0) -> Any:
    """An unfitted (StandardScaler +) lbfgs LogisticRegression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=C, max_iter=max_iter, random_state=seed, solver="lbfgs")
    return make_pipeline(StandardScaler(), lr) if standardize else lr


def knn(*, k: int, weights: str = "uniform", metric: str = "euclidean",
        standardize: bool = True) -> Any:
    """An unfitted (StandardScaler +) KNeighborsClassifier (brute force: exact neighbours)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = KNeighborsClassifier(n_neighbors=k, weights=weights, metric=metric,
                               algorithm="brute")
    return make_pipeline(StandardScaler(), clf) if standardize else clf


def _quiet_fit(est: Any, x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Weak regularisation on separable data stops at max_iter, as in the authors' runs
        # (they silence every warning); the validation loss judges the fit anyway.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(x, y)


def fit_logistic_probe(train_x: np.ndarray, train_y: np.ndarray,
                       val: tuple[np.ndarray, np.ndarray] | None, *, n_classes: int,
                       standardize: bool = True, seed: int = 0) -> Fitted:
    """CARE's logistic-regression probe: the C of lowest validation log-loss."""
    if val is None or len(val[1]) == 0:
        est = _quiet_fit(logistic(C=0.5, max_iter=10000, standardize=standardize, seed=seed),
                         train_x, train_y)
        return Fitted(est, {"C": 0.5, "selected_on": "none (no validation split)"})
    import copy

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Standardise once, then walk the grid from the strongest penalty to the weakest with
    # warm starts: each fit starts from the last optimum (the same optima as cold starts,
    # in a fraction of the lbfgs iterations; the authors cold-start every C).
    scaler = StandardScaler().fit(train_x) if standardize else None
    xs = scaler.transform(train_x) if scaler else train_x
    xv = scaler.transform(val[0]) if scaler else val[0]
    lr = logistic(standardize=False, seed=seed)
    lr.set_params(warm_start=True)
    best: tuple[float, float, Any] | None = None
    for lam in sorted(LAMBDAS, reverse=True):
        lr.set_params(C=1.0 / lam)
        _quiet_fit(lr, xs, train_y)
        loss = _log_loss(val[1], Fitted(lr, {}).predict_proba(xv, n_classes))
        if best is None or loss < best[0]:
            best = (loss, 1.0 / lam, copy.deepcopy(lr))
    est = make_pipeline(scaler, best[2]) if scaler else best[2]
    return Fitted(est, {"C": float(best[1]), "val_log_loss": float(best[0])})


def fit_knn_probe(train_x: np.ndarray, train_y: np.ndarray,
                  val: tuple[np.ndarray, np.ndarray] | None) -> Fitted:
    """CARE's kNN probe: k and weights of best validation balanced accuracy."""
    from care_scale.evaluation.metrics import balanced_accuracy

    n = len(train_y)
    if val is None or len(val[1]) == 0:
        k = int(np.sqrt(n))
        k = int(np.clip(k if k % 2 else k + 1, 3, 13))
        k = min(k, n)
        est = knn(k=k, weights="distance").fit(train_x, train_y)
        return Fitted(est, {"k": k, "weights": "distance",
                            "selected_on": "none (no validation split)"})
    best: tuple[float, int, str, Any] | None = None
    for k in [k for k in KNN_KS if k <= n] or [n]:
        for w in KNN_WEIGHTS:
            est = knn(k=k, weights=w).fit(train_x, train_y)
            score = balanced_accuracy(val[1], est.predict(val[0]))
            if best is None or score > best[0]:  # first best in grid order, as theirs
                best = (score, k, w, est)
    return Fitted(best[3], {"k": best[1], "weights": best[2],
                            "val_balanced_accuracy": float(best[0])})


def _log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    p = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return float(-np.log(p).mean())


@dataclass
class FittedCox:
    estimator: Any
    chosen: dict[str, Any]

    def risk(self, x: np.ndarray) -> np.ndarray:
        """Risk scores (log partial hazard: higher = earlier event)."""
        return np.asarray(self.estimator.predict(x), np.float64)


def _cox(alpha: float) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    return make_pipeline(StandardScaler(), CoxPHSurvivalAnalysis(alpha=alpha, n_iter=200))


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    out = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    out["event"], out["time"] = np.asarray(event, bool), np.asarray(time, np.float64)
    return out


def _fit_cox(alpha: float, x: np.ndarray, time: np.ndarray, event: np.ndarray) -> Any:
    with warnings.catch_warnings():
        # Weak penalties on small cohorts stop before convergence; the validation C-index
        # judges the fit, as for the logistic probe.
        warnings.simplefilter("ignore")
        return _cox(alpha).fit(x, _surv(time, event))


def fit_cox_probe(train_x: np.ndarray, train_time: np.ndarray, train_event: np.ndarray,
                  val: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> FittedCox:
    """Ridge-penalised Cox model, alpha of best validation C-index (see the module doc)."""
    from care_scale.evaluation.metrics import harrell_c

    if val is None or len(val[0]) == 0 or not np.any(val[2]):
        est = _fit_cox(1.0, train_x, train_time, train_event)
        return FittedCox(est, {"alpha": 1.0, "selected_on": "none (no validation events)"})
    best: tuple[float, float, Any] | None = None
    for alpha in COX_ALPHAS:
        est = _fit_cox(alpha, train_x, train_time, train_event)
        c = harrell_c(val[1], val[2], FittedCox(est, {}).risk(val[0]))
        if best is None or c > best[0]:
            best = (c, alpha, est)
    return FittedCox(best[2], {"alpha": best[1], "val_c_index": float(best[0])})
