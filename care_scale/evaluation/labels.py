"""A labels CSV joined with the slide vectors: the samples a probe fits and scores.

The CSV has a ``slide_id`` column, or a ``case_id`` column, or both, and the target column
(a class label), or, for survival, a time column (> 0) and an event column (1/0, true/false:
1 = the event was observed, 0 = censored).

- ``unit="slide"`` (the default when there is a ``slide_id`` column): one sample per slide.
  A ``case_id`` column, when present, keeps each case's slides on one side of every split
  (generated folds are grouped by case).
- ``unit="case"`` (the default without ``slide_id``): one sample per case, its slides' vectors
  averaged, as the paper's patient-level tasks do. Slides map to cases through the CSV's
  ``slide_id`` -> ``case_id`` pairs, or else through the ``case_id`` manifest column that
  ``care-scale embed`` keeps in ``slides.metadata``.

Nothing is dropped silently. Rows without a target value, ids that match no complete slide
of the model version, and exact duplicate rows are left out with a counted warning (also in
the result and the ``probes`` row); conflicting duplicates, a missing column, no usable row
and a single class are errors naming the file.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from care_scale.choices import Unit
from care_scale.evaluation.embeddings import SlideVectors
from care_scale.exceptions import LabelsError
from care_scale.storage import redact, strip_file_scheme, to_fsspec

log = logging.getLogger(__name__)

MISSING = frozenset({"", "na", "nan", "none", "null", "n/a"})


@dataclass
class Samples:
    unit: Literal["slide", "case"]
    ids: list[str]
    x: np.ndarray  # (n, D) float32
    y: np.ndarray  # (n,) int64 class index
    classes: list[str]  # class index -> label value as written in the CSV
    # (survival: y is the event indicator, classes ["censored", "event"])
    groups: list[str] | None  # case of each sample (slide unit with case ids), else None
    slides: dict[str, list[str]]  # sample id -> its slides
    warnings: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    time: np.ndarray | None = None  # survival: (n,) float64 follow-up time

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


def read_csv_rows(path: str, *, storage_options: dict | None = None
                  ) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (all values as stripped strings) of a local or fsspec CSV."""
    import fsspec

    p = strip_file_scheme(str(path))
    try:
        with fsspec.open(p, "rb", **to_fsspec(storage_options, p)) as f:
            text = f.read().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelsError(redact(path), "no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(redact(path), f"cannot read: {redact(exc)}") from exc
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None}
            for r in reader]
    return header, rows


