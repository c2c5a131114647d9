"""DuckDB over the warehouse (local and S3) and the ``care-scale sql`` / ``tables`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import fake_result

from care_scale.query import connect_duckdb, sql
from care_scale.warehouse import Warehouse

NEAREST = """
SELECT b.slide_id,
       list_cosine_similarity(a.slide_embedding, b.slide_embedding) AS similarity
FROM slides a JOIN slides b ON a.slide_id <> b.slide_id AND a.model_version = b.model_version
WHERE a.slide_id = 's0'
ORDER BY similarity DESC
"""


@pytest.fixture
def warehouse(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    results = [fake_result(f"s{i}", seed=i) for i in range(4)]
    # s3 is nearly s0: the nearest neighbour must be it.
    results[3].slide["slide_embedding"] = results[0].slide["slide_embedding"] + 0.01
    wh.write_results(results)
    return wh, results


def _cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_duckdb_local_readme_queries(warehouse, tmp_path):
    wh, results = warehouse
    got = sql(wh.uri, NEAREST).to_pylist()
    assert got[0]["slide_id"] == "s3"
    emb = {r.slide_id: r.slide["slide_embedding"] for r in results}
    for r in got:
        assert r["similarity"] == pytest.approx(_cos(emb["s0"], emb[r["slide_id"]]), abs=1e-5)

    regions = sql(wh.uri, "SELECT region_id, fused_weight, is_roi FROM regions "
                          "WHERE slide_id = 's1' ORDER BY fused_weight DESC").to_pylist()
    assert [r["region_id"] for r in regions] == [2, 1, 0] and regions[0]["is_roi"]

    csv = tmp_path / "clinical.csv"
    csv.write_text("slide_id,stage,survival_months\ns0,II,40\ns1,III,12\ns2,I,90\n")
    con = connect_duckdb(wh.uri)
    joined = con.sql(f"""
        SELECT s.slide_id, c.stage, s.num_regions, s.metadata['site'] AS site
        FROM slides s JOIN read_csv_auto('{csv}') c USING (slide_id) ORDER BY s.slide_id
    """).fetchall()
    assert joined == [("s0", "II", 3, "oslo"), ("s1", "III", 3, "oslo"), ("s2", "I", 3, "oslo")]
    views = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views() "
                                   "WHERE NOT internal").fetchall()}
    assert views == {"slides", "regions", "patches"}  # only tables that exist


def test_cli_sql_json_and_tables(warehouse, capsys):
    from care_scale.cli import main

    wh, _ = warehouse
    assert main(["sql", "--warehouse", wh.uri, "--json",
                 "SELECT slide_id, num_patches FROM slides ORDER BY slide_id"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"slide_id": f"s{i}", "num_patches": 30} for i in range(4)]
    assert main(["sql", "--warehouse", wh.uri, "SELECT slide_id FROM slides ORDER BY 1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "slide_id" and "(4 rows)" in out
    assert main(["sql", "--warehouse", wh.uri, "SELECT nope FROM slides"]) == 2
    assert "TableError" in capsys.readouterr().err
    assert main(["tables", "history", "--warehouse", wh.uri, "--table", "slides"]) == 0
    assert "WRITE" in capsys.readouterr().out  # data files committed by the driver
    assert main(["tables", "optimize", "--warehouse", wh.uri]) == 0
    assert "slides:" in capsys.readouterr().out
    assert main(["tables", "vacuum", "--warehouse", wh.uri, "--dry-run"]) == 0


def test_duckdb_over_s3_with_secret(s3_options, s3_bucket):
    uri = f"s3://{s3_bucket}/wh"
    wh = Warehouse(uri, storage_options=s3_options)
    wh.write_results([fake_result(f"s{i}", seed=i) for i in range(2)])
    con = connect_duckdb(uri, storage_options=s3_options)
    assert con.sql("SELECT slide_id FROM slides ORDER BY 1").fetchall() == [("s0",), ("s1",)]
    assert con.sql("SELECT count(*) FROM patches").fetchone()[0] == 60
    secret = con.sql("SELECT secret_string FROM duckdb_secrets()").fetchone()[0]
    assert "testing-secret" not in secret  # DuckDB redacts it


def test_cli_sql_on_s3_reads_credentials_from_the_aws_environment(s3_options, s3_bucket,
                                                                  monkeypatch, capsys):
    """As a user with AWS_* exported (no --storage-option): the query sees the tables."""
    from care_scale.cli import main

    uri = f"s3://{s3_bucket}/wh"
    Warehouse(uri, storage_options=s3_options).write_results(
        [fake_result(f"s{i}", seed=i) for i in range(2)])
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["aws_secret_access_key"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_options["aws_endpoint_url"])
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    rc = main(["sql", "SELECT slide_id FROM slides ORDER BY 1", "--warehouse", uri, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert [r["slide_id"] for r in json.loads(out.out)] == ["s0", "s1"]
