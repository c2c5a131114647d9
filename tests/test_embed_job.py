"""The embedding job end to end: real slides, real Ray, real Delta tables, real S3 server.

Slides are small generated pyramidal TIFFs (1.5k x 1k px at 0.5 um/px -> a few dozen tiles)
and the models are the seeded tiny pair (care_tiny + vit_demo_patch16_112), so each run is a
few seconds once Ray is up.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from care_scale.config import load_config
from care_scale.embed import EmbedConfig, run_embedding

ROOT = Path(__file__).resolve().parents[1]
N_SLIDES = 3


def _config(source, warehouse, **extra) -> EmbedConfig:
    values = {
        "source": str(source),
        "warehouse": str(warehouse),
        "progress": "none",
        "commit_every": 2,
        "decode_batch_size": 16,
        "encode_batch_size": 16,
        "concurrency": {"decode_tasks": 1, "encoder_actors": 1, "torch_threads": 1},
    }
    values.update(extra)
    return load_config(EmbedConfig, None, values)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from care_scale.synthetic import write_synthetic_slide

    d = tmp_path_factory.mktemp("cohort")
    for i in range(N_SLIDES):
        write_synthetic_slide(d / f"slide_{i}.tiff", width=1536, height=1024, mpp=0.5, seed=i)
    return d


def _table(warehouse, name, storage_options=None):
    from deltalake import DeltaTable

    from care_scale.storage import join, to_delta

    uri = join(str(warehouse), name)
    return DeltaTable(uri, storage_options=to_delta(storage_options, uri)).to_pyarrow_table()


def _rows(warehouse, name, keys, drop=("run_id",), storage_options=None):
    """Rows of a table sorted by ``keys``, without run-specific columns."""
    t = _table(warehouse, name, storage_options)
    cols = [c for c in t.column_names if c not in drop and "time" not in c and "_at" not in c]
    rows = t.select(cols).to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in keys))


def _assert_rows_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, list) and va and isinstance(va[0], float):
                np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-5, err_msg=k)
            elif isinstance(va, float):
                assert va == pytest.approx(vb, rel=1e-4, abs=1e-6), k
            else:
                assert va == vb, k


def test_local_folder_to_local_warehouse_and_rerun(ray_local, cohort, tmp_path):
    wh = tmp_path / "wh"
    summary = run_embedding(_config(cohort, wh, keep_patches=True))
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (N_SLIDES, N_SLIDES,
                                                                              0, 0)
    assert summary.tiles > 0 and summary.backend == "onnxruntime"  # "auto" on a CPU
    assert "care_tiny" in summary.untrained and "UNTRAINED weights: care_tiny" in summary.format()

    slides = _table(wh, "slides").to_pylist()
    regions = _table(wh, "regions").to_pylist()
    patches = _table(wh, "patches").to_pylist()
    assert sorted(s["slide_id"] for s in slides) == [f"slide_{i}" for i in range(N_SLIDES)]
    assert sum(s["num_patches"] for s in slides) == len(patches) == summary.tiles
    for s in slides:
        mine = [r for r in regions if r["slide_id"] == s["slide_id"]]
        # A slides row exists only with all its regions; exactly one ROI among them.
        assert len(mine) == s["num_regions"] > 0
        assert sum(r["is_roi"] for r in mine) == 1
        assert [r["region_id"] for r in mine if r["is_roi"]] == [s["roi_region_id"]]
        assert s["model_version"] == summary.model_version
        assert s["mpp"] == pytest.approx(0.5)
        assert len(s["slide_embedding"]) == 64
        assert all(r["geometry"].startswith("MULTIPOLYGON") for r in mine)
    runs = _table(wh, "runs").to_pylist()
    assert [r["run_id"] for r in runs] == [summary.run_id]

    # Re-run: nothing re-processed, no duplicate rows; every slide is known, so Ray is not
    # started ahead of the version check.
    from care_scale.embed.pipeline import _may_have_work
    from care_scale.embed.sources import scan_source

    listed = scan_source(str(cohort)).sources
    assert not _may_have_work(_config(cohort, wh), listed)
    assert _may_have_work(_config(cohort, tmp_path / "new-wh"), listed)
    again = run_embedding(_config(cohort, wh, keep_patches=True))
    assert (again.done, again.skipped, again.tiles) == (0, N_SLIDES, 0)
    assert _table(wh, "slides").num_rows == N_SLIDES
    assert _table(wh, "regions").num_rows == len(regions)
    assert _table(wh, "patches").num_rows == len(patches)


def test_manifest_with_corrupt_and_missing_slides(ray_local, cohort, shared_data, tmp_path):
    from care_scale.cli import main

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "slide_id,uri,mpp,cohort,site\n"
        f"good,{cohort / 'slide_0.tiff'},,A,oslo\n"
        f"corrupt,{shared_data / 'broken.svs'},,A,oslo\n"
        f"missing,{tmp_path / 'nope.svs'},0.25,B,bergen\n"
    )
    wh = tmp_path / "wh"
    code = main(["embed", str(manifest), "--warehouse", str(wh), "--set", "progress=none",
                 "--set", "concurrency.decode_tasks=1", "--set", "encode_batch_size=16"])
    assert code == 3  # finished, some slides failed
    slides = _table(wh, "slides").to_pylist()
    assert [s["slide_id"] for s in slides] == ["good"]
    assert slides[0]["cohort"] == "A"
    failures = {f["slide_id"]: f for f in _table(wh, "failures").to_pylist()}
    assert sorted(failures) == ["corrupt", "missing"]
    assert failures["missing"]["error_type"] == "SlideNotFoundError"
    assert failures["corrupt"]["error_type"] in ("CorruptSlideError", "UnsupportedFormatError")
    assert "broken.svs" in failures["corrupt"]["message"]
    assert all(f["stage"] == "open" for f in failures.values())


def test_precomputed_features(ray_local, tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    src = tmp_path / "feats"
    src.mkdir()
    xs, ys = np.meshgrid(np.arange(6) * 256, np.arange(5) * 256)
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    with h5py.File(src / "a.h5", "w") as f:
        f["features"] = rng.normal(size=(len(coords), 192)).astype(np.float32)
        f["coords"] = coords
        f["coords"].attrs["patch_size_level0"] = 256
    care = {
        "feature": rng.normal(size=(20, 192)).astype(np.float32),
        "index": [f"{x}_{y}_256.png" for x, y in coords[:20]],
        "inst_label": [0] * 20,
    }
    np.save(src / "b.npy", care)  # what the CARE repository writes (a pickled dict)
    wh = tmp_path / "wh"
    summary = run_embedding(_config(src, wh, features=True, keep_patches=True))
    assert (summary.done, summary.failed) == (2, 0), summary.failures
    slides = {s["slide_id"]: s for s in _table(wh, "slides").to_pylist()}
    assert sorted(slides) == ["a", "b"]
    assert slides["a"]["num_patches"] == 30 and slides["b"]["num_patches"] == 20
    assert _table(wh, "patches").num_rows == 50


def test_s3_slides_and_warehouse(ray_local, cohort, s3_options, s3_bucket):
    import fsspec

    from care_scale.query import connect_duckdb
    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(s3_options))
    for p in sorted(cohort.glob("*.tiff"))[:2]:
        fs.put(str(p), f"{s3_bucket}/cohort/{p.name}")
    wh = f"s3://{s3_bucket}/warehouse"
    summary = run_embedding(_config(f"s3://{s3_bucket}/cohort/*.tiff", wh,
                                    storage_options=s3_options))
    assert (summary.done, summary.failed) == (2, 0), summary.failures
    con = connect_duckdb(wh, storage_options=s3_options)
    got = con.sql("SELECT slide_id, num_regions, source_uri FROM slides ORDER BY 1").fetchall()
    assert [g[0] for g in got] == ["slide_0", "slide_1"]
    assert got[0][2] == f"s3://{s3_bucket}/cohort/slide_0.tiff"
    n_regions = con.sql("SELECT count(*) FROM regions").fetchone()[0]
    assert n_regions == sum(g[1] for g in got)


_KILL_SCRIPT = """
import sys
from care_scale.config import load_config
from care_scale.embed import EmbedConfig, run_embedding
cfg = load_config(EmbedConfig, None, {
    "source": sys.argv[1], "warehouse": sys.argv[2], "progress": "none", "commit_every": 1,
    "keep_patches": True, "decode_batch_size": 16, "encode_batch_size": 16, "num_cpus": 2,
    "concurrency": {"decode_tasks": 1, "encoder_actors": 1, "torch_threads": 1}})