def _sort_classes(values: set[str]) -> list[str]:
    """Numeric labels in numeric order (0, 1, 2, 10), others alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _warn(samples_warnings: list[str], dropped: dict[str, int], key: str, ids: list[str],
          what: str) -> None:
    if not ids:
        return
    dropped[key] = len(ids)
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    msg = f"{len(ids)} {what}, left out: {shown}"
    samples_warnings.append(msg)
    log.warning(msg)


_EVENT = {"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}


def join_labels(path: str, vectors: SlideVectors, *, target: str | None = None,
                survival: tuple[str, str] | None = None, unit: Unit = "auto",
                storage_options: dict | None = None) -> Samples:
    """The labelled samples of ``path`` (see the module docstring for the rules): classes of
    ``target``, or ``survival=(time_column, event_column)``."""
    shown = redact(path)
    header, rows = read_csv_rows(path, storage_options=storage_options)
    has_slide, has_case = "slide_id" in header, "case_id" in header
    if not (has_slide or has_case):
        raise LabelsError(shown, f"needs a slide_id or case_id column; has {', '.join(header)}")
    wanted = (list(survival) if survival else [target])
    for col, flag in zip(wanted, ("--time", "--event") if survival else ("--target",)):
        if col not in header:
            raise LabelsError(shown, f"no column {col!r} ({flag}); has {', '.join(header)}")
    target = "/".join(wanted)  # how messages name the value
    if unit == "auto":
        unit = "slide" if has_slide else "case"
    if unit == "slide" and not has_slide:
        raise LabelsError(shown, "unit slide needs a slide_id column")
    key = "slide_id" if unit == "slide" else "case_id"
    warnings: list[str] = []
    dropped: dict[str, int] = {}

    missing_ids = [str(i + 2) for i, r in enumerate(rows) if not r.get(key)]
    _warn(warnings, dropped, "no_id", missing_ids, f"rows without a {key} (CSV line numbers)")
    rows = [r for r in rows if r.get(key)]

    def value(r: dict[str, str]) -> tuple[str, ...]:
        return tuple(r[c] for c in wanted)

    def missing(r: dict[str, str]) -> bool:
        return any(r[c].lower() in MISSING for c in wanted)

    no_value = [r[key] for r in rows if missing(r)]
    _warn(warnings, dropped, "missing_value", no_value, f"rows without a value of {target!r}")
    rows = [r for r in rows if not missing(r)]

    label: dict[str, tuple[str, ...]] = {}
    dupes: list[str] = []
    for r in rows:
        sid, v = r[key], value(r)
        if sid in label:
            if label[sid] != v:
                raise LabelsError(shown, f"{key} {sid!r} has two values of {target!r}: "
                                         f"{','.join(label[sid])!r} and {','.join(v)!r}")
            if not (unit == "case" and has_slide):  # one row per slide of a case: normal
                dupes.append(sid)
        label[sid] = v
    _warn(warnings, dropped, "duplicate", dupes, "duplicate rows (same id and value)")

    pos = {sid: i for i, sid in enumerate(vectors.slide_ids)}
    csv_case = {r["slide_id"]: r["case_id"] for r in rows
                if has_slide and has_case and r.get("slide_id") and r.get("case_id")}
    if unit == "slide":
        unknown = [s for s in label if s not in pos]
        ids = [s for s in label if s in pos]
        members = {s: [s] for s in ids}
        groups = [csv_case.get(s, s) for s in ids] if has_case else None
    else:
        # Slides of each case: the CSV's pairs, else the manifest's case_id in slides.metadata.
        members = {}
        for sid, i in pos.items():
            case = csv_case.get(sid) if csv_case else vectors.metadata[i].get("case_id")
            if case is not None:
                members.setdefault(case, []).append(sid)
        if not members:
            raise LabelsError(shown, "no slide maps to a case: give slide_id,case_id pairs in "
                                     "the CSV or embed with a case_id manifest column")
        if csv_case:
            _warn(warnings, dropped, "unknown_slide", [s for s in csv_case if s not in pos],
                  f"slide_ids with no complete slide of model version {vectors.model_version}")
        unknown = [c for c in label if c not in members]
        ids = [c for c in label if c in members]
        groups = None
    _warn(warnings, dropped, "unknown_id", unknown,
          f"{key}s with no complete slide of model version {vectors.model_version}")
    if not ids:
        raise LabelsError(shown, f"no {key} matches a slide of model version "
                                 f"{vectors.model_version} in the warehouse")
    x = np.stack([vectors.vectors[[pos[s] for s in members[i]]].mean(axis=0) for i in ids])
    base = Samples(unit, ids, x.astype(np.float32), np.zeros(len(ids), np.int64), [], groups,
                   {i: members[i] for i in ids}, warnings, dropped)
    if survival:
        return _survival(base, [label[s] for s in ids], shown, survival)
    classes = _sort_classes({label[s][0] for s in ids})
    if len(classes) < 2:
        raise LabelsError(shown, f"{target!r} has one class only ({classes[0]!r}) among the "
                                 f"{len(ids)} usable rows")
    index = {c: i for i, c in enumerate(classes)}
    base.y = np.array([index[label[s][0]] for s in ids], np.int64)
    base.classes = classes
    return base


def _survival(samples: Samples, values: list[tuple[str, ...]], shown: str,
              columns: tuple[str, str]) -> Samples:
    times, events = [], []
    for sid, (t, e) in zip(samples.ids, values):
        try:
            time = float(t)
        except ValueError:
            time = float("nan")
        if not np.isfinite(time) or time <= 0:
            raise LabelsError(shown, f"{sid!r}: {columns[0]} must be a number > 0, got {t!r}")
        if e.lower() not in _EVENT:
            raise LabelsError(shown, f"{sid!r}: {columns[1]} must be 1/0 or true/false, got "
                                     f"{e!r}")
        times.append(time)
        events.append(_EVENT[e.lower()])
    samples.time = np.array(times, np.float64)
    samples.y = np.array(events, np.int64)
    samples.classes = ["censored", "event"]
    if samples.y.sum() == 0:
        raise LabelsError(shown, f"no events ({columns[1]} is 0 for all {len(values)} rows)")
    return samples
