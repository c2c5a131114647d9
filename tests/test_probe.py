"""``care-scale probe`` on synthetic cohorts with a known answer (real Delta tables and DuckDB,
no Ray): a planted signal is found, shuffled labels score chance, CARE's split files are read,
bad label rows are errors or counted warnings, and the results land in the probes table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import DIM, write_cohort

from care_scale.cli import main
from care_scale.evaluation import ProbeConfig, run_probe
from care_scale.evaluation.embeddings import load_slide_vectors
from care_scale.evaluation.labels import join_labels
from care_scale.evaluation.metrics import compute, summarise
from care_scale.evaluation.splits import stratified_folds
from care_scale.exceptions import LabelsError, TableError
from care_scale.query import sql
from care_scale.warehouse import Warehouse


def _cohort(tmp_path, *, n=120, n_classes=2, strength=1.5, seed=0, metadata=None):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    emb = rng.normal(size=(n, DIM))
    emb[np.arange(n), y % DIM] += strength * 2  # class c lifts dimension c
    emb[:, :4] += strength * (y[:, None] - (n_classes - 1) / 2)
    wh = Warehouse(str(tmp_path / "wh"))
    ids = write_cohort(wh, emb, metadata=metadata(n) if metadata else None)
    return wh, ids, y


def _labels(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n"
                                                    for r in rows))
    return str(path)


def _probe(wh, labels, **kw):
    return run_probe(ProbeConfig(warehouse=wh.uri, labels=labels, target="label",
                                 bootstrap=kw.pop("bootstrap", 200), **kw))


def test_planted_signal_found_shuffled_labels_at_chance(tmp_path):
    wh, ids, y = _cohort(tmp_path)
    names = np.array(["normal", "tumour"])[y]
    labels = _labels(tmp_path / "labels.csv", ["slide_id", "label"], zip(ids, names))
    res = _probe(wh, labels)
    m = res.summary
    assert res.num_samples == 120 and res.classes == {"normal": 60, "tumour": 60}
    assert len(res.folds) == 5 and all(f["val"] > 0 for f in res.folds)
    assert m["balanced_accuracy"].mean > 0.85 and m["auroc"].mean > 0.9, res.format()
    for s in m.values():
        assert s.ci_low <= s.mean <= s.ci_high and s.std >= 0
    assert not res.warnings

    shuffled = np.random.default_rng(1).permutation(names)
    labels = _labels(tmp_path / "shuffled.csv", ["slide_id", "label"], zip(ids, shuffled))
    chance = _probe(wh, labels).summary
    assert abs(chance["balanced_accuracy"].mean - 0.5) < 0.12
    assert abs(chance["auroc"].mean - 0.5) < 0.15
    assert chance["balanced_accuracy"].ci_low < 0.5 + 0.05  # the interval reaches chance

    # Both results are rows of the probes table, queried like the embeddings.
    rows = sql(wh.uri, "SELECT target, feature, model, num_samples, balanced_accuracy_mean, "
                       "auroc_ci_low, config_json FROM probes ORDER BY auroc_mean DESC"
               ).to_pylist()
    assert len(rows) == 2 and rows[0]["balanced_accuracy_mean"] > 0.85
    assert rows[0]["feature"] == "slide" and rows[0]["model"] == "logistic"
    assert json.loads(rows[0]["config_json"])["folds"] == 5


def test_knn_roi_and_regions_mean_three_classes(tmp_path):
    wh, ids, y = _cohort(tmp_path, n=90, n_classes=3)
    labels = _labels(tmp_path / "labels.csv", ["slide_id", "label"], zip(ids, y))
    for feature in ("roi", "regions_mean"):
        res = _probe(wh, labels, model="knn", feature=feature, folds=3)
        assert res.classes == {"0": 30, "1": 30, "2": 30}
        assert res.summary["balanced_accuracy"].mean > 0.7, res.format()
        assert all("k" in f["chosen"] for f in res.folds)
    vec = load_slide_vectors(wh, feature="regions_mean")
    slide = load_slide_vectors(wh, feature="slide")
    # Regions are the slide embedding plus noise: their mean is close to it.
    assert np.abs(vec.vectors - slide.vectors).mean() < 0.3


def test_care_split_files_are_read_as_they_are(tmp_path):
    wh, ids, y = _cohort(tmp_path, n=60)
    labels = _labels(tmp_path / "labels.csv", ["slide_id", "label"], zip(ids, y))
    splits = tmp_path / "splits"
    splits.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        perm = [ids[i] for i in rng.permutation(60)]
        train, val, test = perm[:36] + ["not_in_wh"], perm[36:48], perm[48:]
        # CLAM's save_splits layout: an index column, columns padded with empty cells.
        rows = [[i, train[i], val[i] if i < len(val) else "", test[i] if i < len(test) else ""]
                for i in range(len(train))]
        _labels(splits / f"splits_{k}.csv", ["", "train", "val", "test"], rows)
        (splits / f"splits_{k}_bool.csv").write_text(",train,val,test\n")  # ignored
        (splits / f"splits_{k}_descriptor.csv").write_text(",train,val,test\n0,1,1,1\n")
    res = _probe(wh, labels, splits=str(splits))
    assert [f["name"] for f in res.folds] == ["splits_0", "splits_1", "splits_2"]
    assert [(f["train"], f["val"], f["test"]) for f in res.folds] == [(36, 12, 12)] * 3
    assert res.warnings == [f"splits_{k}.csv: 1 ids not among the labelled samples, left out"
                            for k in range(3)]
    assert res.summary["auroc"].mean > 0.9
    (splits / "splits_3.csv").write_text(",train,val,test\n0,slide_0000,,slide_0000\n")
    with pytest.raises(LabelsError, match="splits_3.csv.*both train and test"):
        _probe(wh, labels, splits=str(splits))


def test_cases_average_their_slides_and_folds_keep_cases_together(tmp_path):
    wh, ids, y = _cohort(tmp_path, n=80, metadata=lambda n: [{"case_id": f"p{i // 2}"}
                                                             for i in range(n)])
    # Two slides per case; the label of a case is its first slide's.
    case_rows = [(f"p{i}", y[2 * i]) for i in range(40)]
    labels = _labels(tmp_path / "cases.csv", ["case_id", "label"], case_rows)
    res = _probe(wh, labels, folds=4)
    assert res.unit == "case" and res.num_samples == 40

    both = _labels(tmp_path / "both.csv", ["slide_id", "case_id", "label"],
                   [(s, f"p{i // 2}", y[2 * (i // 2)]) for i, s in enumerate(ids)])
    samples = join_labels(both, load_slide_vectors(wh), target="label")
    assert samples.unit == "slide" and len(samples.ids) == 80
    for fold in stratified_folds(samples, k=4, seed=0, source=both):
        cases = [{samples.groups[i] for i in part} for part in (fold.train, fold.val,
                                                                 fold.test)]
        assert not (cases[0] & cases[2]) and not (cases[1] & cases[2])
    per_case = join_labels(both, load_slide_vectors(wh), target="label", unit="case")
    assert len(per_case.ids) == 40 and per_case.slides["p3"] == [ids[6], ids[7]]


def test_bad_label_rows_are_errors_or_counted_warnings(tmp_path, capsys):
    wh, ids, y = _cohort(tmp_path, n=40)
    rows = [(s, v) for s, v in zip(ids, y)]
    rows += [("ghost_1", 0), ("ghost_2", 1), (ids[0], y[0]), (ids[1], ""), ("", 1)]
    rows = [r for r in rows if r[0] != ids[1]] + [(ids[1], "NA")]
    labels = _labels(tmp_path / "labels.csv", ["slide_id", "label"], rows)
    res = _probe(wh, labels, folds=3)
    assert res.dropped == {"no_id": 1, "missing_value": 1, "duplicate": 1, "unknown_id": 2}
    assert res.num_samples == 39 and len(res.warnings) == 4
    assert any("2 slide_ids with no complete slide" in w and "ghost_1" in w
               for w in res.warnings)

    one = _labels(tmp_path / "one.csv", ["slide_id", "label"], [(s, 1) for s in ids])
    with pytest.raises(LabelsError, match="one class only"):
        _probe(wh, one)
    few = _labels(tmp_path / "few.csv", ["slide_id", "label"],
                  [(s, int(i < 3)) for i, s in enumerate(ids)])
    with pytest.raises(LabelsError, match="few.csv: too few samples for 5 folds: class '1' has 3"):
        _probe(wh, few)
    clash = _labels(tmp_path / "clash.csv", ["slide_id", "label"], rows + [(ids[2], 7)])
    with pytest.raises(LabelsError, match="two values"):
        _probe(wh, clash)
    with pytest.raises(LabelsError, match="no column 'stage'"):
        run_probe(ProbeConfig(warehouse=wh.uri, labels=labels, target="stage"))
    nobody = _labels(tmp_path / "nobody.csv", ["slide_id", "label"], [("x", 0), ("y", 1)])
    with pytest.raises(LabelsError, match="no slide_id matches"):
        _probe(wh, nobody)

    write_cohort(wh, np.ones((2, DIM)), ids=ids[:2], mv="care-v2")
    with pytest.raises(TableError, match=r"2 model versions \(care-v2, care_tiny-abc\).*"
                                         "--model-version"):
        _probe(wh, labels)
    # On the command line: one line, exit 2; with --model-version it runs.
    assert main(["probe", "--warehouse", wh.uri, "--labels", labels, "--target", "label"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("TableError: slides") and "\n" not in err
    assert main(["probe", "--warehouse", wh.uri, "--labels", labels, "--target", "label",
                 "--model-version", "care_tiny-abc", "--folds", "3", "--bootstrap", "50",
                 "--json", "--no-record"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_samples"] == 39 and out["dropped"]["unknown_id"] == 2
    assert set(out["metrics"]) == {"balanced_accuracy", "auroc", "weighted_f1"}
    assert main(["probe", "--warehouse", wh.uri, "--labels", labels, "--target", "label",
                 "--model-version", "care_tiny-abc", "--folds", "3", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "warning: 2 slide_ids" in out
    assert main(["sql", "--warehouse", wh.uri, "SELECT count(*) AS n FROM probes"]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == "2"  # the --no-record run isn't


def test_metrics_equal_scikit_learn_and_bootstrap_is_seeded():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(3)
    for n_classes in (2, 4):
        y = rng.integers(0, n_classes, 200)
        proba = rng.dirichlet(np.ones(n_classes), 200)
        proba[np.arange(200), y] += 0.3 * rng.random(200)
        proba /= proba.sum(1, keepdims=True)
        proba[5:10] = proba[:5]  # ties
        ours = compute(y, proba)
        pred = proba.argmax(1)
        assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert ours["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
        ref = (roc_auc_score(y, proba[:, 1]) if n_classes == 2 else
               roc_auc_score(y, proba, multi_class="ovr", average="macro"))
        assert ours["auroc"] == pytest.approx(ref)
    folds = [(y[:100], proba[:100]), (y[100:], proba[100:])]
    a, b = summarise(folds, n_resamples=100, seed=0), summarise(folds, n_resamples=100, seed=0)
    assert a == b and a != summarise(folds, n_resamples=100, seed=1)
    with pytest.raises(ValueError, match="n_resamples"):
        summarise(folds, n_resamples=10**6)


def test_harrell_c_equals_scikit_survival():
    from sksurv.metrics import concordance_index_censored

    from care_scale.evaluation.metrics import harrell_c

    rng = np.random.default_rng(4)
    for _ in range(5):
        n = 150
        time = rng.integers(1, 40, n).astype(float)  # many tied times
        event = rng.random(n) < 0.6
        risk = np.round(rng.normal(size=n) - 0.05 * time, 1)  # tied risks too
        ref = concordance_index_censored(event, time, risk)[0]
        assert harrell_c(time, event, risk) == pytest.approx(ref, abs=1e-12)


def test_cox_probe_finds_survival_signal(tmp_path, capsys):
    rng = np.random.default_rng(5)
    n = 240
    emb = rng.normal(size=(n, DIM))
    risk = emb[:, :3].sum(1)  # the hazard grows with three embedding dimensions
    time = rng.exponential(np.exp(-risk)) * 100 + 0.1
    censor = rng.exponential(150, n)
    event = (time <= censor).astype(int)
    time = np.minimum(time, censor)
    wh = Warehouse(str(tmp_path / "wh"))
    ids = write_cohort(wh, emb)
    labels = _labels(tmp_path / "os.csv", ["slide_id", "os_months", "dead"],
                     zip(ids, np.round(time, 3), event))
    res = run_probe(ProbeConfig(warehouse=wh.uri, labels=labels, time="os_months",
                                event="dead", model="cox", bootstrap=100))
    c = res.summary["c_index"]
    assert set(res.summary) == {"c_index"} and c.mean > 0.7, res.format()
    assert c.ci_low <= c.mean <= c.ci_high and all("alpha" in f["chosen"] for f in res.folds)
    shuffled = _labels(tmp_path / "shuffled.csv", ["slide_id", "os_months", "dead"],
                       zip(ids, *zip(*rng.permutation(np.stack([time, event], 1)))))
    chance = run_probe(ProbeConfig(warehouse=wh.uri, labels=shuffled, time="os_months",
                                   event="dead", model="cox", bootstrap=100))
    assert abs(chance.summary["c_index"].mean - 0.5) < 0.1
    row = sql(wh.uri, "SELECT target, model, c_index_mean, auroc_mean FROM probes "
                      "ORDER BY c_index_mean DESC LIMIT 1").to_pylist()[0]
    assert row["target"] == "survival:os_months,dead" and row["model"] == "cox"
    assert row["c_index_mean"] == pytest.approx(c.mean) and row["auroc_mean"] is None

    assert main(["probe", "--warehouse", wh.uri, "--labels", labels, "--time", "os_months",
                 "--event", "dead", "--bootstrap", "20", "--no-record"]) == 0
    assert "c_index" in capsys.readouterr().out
    assert main(["probe", "--warehouse", wh.uri, "--labels", labels, "--time",
                 "os_months"]) == 2
    assert "--time and --event" in capsys.readouterr().err
    none = _labels(tmp_path / "none.csv", ["slide_id", "t", "e"], [(s, 5, 0) for s in ids])
    with pytest.raises(LabelsError, match="no events"):
        run_probe(ProbeConfig(warehouse=wh.uri, labels=none, time="t", event="e",
                              model="cox"))
    bad = _labels(tmp_path / "bad.csv", ["slide_id", "t", "e"], [(ids[0], -1, 1)])
    with pytest.raises(LabelsError, match="must be a number > 0"):
        run_probe(ProbeConfig(warehouse=wh.uri, labels=bad, time="t", event="e",
                              model="cox"))