run_embedding(cfg)
"""


@pytest.mark.slow
def test_kill_and_resume_equals_clean_run(ray_local, cohort, tmp_path):
    from deltalake import DeltaTable

    src = tmp_path / "src"
    src.mkdir()
    total = 12
    for i in range(total):  # many one-slide commits, so the kill lands mid-run
        shutil.copy(cohort / f"slide_{i % N_SLIDES}.tiff", src / f"s{i}.tiff")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(src), str(killed)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.time() + 240
        n = 0
        while time.time() < deadline and proc.poll() is None:
            try:
                n = len(DeltaTable(str(killed / "slides")).to_pyarrow_table())
            except Exception:  # noqa: BLE001 - the table may not exist yet
                n = 0
            if n >= 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "job finished before it could be killed"
        assert 0 < n < total
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
        proc.wait(timeout=30)
    finally:
        time.sleep(1)
        try:  # then clean up whatever the dead driver left in its session (its own Ray)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    resumed = run_embedding(_config(src, killed, keep_patches=True, commit_every=1))
    assert resumed.skipped >= 1 and resumed.done == total - resumed.skipped
    clean = tmp_path / "clean"
    run_embedding(_config(src, clean, keep_patches=True))
    for name, keys in (("slides", ["slide_id"]), ("regions", ["slide_id", "region_id"]),
                       ("patches", ["slide_id", "x", "y"])):
        _assert_rows_equal(_rows(killed, name, keys), _rows(clean, name, keys))


# `ray job submit` of jobs/embed_cohort.py to a real `ray start --head` on loopback, tables
# after: tests/test_infra.py's local-cluster test (infra/local/cluster.sh starts that head,
# the job reads the slides from and writes the warehouse to the loopback S3 server).


def test_torch_and_onnxruntime_backends_agree(ray_local, cohort, tmp_path):
    by_kind = {}
    for kind in ("torch", "onnxruntime"):
        wh = tmp_path / kind
        summary = run_embedding(_config(cohort / "slide_0.tiff", wh, backend=kind,
                                        keep_patches=True))
        assert summary.backend == kind and summary.done == 1
        by_kind[kind] = _table(wh, "slides").to_pylist()[0]
        assert by_kind[kind]["backend"] == kind
    a, b = by_kind["torch"], by_kind["onnxruntime"]
    assert a["model_version"] == b["model_version"]  # the backend does not change the weights
    np.testing.assert_allclose(a["slide_embedding"], b["slide_embedding"], rtol=1e-3, atol=1e-4)
    assert a["num_regions"] == b["num_regions"]


def test_local_actors_load_the_driver_export_without_torch(cohort, tmp_path, monkeypatch):
    """On a one-node cluster the driver exports once; an encoder actor then starts with
    onnxruntime alone (no torch, no onnx import) and reports the same model version. An actor
    on a node without that directory resolves the backend itself."""
    import pickle

    from care_scale.artifacts import INT8_VERSION_SUFFIX
    from care_scale.embed.pipeline import (
        export_for_local_actors,
        precision_suffix,
        resolve_models,
    )
    from care_scale.inference.precision import int8_weight_bits
    from care_scale.models import create_patch_encoder, model_version

    monkeypatch.setenv("CARE_SCALE_CACHE", str(tmp_path / "cache"))
    cfg = resolve_models(_config(cohort, tmp_path / "wh"))
    local = export_for_local_actors(cfg)
    version = model_version(create_patch_encoder(cfg.patch_encoder.name))
    assert local and Path(local, "manifest.json").exists()
    assert str(tmp_path / "cache") in local
    code = (
        "import pickle, sys\n"
        "from care_scale.embed.patch_stage import PatchEncoder\n"
        "cfg, local = pickle.loads(sys.stdin.buffer.read())\n"
        "enc = PatchEncoder(cfg, local_export=local)\n"
        "print(enc.kind, enc.backend.model_version, 'torch' in sys.modules, "
        "'onnx' in sys.modules)\n"
    )

    def actor(local_export, config=cfg):
        return subprocess.run([sys.executable, "-c", code],
                              input=pickle.dumps((config, local_export)), capture_output=True,
                              check=True, cwd=ROOT).stdout.decode().split()

    assert actor(local) == ["onnxruntime", version, "False", "False"]
    # int8 too: the driver's export is the quantised variant, loaded without torch.
    int8 = dataclasses.replace(cfg, precision="int8")
    local8 = export_for_local_actors(int8)
    bits = int8_weight_bits()  # quantised for this CPU: 8-bit weights where it has VNNI
    assert local8 and local8 != local and local8.endswith("-int8" + ("w8" if bits == 8 else ""))
    assert actor(local8, int8) == ["onnxruntime", version + INT8_VERSION_SUFFIX[bits], "False",
                                   "False"]
    assert precision_suffix(int8) == INT8_VERSION_SUFFIX[bits]  # what the rows carry
    # `precision: auto` measures fp32 and int8 on those same exports, without torch.
    calibrate = (
        "import pickle, sys\n"
        "from care_scale.embed.calibrate import calibration_backend\n"
        "from care_scale.embed.job_models import job_models\n"
        "cfg = pickle.loads(sys.stdin.buffer.read())\n"
        "models = job_models(cfg)\n"
        "print(*(calibration_backend(cfg, p, models).model_version for p in ('fp32', 'int8')),"
        " 'torch' in sys.modules)\n"
    )
    measured = subprocess.run([sys.executable, "-c", calibrate], input=pickle.dumps(cfg),
                              capture_output=True, check=True, cwd=ROOT).stdout.decode().split()
    assert measured == [version, version + INT8_VERSION_SUFFIX[bits], "False"]
    # A node whose graph is not the run's (its CPU quantised otherwise) refuses to encode.
    refuse = (
        "import pickle, sys\n"
        "from care_scale.embed.patch_stage import PatchEncoder\n"
        "from care_scale.exceptions import ConfigError\n"
        "cfg, local, version = pickle.loads(sys.stdin.buffer.read())\n"
        "try:\n"
        "    PatchEncoder(cfg, local_export=local, patch_version=version)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    said = subprocess.run([sys.executable, "-c", refuse], capture_output=True, check=True,
                          input=pickle.dumps((int8, local8, version + "+int8-other-cpu")),
                          cwd=ROOT).stdout.decode()
    assert "quantises differently" in said and "+int8-other-cpu" in said
    # Another node: the directory is not there, so the actor builds the model (torch) to
    # find or make its own export.
    missing = str(tmp_path / "elsewhere" / Path(local).name)
    assert actor(missing)[:3] == ["onnxruntime", version, "True"]
    # Choices that belong to the actors' own nodes are left alone.
    for other in (_config(cohort, tmp_path / "wh", backend="torch"),
                  _config(cohort, tmp_path / "wh", concurrency={"num_gpus_per_actor": 1})):
        assert export_for_local_actors(resolve_models(other)) is None
    # bf16 runs as torch autocast: the actors need the model itself.
    assert export_for_local_actors(dataclasses.replace(cfg, precision="bf16")) is None


def test_slide_encoder_actor_runs_the_driver_care_export_without_torch(cohort, tmp_path,
                                                                         monkeypatch):
    """On the driver's node the slide-encoder actor runs CARE from the driver's ONNX export:
    no torch import, the same model version, the same regions and ROI as torch CARE and
    embeddings within the export's parity bound. Without the directory (another node), a
    torch backend or GPU actors, it builds the torch model."""
    import pickle

    import torch

    from care_scale.embed.job_models import job_models
    from care_scale.embed.pipeline import export_care_for_local_actors, resolve_models
    from care_scale.models import model_version

    monkeypatch.setenv("CARE_SCALE_CACHE", str(tmp_path / "cache"))
    cfg = resolve_models(_config(cohort, tmp_path / "wh"))
    models = job_models(cfg)
    care = models.care_model()
    local = export_care_for_local_actors(cfg, models)
    assert local and Path(local, "manifest.json").exists() and str(tmp_path) in local
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(12), np.arange(9)), -1).reshape(-1, 2) * 448
    feats = rng.standard_normal((len(coords), care.config.in_dim)).astype(np.float32)
    code = (
        "import pickle, sys\n"
        "from care_scale.embed.results import RowContext, encode_slide\n"
        "from care_scale.embed.slide_stage import SlideEncoderActor\n"
        "cfg, local, coords, feats = pickle.loads(sys.stdin.buffer.read())\n"
        "a = SlideEncoderActor(cfg, RowContext('r', 'v', 'c', 'p', False), local)\n"
        "e = encode_slide(a.care, coords, feats, 448)\n"
        "sys.stdout.buffer.write(pickle.dumps((a.info()['backend'], 'torch' in sys.modules, "
        "e.model_version, e)))\n"
    )

    def actor(local_export, config=cfg):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                             input=pickle.dumps((config, local_export, coords, feats)),
                             cwd=ROOT).stdout
        return pickle.loads(out)

    kind, torch_loaded, version, got = actor(local)
    assert (kind, torch_loaded, version) == ("onnxruntime", False, model_version(care))
    with torch.inference_mode():
        ref = care.encode(feats, coords, patch_step=448)
    assert got.num_regions == ref.num_regions and got.roi_index == ref.roi_index
    np.testing.assert_array_equal(got.region_of_patch, ref.region_of_patch)
    np.testing.assert_allclose(got.slide_embedding, ref.slide_embedding, rtol=1e-3, atol=1e-4)
    # Another node: no such directory there, so torch CARE.
    assert actor(str(tmp_path / "elsewhere"))[:2] == ("torch", True)
    for other in (_config(cohort, tmp_path / "wh", backend="torch"),
                  _config(cohort, tmp_path / "wh",
                          concurrency={"num_gpus_per_slide_actor": 1})):
        assert export_care_for_local_actors(resolve_models(other), models) is None


def test_driver_export_only_where_actors_share_its_node(ray_local, cohort, tmp_path):
    """The local cluster is one node that can host the actor; a node too small for it (a
    CPU-less head whose workers are still to come) is not used for the driver's export."""
    from care_scale.embed.pipeline import _actors_run_on_this_node

    assert _actors_run_on_this_node(_config(cohort, tmp_path / "wh"))
    assert not _actors_run_on_this_node(
        _config(cohort, tmp_path / "wh", concurrency={"num_cpus_per_actor": 64}))


