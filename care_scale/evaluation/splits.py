"""Train / validation / test splits of a probe: the CARE repository's split files, or folds.

Split files (``splits/<task>/splits_K.csv`` in zdipath/CARE, as CLAM writes them): one file per
fold, K = 0, 1, ...; a leading index column, then ``train``, ``val``, ``test`` columns of ids
padded with empty cells. They are used as they are (``val`` may be missing or empty: the
classifiers then fall back to the authors' no-validation settings). The ``splits_K_bool.csv``
and ``splits_K_descriptor.csv`` files beside them are ignored. Ids are sample ids (slide or
case ids); in a per-case probe a slide id stands for its case.

Generated folds: stratified K-fold (grouped by case when the labels give case ids, so one
patient's slides never straddle train and test), shuffled with the seed. Fold i tests on part
i and validates on part i+1 (mod K), trains on the rest; with K = 2 there is no validation part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from care_scale.evaluation.labels import Samples, read_csv_rows
from care_scale.exceptions import LabelsError
from care_scale.storage import join, redact, url_to_fs

_SPLIT_FILE = re.compile(r"^splits_(\d+)\.csv$")


@dataclass(frozen=True)
class Fold:
    name: str
    train: np.ndarray  # indices into the samples
    val: np.ndarray
    test: np.ndarray


def stratified_folds(samples: Samples, *, k: int, seed: int, source: str) -> list[Fold]:
    """K stratified (and, with case ids, grouped) folds; errors name ``source`` (the labels
    file) when a class has fewer samples than folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if k < 2:
        raise LabelsError(source, f"--folds must be at least 2, got {k}")
    counts = samples.class_counts()
    small = {c: n for c, n in counts.items() if 0 < n < k}  # survival: may lack censoring
    if small:
        raise LabelsError(source, "too few samples for " + f"{k} folds: " + ", ".join(
            f"class {c!r} has {n}" for c, n in small.items())
            + " (lower --folds or add samples)")
    y = samples.y
    if samples.groups is not None and len(set(samples.groups)) < len(samples.groups):
        if len(set(samples.groups)) < k:
            raise LabelsError(source, f"{len(set(samples.groups))} cases, fewer than {k} folds")
        parts = [test for _, test in StratifiedGroupKFold(
            n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y,
                                                               samples.groups)]
    else:
        parts = [test for _, test in StratifiedKFold(
            n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)]
    folds = []
    for i in range(k):
        val = parts[(i + 1) % k] if k > 2 else np.zeros(0, np.int64)
        used = np.concatenate([parts[i], val])
        train = np.setdiff1d(np.arange(len(y)), used)
        folds.append(Fold(f"fold_{i}", train, np.sort(val), np.sort(parts[i])))
    return folds


def read_split_files(directory: str, samples: Samples, *,
                     storage_options: dict | None = None) -> tuple[list[Fold], list[str]]:
    """The folds of ``directory``'s ``splits_K.csv`` files and counted warnings (ids that are
    not among the samples: unlabelled, dropped, or not in the warehouse)."""
    fs, root = url_to_fs(directory, storage_options)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError as exc:
        raise LabelsError(redact(directory), "no such folder") from exc
    numbered = sorted((int(m.group(1)), n) for n in names if (m := _SPLIT_FILE.match(n)))
    if not numbered:
        raise LabelsError(redact(directory), "no splits_K.csv files (CARE/CLAM split files)")
    index = {sid: i for i, sid in enumerate(samples.ids)}
    for sample, slides in samples.slides.items():
        for s in slides:  # per case: a slide id stands for its case
            index.setdefault(s, index[sample])
    folds, warnings = [], []
    for _, name in numbered:
        path = join(directory, name)
        header, rows = read_csv_rows(path, storage_options=storage_options)
        if not {"train", "test"} <= set(header):
            raise LabelsError(redact(path), f"needs train and test columns (val optional); "
                                            f"has {', '.join(h or '<index>' for h in header)}")
        parts: dict[str, list[int]] = {}
        seen: dict[int, str] = {}
        unknown = 0
        for col in ("train", "val", "test"):
            idx: list[int] = []
            for r in rows:
                sid = r.get(col, "")
                if not sid:
                    continue
                if sid not in index:
                    unknown += 1
                    continue
                i = index[sid]
                if seen.get(i, col) != col:
                    raise LabelsError(redact(path), f"{sid!r} is in both {seen[i]} and {col}")
                seen[i] = col
                idx.append(i)
            parts[col] = sorted(set(idx))
        if not parts["train"] or not parts["test"]:
            raise LabelsError(redact(path), "train or test holds none of the labelled samples")
        if unknown:
            warnings.append(f"{name}: {unknown} ids not among the labelled samples, left out")
        folds.append(Fold(name.removesuffix(".csv"), *(np.array(parts[c], np.int64)
                                                       for c in ("train", "val", "test"))))
    return folds, warnings
