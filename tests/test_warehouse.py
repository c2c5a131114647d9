"""Warehouse on real Delta tables, locally and on the moto S3 server."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest
from factories import DIM, FDIM, fake_result

from care_scale.exceptions import SchemaVersionError
from care_scale.warehouse import FailureRow, Warehouse


def _sorted(wh: Warehouse, name: str, drop=()) -> list[dict]:
    t = wh.read(name)
    rows = t.select([c for c in t.column_names if c not in drop]).to_pylist()
    return sorted(rows, key=lambda r: repr(sorted(r.items())))


def test_write_idempotent_and_crash_resume(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    wh.ensure_tables()
    assert wh.completed_slide_ids("care_tiny-abc") == set()
    results = [fake_result(f"s{i}", seed=i) for i in range(3)]
    wh.write_results(results)
    assert wh.completed_slide_ids("care_tiny-abc") == {"s0", "s1", "s2"}
    assert wh.completed_slide_ids("other") == set()
    clean = {n: _sorted(wh, n) for n in ("slides", "regions", "patches")}
    assert len(clean["slides"]) == 3 and len(clean["regions"]) == 9
    assert len(clean["patches"]) == 90
    assert dict(clean["slides"][0]["metadata"])["site"] == "oslo"

    wh.write_results(results)  # idempotent
    assert {n: _sorted(wh, n) for n in clean} == clean

    # Crash between regions and slides, with a different (stale) attempt first.
    wh2 = Warehouse(str(tmp_path / "wh2"))
    stale = [fake_result(f"s{i}", seed=100 + i) for i in range(3)]
    stale[0].regions.append({**stale[0].regions[0], "region_id": 7})
    wh2.write_results(results[:1])
    wh2.ensure_embedding_tables(DIM, FDIM)
    wh2.write_patches(stale[1:], FDIM)
    wh2.write_regions(stale[1:], DIM)
    assert wh2.completed_slide_ids("care_tiny-abc") == {"s0"}
    wh2.write_results(results[1:])
    assert {n: _sorted(wh2, n) for n in clean} == clean


def test_failures_runs_maintenance_and_version(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    wh.start_run("run1", {"a": 1})
    wh.record_failures([FailureRow("bad", "/x/bad.svs", "run1", "open", "CorruptSlideError",
                                   "cannot decode")])
    wh.record_failures([FailureRow("bad", "/x/bad.svs", "run1", "open", "CorruptSlideError",
                                   "cannot decode")])
    wh.finish_run("run1", {"done": 0, "failed": 1})
    runs = wh.read("runs").to_pylist()
    assert len(runs) == 1 and runs[0]["finished_at"] is not None
    assert '"failed": 1' in runs[0]["counts_json"]
    assert wh.read("failures").num_rows == 1
    for i in range(3):
        wh.write_results([fake_result(f"s{i}", seed=i)])
    before = _sorted(wh, "regions")
    assert wh.optimize("regions")["regions"]["numFilesRemoved"] > 1
    assert _sorted(wh, "regions") == before
    assert wh.vacuum("regions", retention_hours=0)["regions"]
    assert _sorted(wh, "regions") == before
    ops = [h["operation"] for h in wh.history("regions")["regions"]]
    assert "OPTIMIZE" in ops and "WRITE" in ops  # data files committed by the driver

    from deltalake import DeltaTable
    dt = DeltaTable(wh.table_uri("slides"))
    dt.alter.set_table_properties({"care_scale.schema_version": "999"}, raise_if_not_exists=False)
    with pytest.raises(SchemaVersionError, match="slides"):
        wh.completed_slide_ids("care_tiny-abc")


def _writer(uri, options, ids):
    wh = Warehouse(uri, storage_options=options)
    for sid in ids:
        wh.write_results([fake_result(sid, seed=hash(sid) % 1000, patches=False)])


def test_s3_roundtrip_and_concurrent_writers(s3_options, s3_bucket):
    uri = f"s3://{s3_bucket}/wh"
    wh = Warehouse(uri, storage_options=s3_options)
    wh.ensure_tables()
    wh.write_results([fake_result("first")])
    wh.write_results([fake_result("first")])
    assert wh.read("slides").num_rows == 1 and wh.read("patches").num_rows == 30

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(uri, s3_options, [f"w{p}_{i}" for i in range(2)]))
             for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 4
    ids = wh.completed_slide_ids("care_tiny-abc")
    assert ids == {"first"} | {f"w{p}_{i}" for p in range(4) for i in range(2)}
    assert wh.read("regions").num_rows == 3 * 9


def test_uncommitted_files_invisible_and_vacuumed(tmp_path):
    """Data files a killed run wrote but never committed are in no table version: readers
    never see them, a re-run replaces nothing of them, and vacuum (full listing) deletes them,
    as it deletes the run's leftover staging shards."""
    import os

    wh = Warehouse(str(tmp_path / "wh"))
    wh.write_results([fake_result("s0", seed=0)])
    before = {n: _sorted(wh, n) for n in ("slides", "regions", "patches")}
    orphans = wh.write_files([fake_result("s1", seed=1)])  # the driver died before commit
    assert all(os.path.exists(tmp_path / "wh" / f.table / f.path) for f in orphans)
    assert {n: _sorted(wh, n) for n in before} == before
    assert wh.completed_slide_ids("care_tiny-abc") == {"s0"}
    staging = tmp_path / "wh" / "_staging" / "run-killed" / "abc"
    staging.mkdir(parents=True)
    (staging / "000000000-0000.arrow").write_bytes(b"shard")

    kept = wh.vacuum(retention_hours=168)  # young files are kept
    assert set(kept) == {*before, "_staging"} and not any(kept.values())
    removed = wh.vacuum(retention_hours=0)
    assert sorted(removed["patches"] + removed["regions"] + removed["slides"]) == sorted(
        f.path for f in orphans)
    assert len(removed["_staging"]) == 1 and not any(staging.iterdir())
    assert not any(os.path.exists(tmp_path / "wh" / f.table / f.path) for f in orphans)
    assert {n: _sorted(wh, n) for n in before} == before