# Head (where the driver attaches) decodes; one worker node encodes patches; one runs CARE.
# Each node has a custom resource and each stage asks for its own, so a stage can only run
# on its node; every node listens on loopback only.
_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from care_scale.config import load_config
from care_scale.embed import EmbedConfig, run_embedding

node = {"node_ip_address": "127.0.0.1", "object_store_memory": 150 * 2**20}
cluster = Cluster(initialize_head=True, head_node_args={
    **node, "num_cpus": 1, "resources": {"decode_node": 1}, "include_dashboard": False})
cluster.add_node(**node, num_cpus=1, resources={"encoder_node": 1})
cluster.add_node(**node, num_cpus=1, resources={"care_node": 1})
ray.init(address=cluster.address, log_to_driver=False)
try:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    summary = run_embedding(load_config(EmbedConfig, None, json.loads(sys.argv[1])))
    print("RESULT " + json.dumps({
        "nodes": len(nodes), "ips": sorted({n["NodeManagerAddress"] for n in nodes}),
        "done": summary.done, "failed": summary.failed, "tiles": summary.tiles}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_three_nodes_s3_equal_one_node(ray_local, cohort, tmp_path, s3_options, s3_bucket):
    import fsspec

    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(s3_options))
    for p in sorted(cohort.glob("*.tiff")):
        fs.put(str(p), f"{s3_bucket}/cohort/{p.name}")
    wh = f"s3://{s3_bucket}/wh"
    cfg = {
        "source": f"s3://{s3_bucket}/cohort/", "warehouse": wh, "progress": "none",
        "commit_every": 2, "keep_patches": True, "decode_batch_size": 16,
        "encode_batch_size": 16, "storage_options": s3_options,
        "cache_dir": str(tmp_path / "slide-cache"),
        "concurrency": {"decode_tasks": 1, "encoder_actors": 1, "torch_threads": 1,
                        "decode_resources": {"decode_node": 0.1},
                        "encoder_resources": {"encoder_node": 0.1},
                        "slide_encoder_resources": {"care_node": 0.1}},
    }
    # conftest's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every node and the driver on
    # loopback (else ray.init resolves "127.0.0.1" to the routable address).
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
           "CARE_SCALE_CACHE": str(tmp_path / "export-cache")}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cfg)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert res["nodes"] == 3 and res["ips"] == ["127.0.0.1"]
    assert (res["done"], res["failed"]) == (N_SLIDES, 0)

    one = tmp_path / "one-node"
    run_embedding(_config(cohort, one, keep_patches=True))
    for name, keys, drop in (("slides", ["slide_id"], ("run_id", "source_uri", "source_etag")),
                             ("regions", ["slide_id", "region_id"], ("run_id",)),
                             ("patches", ["slide_id", "x", "y"], ("run_id",))):
        _assert_rows_equal(_rows(wh, name, keys, drop=drop, storage_options=s3_options),
                           _rows(one, name, keys, drop=drop))
    # Nothing of the run's scratch space is left behind.
    assert not fs.exists(f"{s3_bucket}/wh/_staging") or not fs.find(f"{s3_bucket}/wh/_staging")


