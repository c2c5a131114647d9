"""``care-scale probe``: how well frozen embeddings predict a label, the CARE paper's way.

labels CSV + one model version's slide vectors (``embeddings``) -> samples (``labels``) ->
folds (``splits``: the CARE repository's split files, or stratified K-fold) -> per fold, the
classifier fitted on train with its hyper-parameter chosen on validation (``classifiers``) and
scored on test -> balanced accuracy, macro AUROC and weighted F1, mean and std over folds and a
bootstrap 95% interval (``metrics``); for survival (``time``/``event`` columns) a penalised
Cox model scored by Harrell's C-index -> a console table, JSON, and one row appended to the
warehouse's ``probes`` table, so results are queried like the embeddings:

    care-scale sql --warehouse WH "SELECT target, feature, model, auroc_mean FROM probes"
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from care_scale.choices import FeatureKind, ProbeModel, Unit
from care_scale.evaluation.embeddings import load_slide_vectors
from care_scale.evaluation.labels import Samples, join_labels
from care_scale.evaluation.metrics import (
    SURVIVAL_METRICS,
    Summary,
    compute,
    compute_survival,
    summarise,
)
from care_scale.evaluation.splits import Fold, read_split_files, stratified_folds
from care_scale.exceptions import LabelsError
from care_scale.storage import redact
from care_scale.warehouse import Warehouse

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ProbeConfig:
    warehouse: str
    labels: str
    target: str | None = None  # class-label column; None for survival
    time: str | None = None  # survival: follow-up time column (with ``event``; model cox)
    event: str | None = None
    feature: FeatureKind = "slide"
    model: ProbeModel = "logistic"
    unit: Unit = "auto"
    splits: str | None = None  # folder of splits_K.csv; None: stratified K-fold
    folds: int = 5
    seed: int = 0
    model_version: str | None = None
    bootstrap: int = 1000  # resamples of the 95% interval (at most metrics.MAX_RESAMPLES)
    standardize: bool = True  # logistic: on train features (kNN always standardises)
    record: bool = True  # append the result to the warehouse's probes table
    storage_options: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def survival(self) -> bool:
        return self.time is not None or self.event is not None

    @property
    def target_name(self) -> str:
        return f"survival:{self.time},{self.event}" if self.survival else str(self.target)

    def public(self) -> dict[str, Any]:
        """The config as recorded: storage options (credentials) left out, URIs redacted."""
        d = asdict(self)
        d.pop("storage_options")
        d["warehouse"], d["labels"] = redact(self.warehouse), redact(self.labels)
        return d


@dataclass
class ProbeResult:
    probe_id: str
    model_version: str
    config: ProbeConfig
    unit: str
    classes: dict[str, int]  # class -> number of samples
    folds: list[dict[str, Any]]  # name, sizes, chosen hyper-parameters, test metrics
    summary: dict[str, Summary]
    warnings: list[str]
    dropped: dict[str, int]

    @property
    def num_samples(self) -> int:
        return sum(self.classes.values())

    def to_dict(self) -> dict[str, Any]:
        return {"probe_id": self.probe_id, "model_version": self.model_version,
                "target": self.config.target_name, "feature": self.config.feature,
                "model": self.config.model, "unit": self.unit,
                "num_samples": self.num_samples, "classes": self.classes,
                "metrics": {k: v.as_dict() for k, v in self.summary.items()},
                "folds": self.folds, "warnings": self.warnings, "dropped": self.dropped,
                "config": self.config.public()}

    def format(self) -> str:
        cfg = self.config
        head = (f"probe {self.probe_id}: {cfg.target_name!r} from {cfg.feature} features, "
                f"{cfg.model}, model version {self.model_version}\n"
                f"{self.num_samples} {self.unit}s, classes "
                + ", ".join(f"{c}: {n}" for c, n in self.classes.items())
                + f"; {len(self.folds)} folds"
                + (f" from {cfg.splits}" if cfg.splits else f" (stratified, seed {cfg.seed})"))
        lines = [head, "", f"{'metric':<18} {'mean':>7} {'std':>7}  95% CI (bootstrap)"]
        for name, s in self.summary.items():
            lines.append(f"{name:<18} {s.mean:7.4f} {s.std:7.4f}  [{s.ci_low:.4f}, "
                         f"{s.ci_high:.4f}]")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def probes_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "probe_id": self.probe_id, "model_version": self.model_version,
            "target": self.config.target_name, "feature": self.config.feature,
            "model": self.config.model, "unit": self.unit,
            "labels_uri": redact(self.config.labels),
            "splits": redact(self.config.splits) if self.config.splits else "stratified",
            "num_samples": self.num_samples, "num_classes": len(self.classes),
            "num_folds": len(self.folds),
            "metrics_json": json.dumps({"summary": {k: v.as_dict()
                                                    for k, v in self.summary.items()},
                                        "folds": self.folds, "classes": self.classes,
                                        "dropped": self.dropped}, sort_keys=True),
            "config_json": json.dumps(self.config.public(), sort_keys=True),
        }
        for name, s in self.summary.items():
            row.update({f"{name}_{k}": v for k, v in s.as_dict().items()})
        return row


def _fit(config: ProbeConfig, x: np.ndarray, y: np.ndarray,
         val: tuple[np.ndarray, np.ndarray] | None, n_classes: int):
    from care_scale.evaluation.classifiers import fit_knn_probe, fit_logistic_probe

    if config.model == "logistic":
        return fit_logistic_probe(x, y, val, n_classes=n_classes,
                                  standardize=config.standardize, seed=config.seed)
    if config.model == "knn":
        return fit_knn_probe(x, y, val)
    raise LabelsError(redact(config.labels), f"unknown probe model {config.model!r}")


def _check(config: ProbeConfig) -> None:
    from care_scale.exceptions import ConfigError

    if config.survival:
        if not (config.time and config.event):
            raise ConfigError("survival probes need both --time and --event")
        if config.model != "cox":
            raise ConfigError(f"survival probes fit --model cox, not {config.model}")
    elif not config.target:
        raise ConfigError("a probe needs --target (or --time and --event for survival)")
    elif config.model == "cox":
        raise ConfigError("--model cox needs --time and --event")


def run_probe(config: ProbeConfig) -> ProbeResult:
    """Fit and score the probe on every fold; append the result to ``probes`` (``record``)."""
    _check(config)
    wh = Warehouse(config.warehouse, storage_options=config.storage_options)
    vectors = load_slide_vectors(wh, feature=config.feature, model_version=config.model_version)
    samples = join_labels(config.labels, vectors, target=config.target,
                          survival=(config.time, config.event) if config.survival else None,
                          unit=config.unit, storage_options=config.storage_options)
    warnings = list(samples.warnings)
    if config.splits:
        folds, split_warnings = read_split_files(config.splits, samples,
                                                 storage_options=config.storage_options)
        warnings += split_warnings
    else:
        folds = stratified_folds(samples, k=config.folds, seed=config.seed,
                                 source=redact(config.labels))
    run_fold = _survival_fold if config.survival else _classification_fold
    tests, fold_rows = [], []
    for fold in folds:
        arrays, chosen = run_fold(config, samples, fold)
        tests.append(arrays)
        fold_rows.append({"name": fold.name, "train": len(fold.train), "val": len(fold.val),
                          "test": len(fold.test), "chosen": chosen,
                          **(compute_survival if config.survival else compute)(*arrays)})
    if config.survival:
        summary = summarise(tests, n_resamples=config.bootstrap, seed=config.seed,
                            score=compute_survival, names=SURVIVAL_METRICS)
    else:
        summary = summarise(tests, n_resamples=config.bootstrap, seed=config.seed)
    result = ProbeResult(uuid.uuid4().hex[:12], vectors.model_version, config, samples.unit,
                         samples.class_counts(), fold_rows, summary, warnings, samples.dropped)
    if config.record:
        wh.append_probe({**result.probes_row(), "created_at": time.time()})
    return result


def _classification_fold(config: ProbeConfig, samples: Samples, fold: Fold
                         ) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """One fold's test (y_true, proba) and the hyper-parameters chosen on validation."""
    x, y = samples.x, samples.y
    if len(np.unique(y[fold.train])) < 2:
        raise LabelsError(redact(config.splits or config.labels),
                          f"{fold.name}: the training split holds one class only")
    val = (x[fold.val], y[fold.val]) if len(fold.val) else None
    fitted = _fit(config, x[fold.train], y[fold.train], val, len(samples.classes))
    return (y[fold.test], fitted.predict_proba(x[fold.test], len(samples.classes))), \
        fitted.chosen


def _survival_fold(config: ProbeConfig, samples: Samples, fold: Fold
                   ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, Any]]:
    """One fold's test (time, event, risk) and the Cox penalty chosen on validation."""
    from care_scale.evaluation.classifiers import fit_cox_probe

    t, e, x = samples.time, samples.y, samples.x
    val = (x[fold.val], t[fold.val], e[fold.val]) if len(fold.val) else None
    fitted = fit_cox_probe(x[fold.train], t[fold.train], e[fold.train], val)
    return (t[fold.test], e[fold.test], fitted.risk(x[fold.test])), fitted.chosen
