"""Training inputs from feature files and the ``patches`` Delta table; a run whose data,
checkpoints, metrics and final CARE checkpoint live on S3 (the loopback moto server)."""

from __future__ import annotations

import numpy as np
import pytest

from care_scale.synthetic.cohort import make_feature_cohort


def _by_id(slides):
    return {s.slide_id: s for s in slides}


def test_feature_files_and_patches_table(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from care_scale.training.data import load_feature_files, load_patches_table

    cohort = make_feature_cohort(5, embed_dim=16, seed=1)
    paths = cohort.write(tmp_path / "cohort")
    from_files = _by_id(load_feature_files([paths["features_dir"]]))
    assert sorted(from_files) == [s.slide_id for s in cohort.slides]
    for s in cohort.slides:
        got = from_files[s.slide_id]
        np.testing.assert_array_equal(got.features, s.features)
        np.testing.assert_array_equal(got.grid, s.grid - s.grid.min(0))

    # The patches table the embedding job keeps (one row per patch, two model versions).
    rows = []
    for version in ("care_tiny-aaaa", "care_tiny-bbbb"):
        for s in cohort.slides:
            order = np.random.default_rng(0).permutation(len(s.features))  # any row order
            for i in order:
                rows.append({"slide_id": s.slide_id, "x": int(s.coords[i, 0]),
                             "y": int(s.coords[i, 1]), "patch_size_level0": 256,
                             "feature": s.features[i].tolist(), "model_version": version})
    table = pa.Table.from_pylist(rows)
    uri = str(tmp_path / "wh" / "patches")
    write_deltalake(uri, table)
    from care_scale.exceptions import TrainingDataError

    with pytest.raises(TrainingDataError, match="2 model versions"):
        load_patches_table(uri)
    from_table = _by_id(load_patches_table(uri, model_version="care_tiny-bbbb"))
    for s in cohort.slides:
        a, b = from_table[s.slide_id], from_files[s.slide_id]
        order_a = np.lexsort((a.grid[:, 0], a.grid[:, 1]))
        order_b = np.lexsort((b.grid[:, 0], b.grid[:, 1]))
        np.testing.assert_array_equal(a.grid[order_a], b.grid[order_b])
        np.testing.assert_array_equal(a.features[order_a], b.features[order_b])


@pytest.mark.slow  # a whole stage I run on Ray Train in a new process
def test_stage1_run_on_s3(tmp_path, s3_bucket, s3_options):
    import fsspec

    from care_scale.config import load_config
    from care_scale.models import create_slide_encoder, model_version
    from care_scale.storage import to_fsspec
    from care_scale.training.config import Stage1Config

    cohort = make_feature_cohort(8, embed_dim=192, seed=2)
    paths = cohort.write(tmp_path / "cohort")
    fs = fsspec.filesystem("s3", **to_fsspec(s3_options, "s3://x"))
    fs.put(paths["features_dir"] + "/", f"{s3_bucket}/features/", recursive=True)

    cfg = load_config(Stage1Config, None, {
        "data": {"feature_uris": [f"s3://{s3_bucket}/features/"], "storage_options": s3_options},
        "run": {"storage_path": f"s3://{s3_bucket}/runs", "storage_options": s3_options,
                "name": "s3-run", "num_workers": 2, "checkpoint_every": 3, "log_every": 1,
                "keep_last": 1},
        "optim": {"steps": 6, "warmup_steps": 2, "batch_size": 2},
        "ssl": {"out_dim": 16, "patch_out_dim": 16},
    })
    # In a new process (own local Ray), as a user runs it: in-process fits can hang in the
    # suite's shared cluster late in the suite.
    import json
    import os
    import subprocess
    import sys

    import yaml

    from care_scale.config import to_dict
    from care_scale.training.loop import read_metrics

    cfg_file = tmp_path / "stage1.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "care_scale", "train", "stage1", "--config",
                           str(cfg_file)], capture_output=True, text=True, timeout=600, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["checkpoint"] == f"s3://{s3_bucket}/runs/s3-run/final"
    history = read_metrics(f"s3://{s3_bucket}/runs/s3-run", s3_options)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    listing = fs.ls(f"{s3_bucket}/runs/s3-run")
    names = sorted(p.rsplit("/", 1)[1] for p in listing)
    assert {"metrics.csv", "metrics.jsonl", "final"} <= set(names), names
    assert len([n for n in names if n.startswith("checkpoint_2")]) == 1  # keep_last=1
    enc = create_slide_encoder("care_tiny", out["checkpoint"], storage_options=s3_options)
    assert model_version(enc) == out["model_version"]


def test_cli_reports_bad_config(capsys):
    from care_scale.cli import main

    assert main(["train", "stage1"]) == 2  # no data source configured
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ConfigError: data: set exactly one of")
    assert main(["train", "stage2", "--set", "data.synthetic=true", "--set",
                 "align.phase_steps=1,2"]) == 2
    assert "must sum to optim.steps" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prune_keeps_exactly_the_tracked_checkpoints(where, tmp_path, request):
    """After a resume, the killed run's checkpoint directories are removed; tracked ones stay."""
    import json

    import fsspec

    from care_scale.storage import to_fsspec
    from care_scale.training.loop import prune_checkpoints

    if where == "s3":
        opts = request.getfixturevalue("s3_options")
        root = f"s3://{request.getfixturevalue('s3_bucket')}/runs/r"
    else:
        opts, root = None, str(tmp_path / "runs" / "r")
    fs, base = fsspec.core.url_to_fs(root, **to_fsspec(opts, root))
    names = ["checkpoint_a", "checkpoint_b", "checkpoint_c", "checkpoint_d"]
    for n in names:
        fs.makedirs(f"{base}/{n}", exist_ok=True)  # a no-op on S3, needed on local disk
        fs.pipe(f"{base}/{n}/state.pt", b"x")
    fs.pipe(f"{base}/metrics.jsonl", b"{}\n")
    assert prune_checkpoints(root, opts) == []  # no snapshot yet: nothing is deleted
    snap = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_c"},
                                   {"checkpoint_dir_name": "checkpoint_d"}],
            "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_d"}}
    fs.pipe(f"{base}/checkpoint_manager_snapshot.json", json.dumps(snap).encode())
    assert prune_checkpoints(root, opts) == ["checkpoint_a", "checkpoint_b"]
    fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    assert left == ["checkpoint_c", "checkpoint_d", "checkpoint_manager_snapshot.json",
                    "metrics.jsonl"]


def test_the_stage_table_matches_the_cli_choices():
    from care_scale.choices import Stage, values
    from care_scale.training.loop import STAGES, _stage

    assert sorted(STAGES) == sorted(values(Stage))
    for stage in STAGES:
        _, task_cls = _stage(stage)
        assert task_cls.stage == stage