def test_driver_receives_no_features_or_rows(ray_local, cohort, tmp_path, monkeypatch):
    """Every block the driver iterates is one row per slide (shard URIs, counts, metadata),
    and every slide-encoder outcome is file metadata: the driver's bytes and rows grow with
    slides, not with tiles, batches or feature width."""
    import pickle

    from care_scale.embed import pipeline, slide_stage

    seen: list[dict] = []
    outcomes: list[int] = []
    consume, poll = pipeline._Collector.consume, slide_stage.SlideStage.poll

    def spy_consume(self, batch):
        seen.append({k: np.asarray(v) for k, v in batch.items()})
        return consume(self, batch)

    def spy_poll(self):
        out = poll(self)
        outcomes.extend(len(pickle.dumps(o)) for o in out)
        return out

    monkeypatch.setattr(pipeline._Collector, "consume", spy_consume)
    monkeypatch.setattr(slide_stage.SlideStage, "poll", spy_poll)
    summary = run_embedding(_config(cohort, tmp_path / "wh", keep_patches=True))
    assert summary.done == N_SLIDES and summary.tiles > 0
    cols = set().union(*(b.keys() for b in seen))
    assert cols == {"slide_id", "n_tiles", "count", "shards", "meta", "backend",
                    "error_stage", "error_type", "error_message"}
    assert sorted(sid for b in seen for sid in b["slide_id"]) == [
        f"slide_{i}" for i in range(N_SLIDES)]  # one row per slide, however many tiles
    assert sum(int(b["count"].sum()) for b in seen) == summary.tiles
    assert all(n == c for b in seen for n, c in zip(b["n_tiles"], b["count"]))
    assert all(len(b["meta"][0]) + len(b["shards"][0]) < 4096 for b in seen)
    assert all(size < 8192 for size in outcomes)  # a handful of file descriptions each
    assert json.loads(next(m for b in seen for m in b["meta"] if m))["step_level0"] > 0