_CREATE = r"""
import json, sys, time
from care_scale.warehouse import Warehouse
uri, opts, start = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
wh = Warehouse(uri, storage_options=opts)
while time.time() < start:  # all four start together
    time.sleep(0.001)
wh.ensure_tables()
wh.ensure_embedding_tables(8, 8)
print("ok")
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_four_processes_create_one_fresh_warehouse(where, tmp_path, request):
    """Creation is create-if-absent, then re-read: writers racing on a fresh warehouse all
    succeed (before: 'CommitFailedError: Protocol changed' in about half the S3 calls)."""
    import json
    import subprocess
    import sys
    import time

    from deltalake import DeltaTable

    from care_scale.storage import join, to_delta
    from care_scale.warehouse import schemas

    if where == "s3":
        opts = request.getfixturevalue("s3_options")
        base = f"s3://{request.getfixturevalue('s3_bucket')}"
    else:
        opts, base = {}, str(tmp_path)
    for rnd in range(3):
        uri = f"{base}/wh{rnd}"
        start = time.time() + 4  # after every interpreter has imported care-scale
        procs = [subprocess.Popen([sys.executable, "-c", _CREATE, uri, json.dumps(opts),
                                   str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [e[-800:] for _, e in outs]
        assert [o.strip() for o, _ in outs] == ["ok"] * 4
        for name in ("failures", "runs", "slides", "regions", "patches"):
            t = join(uri, name)
            dt = DeltaTable(t, storage_options=to_delta(opts, t))
            # A loser whose create conflicted may land a second metadata commit on top
            # (delta-rs resolves it); never more than one per writer, and no rows.
            assert dt.version() <= 3 and dt.to_pyarrow_table().num_rows == 0
            assert dt.metadata().configuration[schemas.VERSION_KEY] == str(
                schemas.SCHEMA_VERSION)


# The truncated-body and stall cases take 12-19 s each (the clients' own back-off): slow.
@pytest.mark.parametrize("fault", ["reset_before_log_get", "reset_after_commit_put",
                                   "503_on_data_put",
                                   pytest.param("truncated_log_get", marks=pytest.mark.slow),
                                   pytest.param("stall_on_commit_put", marks=pytest.mark.slow)])
def test_store_faults_are_ridden_through(fault, s3_server, s3_options, s3_bucket, tmp_path):
    """A reset on a Delta-log read, a reset after a commit file's PUT (applied upstream, the
    answer lost: an ambiguous commit), a 503 on a data file, a truncated Delta-log body and a
    stalled commit: the writes end with tables equal to a clean run, no row lost or
    duplicated."""
    from faultproxy import Fault, FaultProxy

    rules = {
        "reset_before_log_get": Fault("GET", r"_delta_log", "reset_before", times=2),
        "reset_after_commit_put": Fault("PUT", r"slides/_delta_log/0+1\.json", "reset_after"),
        "503_on_data_put": Fault("PUT", r"regions/.*\.parquet", "503", times=2),
        # Headers with the full Content-Length, half the body, then the connection closes.
        "truncated_log_get": Fault("GET", r"slides/_delta_log/0+1\.json", "truncated"),
        # The answer held for 3 s (a slow store, not a dead one): waited for, not repeated.
        "stall_on_commit_put": Fault("PUT", r"regions/_delta_log/0+2\.json", "stall",
                                     seconds=3),
    }
    clean = Warehouse(f"s3://{s3_bucket}/clean", storage_options=s3_options)
    clean.ensure_tables()
    with FaultProxy(s3_server, [rules[fault]], log_file=tmp_path / "faults.jsonl") as proxy:
        opts = {**s3_options, "aws_endpoint_url": proxy.url}
        wh = Warehouse(f"s3://{s3_bucket}/faulty", storage_options=opts)
        wh.ensure_tables()
        for batch in (["a", "b"], ["c"]):
            wh.write_results([fake_result(s, seed=i) for i, s in enumerate(batch)])
            clean.write_results([fake_result(s, seed=i) for i, s in enumerate(batch)])
        assert len(proxy.fired()) == rules[fault].times  # the faults did happen
    for name, key in (("slides", "slide_id"), ("regions", "region_id"), ("patches", "x")):
        a, b = (w.read(name).sort_by([("slide_id", "ascending"), (key, "ascending")])
                for w in (Warehouse(f"s3://{s3_bucket}/faulty", storage_options=s3_options),
                          clean))
        drop = [c for c in a.column_names if "time" in c or c.endswith("_at")]
        assert a.drop_columns(drop).equals(b.drop_columns(drop)), name


def test_credentials_only_in_the_aws_shared_file_reach_the_warehouse(
        s3_options, s3_bucket, tmp_path, monkeypatch):
    """The AWS credentials file (a named profile) is all there is: deltalake gets the keys
    botocore reads there, as s3fs does, instead of asking the instance metadata service."""
    import fsspec

    from care_scale.storage import _file_credentials, to_delta

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(f"[lab]\naws_access_key_id = {s3_options['aws_access_key_id']}\n"
                     f"aws_secret_access_key = {s3_options['aws_secret_access_key']}\n")
    config = tmp_path / "config"
    config.write_text("[profile lab]\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to fall on
    _file_credentials.cache_clear()
    endpoint_only = {"aws_endpoint_url": s3_options["aws_endpoint_url"]}
    uri = f"s3://{s3_bucket}/wh"
    opts = to_delta(endpoint_only, uri + "/slides")
    assert opts["aws_access_key_id"] == s3_options["aws_access_key_id"]
    assert opts["aws_region"] == "us-east-1"
    wh = Warehouse(uri, storage_options=endpoint_only)
    wh.write_results([fake_result(f"s{i}", seed=i) for i in range(2)])
    assert wh.completed_slide_ids(fake_result("s0").slide["model_version"]) == {"s0", "s1"}
    # s3fs (slides, staging) reads the same file without help.
    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(endpoint_only))
    assert fs.ls(f"{s3_bucket}/wh")
    # Explicit keys win over the file; nothing is added to them.
    explicit = to_delta({**endpoint_only, "aws_access_key_id": "other"}, uri)
    assert explicit["aws_access_key_id"] == "other" and "aws_secret_access_key" not in explicit
    _file_credentials.cache_clear()
    # A rewritten file (a refresher, `aws sso login`) is read again at the next table open.
    creds.write_text(creds.read_text().replace(s3_options["aws_access_key_id"], "rotated"))
    os.utime(creds, (time.time() + 5, time.time() + 5))
    assert to_delta(endpoint_only, uri)["aws_access_key_id"] == "rotated"
    _file_credentials.cache_clear()


def test_temporary_credentials_from_credential_process_are_refreshed(
        s3_options, s3_bucket, tmp_path, monkeypatch):
    """A profile with ``credential_process`` handing out keys that expire in 5 minutes:
    botocore renews them inside its refresh window, and every table open takes the renewed
    ones, so a job of hours outlives its first keys."""
    from care_scale.storage import _file_credentials, to_delta

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    calls = tmp_path / "calls"
    proc = tmp_path / "creds.py"
    proc.write_text(
        "import datetime, json, pathlib\n"
        f"p = pathlib.Path({str(calls)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)\n"
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {s3_options['aws_access_key_id']!r}, "
        f"'SecretAccessKey': {s3_options['aws_secret_access_key']!r}, "
        "'SessionToken': f'token-{n}', 'Expiration': exp.isoformat()}))\n")
    config = tmp_path / "config"
    config.write_text(f"[profile lab]\ncredential_process = {sys.executable} {proc}\n"
                      "region = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _file_credentials.cache_clear()
    endpoint_only = {"aws_endpoint_url": s3_options["aws_endpoint_url"]}
    uri = f"s3://{s3_bucket}/temporary"
    first = to_delta(endpoint_only, uri)["aws_session_token"]
    second = to_delta(endpoint_only, uri)["aws_session_token"]
    # Renewed at each open (they are inside botocore's refresh window), not frozen once.
    assert first.startswith("token-") and second.startswith("token-") and first != second
    wh = Warehouse(uri, storage_options=endpoint_only)
    wh.write_results([fake_result("t0")])
    assert wh.completed_slide_ids(fake_result("t0").slide["model_version"]) == {"t0"}
    assert int(calls.read_text()) > 2
    _file_credentials.cache_clear()
