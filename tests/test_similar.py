"""``care-scale similar`` / ``care_scale.query.similar``: nearest slides, ROIs and regions by
cosine similarity in DuckDB over real Delta tables, checked against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import DIM, write_cohort

from care_scale.cli import main
from care_scale.exceptions import TableError
from care_scale.query import similar, sql
from care_scale.warehouse import Warehouse


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, DIM))
    emb[7] = emb[0] + 0.01 * rng.normal(size=DIM)  # slide_0007 is nearly slide_0000
    wh = Warehouse(str(tmp_path / "wh"))
    ids = write_cohort(wh, emb)
    return wh, ids, emb


def test_nearest_slides_match_numpy(cohort):
    wh, ids, emb = cohort
    got = similar(wh.uri, "slide_0000", k=5).to_pylist()
    want = sorted(((_cos(emb[0], emb[i]), ids[i]) for i in range(1, 30)), reverse=True)[:5]
    assert [r["slide_id"] for r in got] == [s for _, s in want]
    assert got[0]["slide_id"] == "slide_0007" and got[0]["similarity"] > 0.99
    for r, (c, _) in zip(got, want):
        assert r["similarity"] == pytest.approx(c, abs=1e-5)
        assert r["distance"] == pytest.approx(1 - c, abs=1e-5)
    assert {"cohort", "num_patches", "source_uri"} <= set(got[0])
    assert len(similar(wh.uri, "slide_0000", k=100)) == 29  # every other slide, not itself


def test_roi_and_region_levels(cohort):
    wh = cohort[0]
    slides = {r["slide_id"]: r for r in wh.read("slides").to_pylist()}
    regions = wh.read("regions").to_pylist()
    roi = similar(wh.uri, "slide_0003", k=3, level="roi").to_pylist()
    q = slides["slide_0003"]["roi_embedding"]
    best = max((s for s in slides if s != "slide_0003"),
               key=lambda s: _cos(q, slides[s]["roi_embedding"]))
    assert roi[0]["slide_id"] == best

    got = similar(wh.uri, "slide_0003", k=4, level="region").to_pylist()
    query = next(r for r in regions if r["slide_id"] == "slide_0003" and r["is_roi"])
    want = sorted(((_cos(query["embedding"], r["embedding"]), r["slide_id"], r["region_id"])
                   for r in regions if r["slide_id"] != "slide_0003"), reverse=True)[:4]
    assert [(r["slide_id"], r["region_id"]) for r in got] == [(s, i) for _, s, i in want]
    assert {"bbox_x0", "is_roi", "coverage", "num_patches"} <= set(got[0])
    # The README's SQL gives the helper's answer.
    readme = sql(wh.uri, """
        WITH q AS (SELECT embedding AS e FROM regions WHERE slide_id = 'slide_0003' AND is_roi)
        SELECT r.slide_id, r.region_id, list_cosine_similarity(r.embedding, q.e) AS similarity
        FROM regions r, q WHERE r.slide_id <> 'slide_0003' ORDER BY similarity DESC LIMIT 4
    """).to_pylist()
    assert [(r["slide_id"], r["region_id"]) for r in readme] == [
        (r["slide_id"], r["region_id"]) for r in got]
    other = similar(wh.uri, "slide_0003", k=1, level="region", region_id=0).to_pylist()
    assert other[0]["slide_id"] != "slide_0003"


def test_cli_and_errors(cohort, capsys):
    wh = cohort[0]
    assert main(["similar", "--warehouse", wh.uri, "slide_0000", "--k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["slide_id", "similarity", "distance"]
    assert out[2].startswith("slide_0007") and out[-1] == "(2 rows)"
    assert main(["similar", "--warehouse", wh.uri, "slide_0000", "--level", "region",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 10
    assert main(["similar", "--warehouse", wh.uri, "nope"]) == 2
    assert "TableError: slides: no slide 'nope'" in capsys.readouterr().err
    with pytest.raises(TableError, match="no region 99"):
        similar(wh.uri, "slide_0000", level="region", region_id=99)
    write_cohort(wh, np.ones((1, DIM)), ids=["slide_0000"], mv="care-v2")
    with pytest.raises(TableError, match="care-v2, care_tiny-abc.*--model-version"):
        similar(wh.uri, "slide_0000")
    # Another version's rows are never candidates.
    got = similar(wh.uri, "slide_0000", model_version="care-v2").to_pylist()
    assert got == []