def _pids_of(title: str) -> set[int]:
    """Processes whose command line starts with ``title`` (Ray names its workers ray::Class)."""
    pids = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(title.encode()):
                pids.add(int(d.name))
        except OSError:
            continue  # exited meanwhile
    return pids


def test_a_killed_encoder_actor_restarts_and_the_tables_equal_a_clean_run(ray_local, cohort,
                                                                          tmp_path):
    """SIGKILL of the patch-encoder actor's process after the first slide's features are
    staged: Ray restarts the actor, the calls in flight are retried, every slide completes and
    the tables equal those of an undisturbed run."""
    import threading

    wh = tmp_path / "wh"
    seen: dict[str, set[int]] = {}

    def kill_once():
        deadline = time.time() + 60
        while time.time() < deadline and not list(wh.glob("_staging/*/*/*.arrow")):
            time.sleep(0.02)
        seen["killed"] = _pids_of("ray::PatchEncoder")
        for pid in seen["killed"]:
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline:
            seen["after"] = _pids_of("ray::PatchEncoder") - seen["killed"]
            if seen["after"]:
                break
            time.sleep(0.1)

    killer = threading.Thread(target=kill_once, daemon=True)
    killer.start()
    small = {"decode_batch_size": 4, "encode_batch_size": 4, "keep_patches": True}
    summary = run_embedding(_config(cohort, wh, **small))
    killer.join(timeout=60)
    assert seen.get("killed") and seen.get("after"), seen  # it was killed and came back
    assert (summary.done, summary.failed) == (N_SLIDES, 0), summary.failures
    clean = tmp_path / "clean"
    run_embedding(_config(cohort, clean, **small))
    for name, keys in (("slides", ["slide_id"]), ("regions", ["slide_id", "region_id"]),
                       ("patches", ["slide_id", "x", "y"])):
        _assert_rows_equal(_rows(wh, name, keys), _rows(clean, name, keys))


def test_presigned_urls_and_embedded_credentials_never_reach_tables_or_console(
        ray_local, cohort, tmp_path, s3_server, s3_options, s3_bucket, capsys):
    """A manifest of presigned URLs (real ones, from the loopback S3 server): the slide is
    read, and neither its signature nor its token is stored in any table or shown; one that
    fails (no such key) fails without them too. A URI with user:secret@ is refused, exit 2,
    without echoing the secret."""
    import boto3

    from care_scale.cli import main

    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing-secret", region_name="us-east-1")
    client.upload_file(str(cohort / "slide_0.tiff"), s3_bucket, "p/slide_0.tiff")
    signed = {k: client.generate_presigned_url("get_object", ExpiresIn=600, Params={
        "Bucket": s3_bucket, "Key": k}) for k in ("p/slide_0.tiff", "p/missing.tiff")}
    from urllib.parse import parse_qs, quote, urlsplit

    # The signature (SigV2 "Signature" or SigV4 "X-Amz-Signature"), raw and URL-encoded.
    secrets = {form for v in signed.values()
               for k, vals in parse_qs(urlsplit(v).query).items() if "Signature" in k
               for form in (vals[0], quote(vals[0], safe=""))}
    assert secrets and all(len(s) > 10 for s in secrets)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,uri\n" + "".join(
        f"{k.split('/')[1].split('.')[0]},{v}\n" for k, v in signed.items()))
    wh = tmp_path / "wh"
    code = main(["embed", str(manifest), "--warehouse", str(wh), "--set", "progress=log",
                 "--set", "concurrency.decode_tasks=1", "--set", "encode_batch_size=16"])
    out = capsys.readouterr()
    assert code == 3  # one slide done, one failed
    assert [s["slide_id"] for s in _table(wh, "slides").to_pylist()] == ["slide_0"]
    assert [f["slide_id"] for f in _table(wh, "failures").to_pylist()] == ["missing"]
    dumped = out.out + out.err + "".join(
        json.dumps(_table(wh, name).to_pylist(), default=str)
        for name in ("slides", "regions", "failures", "runs"))
    assert "Signature=***" in dumped
    assert not [s for s in secrets if s in dumped]

    for flag, uri in (("source", "s3://AKIAX:topsecret123@bucket/cohort/"),
                      ("warehouse", "s3://AKIAX:topsecret123@bucket/wh")):
        args = (["embed", uri, "--warehouse", str(wh)] if flag == "source"
                else ["embed", str(cohort), "--warehouse", uri])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "has credentials in it" in err and "topsecret123" not in err


def test_precision_int8_is_its_own_model_version_close_to_fp32(ray_local, cohort, tmp_path):
    """`precision: int8` runs the quantised ONNX graph in the actors: another model version
    (a re-run at fp32 re-embeds), embeddings close to the fp32 ones."""
    rows = {}
    for precision in ("fp32", "int8"):
        wh = tmp_path / precision
        summary = run_embedding(_config(cohort / "slide_0.tiff", wh, precision=precision))
        assert summary.done == 1 and summary.backend == "onnxruntime"
        rows[precision] = _table(wh, "slides").to_pylist()[0]
    a, b = rows["fp32"], rows["int8"]
    assert b["model_version"] != a["model_version"] and "+int8" in b["model_version"]
    x, y = np.asarray(a["slide_embedding"]), np.asarray(b["slide_embedding"])
    assert float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) > 0.95


def test_precision_auto_is_measured_recorded_and_kept_on_a_rerun(ray_local, cohort, tmp_path):
    """`precision: auto` calibrates on the run's first slide; the runs table holds what it
    measured and chose; a second run keeps the choice, so nothing is embedded twice."""
    wh = tmp_path / "wh"
    first = run_embedding(_config(cohort / "slide_0.tiff", wh, precision="auto"))
    assert first.done == 1 and first.precision_note
    runs = _table(wh, "runs").to_pylist()
    rec = json.loads(runs[0]["config_json"])["precision_auto"]
    assert rec["min_cosine_bound"] == 0.999
    chosen = next(t for t in rec["trials"] if t["precision"] == rec["precision"])
    assert chosen["min_cosine"] >= 0.999 and chosen["tiles_per_s"] > 0
    assert {t["precision"] for t in rec["trials"]} >= {"fp32", "bf16", "int8"}
    slide = _table(wh, "slides").to_pylist()[0]
    assert ("+" + rec["precision"] in slide["patch_encoder_version"]) == (
        rec["precision"] != "fp32")
    second = run_embedding(_config(cohort / "slide_0.tiff", wh, precision="auto"))
    assert (second.done, second.skipped) == (0, 1) and "kept from an earlier run" in \
        second.precision_note


def _put_cohort(cohort, s3_options, bucket) -> str:
    import fsspec

    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(s3_options))
    for p in sorted(cohort.glob("*.tiff")):
        fs.put(str(p), f"{bucket}/cohort/{p.name}")
    return f"s3://{bucket}/cohort/"


def test_a_whole_job_through_store_faults_equals_a_clean_run(ray_local, cohort, tmp_path,
                                                             s3_options, s3_bucket):
    """Slides and warehouse on S3 behind the fault proxy: resets on Delta-log GETs, on a
    commit PUT (applied, answer lost), on data-file PUTs and on slide downloads (ranged
    GETs), truncated bodies (a slide, a Delta-log file) and a stalled slide download. The job
    ends with every slide embedded (exit 0) and tables equal to a clean run, row for row,
    one commit per batch as in the clean run (none repeated)."""
    from deltalake import DeltaTable
    from faultproxy import Fault, FaultProxy

    from care_scale.storage import join, to_delta

    source = _put_cohort(cohort, s3_options, s3_bucket)
    faults = [
        Fault("GET", r"_delta_log/.*\.json", "reset_before", times=2),
        Fault("GET", r"_delta_log/.*\.json", "truncated"),
        Fault("PUT", r"slides/_delta_log/0+2\.json", "reset_after"),
        Fault("PUT", r"regions/part-.*\.parquet", "reset_before"),
        Fault("PUT", r"patches/part-.*\.parquet", "503"),
        Fault("GET", r"cohort/slide_0\.tiff", "reset_before"),
        Fault("GET", r"cohort/slide_1\.tiff", "truncated"),
        Fault("GET", r"cohort/slide_2\.tiff", "stall", seconds=3),
    ]
    clean, faulty = (f"s3://{s3_bucket}/{n}" for n in ("clean", "faulty"))
    extra = {"keep_patches": True, "commit_every": 1}
    ref = run_embedding(_config(source, clean, storage_options=s3_options, **extra))
    assert (ref.done, ref.failed) == (N_SLIDES, 0), ref.failures
    with FaultProxy(s3_options["aws_endpoint_url"], faults,
                    log_file=tmp_path / "faults.jsonl") as proxy:
        opts = {**s3_options, "aws_endpoint_url": proxy.url}
        summary = run_embedding(_config(source, faulty, storage_options=opts, **extra))
        fired = proxy.fired()
    assert (summary.done, summary.failed) == (N_SLIDES, 0), summary.failures
    assert len(fired) == sum(f.times for f in faults), fired  # every fault did happen
    for name, keys in (("slides", ["slide_id"]), ("regions", ["slide_id", "region_id"]),
                       ("patches", ["slide_id", "x", "y"])):
        _assert_rows_equal(_rows(faulty, name, keys, storage_options=s3_options),
                           _rows(clean, name, keys, storage_options=s3_options))
        a, b = (DeltaTable(u, storage_options=to_delta(s3_options, u))
                for u in (join(faulty, name), join(clean, name)))
        assert (a.version(), len(a.file_uris())) == (b.version(), len(b.file_uris())), name
    assert _table(faulty, "failures", s3_options).num_rows == 0


def test_a_slide_whose_download_keeps_failing_is_a_failures_row(ray_local, cohort, tmp_path,
                                                                 s3_options, s3_bucket):
    """Every GET of one slide reset: after the bounded retries it is one `failures` row
    saying so (a connection reset, the URI, the S3 client's attempts), the other slides are
    embedded (exit 3), nothing crashes."""
    from faultproxy import Fault, FaultProxy

    source = _put_cohort(cohort, s3_options, s3_bucket)
    faults = [Fault("GET", r"cohort/slide_1\.tiff", "reset_before", times=200)]
    wh = f"s3://{s3_bucket}/wh"
    with FaultProxy(s3_options["aws_endpoint_url"], faults,
                    log_file=tmp_path / "faults.jsonl") as proxy:
        summary = run_embedding(_config(source, wh, storage_options={
            **s3_options, "aws_endpoint_url": proxy.url}))
        fired = proxy.fired()
    assert (summary.done, summary.failed) == (N_SLIDES - 1, 1), summary.failures
    (row,) = _table(wh, "failures", s3_options).to_pylist()
    assert row["slide_id"] == "slide_1" and "download failed" in row["message"], row
    # What happened, on which URI, after how many tries: not botocore's "Could not connect to
    # the endpoint URL", which it says of a reset too.
    assert re.search(rf"connection reset while reading {re.escape(source)}slide_1\.tiff "
                     r"after \d+ attempts", row["message"]), row
    assert "could not connect" not in row["message"].lower(), row
    assert 1 < len(fired) < 200


def test_thread_pools_are_sized_from_the_cpus_given_unless_set():
    from care_scale.embed.node_threads import MIN_DECODE_THREADS, decode_threads, intra_op_threads

    assert intra_op_threads(None, 2.0) == 2 and intra_op_threads(None, 0.5) == 1
    assert intra_op_threads(None, None) == 1 and intra_op_threads(3, 1.0) == 3
    cores = len(os.sched_getaffinity(0))
    assert intra_op_threads(None, 4096.0) == cores  # cores present
    # One node, placement known: the encoder actors share its cores (at least their CPUs).
    assert intra_op_threads(None, 1.0, actors_on_node=1) == cores
    assert intra_op_threads(None, 1.0, actors_on_node=2 * cores) == 1
    assert intra_op_threads(None, 2.0, actors_on_node=4 * cores) == min(2, cores)
    assert intra_op_threads(1, 1.0, actors_on_node=1) == 1  # the setting still wins
    assert decode_threads(None, 0.5) == MIN_DECODE_THREADS and decode_threads(None, 6.0) == 6
    assert decode_threads(1, 6.0) == 1


def test_encoder_threads_follow_the_cpus_ray_gives_the_actor(ray_local, cohort, tmp_path):
    # The one encoder actor of a one-node run reserves 1 CPU and runs one intra-op thread per
    # core of the node (the other stages reserve none here).
    conc = {"decode_tasks": 1, "encoder_actors": 1, "num_cpus_per_actor": 1,
            "num_cpus_per_slide_actor": 0, "decode_num_cpus": 0}
    run_embedding(_config(cohort, tmp_path / "auto", concurrency=conc))
    (run,) = _table(tmp_path / "auto", "runs").to_pylist()
    counts = json.loads(run["counts_json"])
    assert counts["threads"] == {"decode": 2, "encoders": [
        {"backend": "onnxruntime", "cpus": 1.0, "threads": len(os.sched_getaffinity(0))}],
        "slide_encoders": [{"backend": "onnxruntime", "threads": 1}]}
    # The run's timeline (benchmarks/bench_fixed_cost.py): driver phases and the workers'.
    t = counts["timeline"]
    assert t["run"] <= t["listed"] <= t["warehouse"] <= t["planned"] <= t["finished"]
    assert t["actor_init"] <= t["actor_ready"] <= t["first_encoded"] <= t["last_encoded"]
    assert t["decode_task"] <= t["tiled"] <= t["stream_done"]
    # The tiles the actors encoded over time (the report's plot): from 0 to every tile.
    over = counts["tiles_over_time"]
    assert over[0][1] == 0 and over[-1][1] == counts["tiles"] > 0
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(over))
    assert t["actor_ready"] - 0.01 <= over[0][0] and over[-1][0] <= t["last_encoded"] + 0.01
    # Explicit settings win, on torch too (its intra-op pool as torch reports it).
    conc.update(torch_threads=1, decode_num_workers=3)
    run_embedding(_config(cohort, tmp_path / "set", backend="torch", concurrency=conc))
    (run,) = _table(tmp_path / "set", "runs").to_pylist()
    threads = json.loads(run["counts_json"])["threads"]
    assert threads == {"encoders": [{"backend": "torch", "cpus": 1.0, "threads": 1}],
                       "decode": 3, "slide_encoders": [{"backend": "torch", "threads": 1}]}
