"""The README's worked example end to end, through the real job (Ray, marked slow): embed a
small generated cohort with patches kept (``care-scale embed`` in its own process) ->
export-features -> probe -> similar."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from care_scale.cli import main
from care_scale.models import read_patch_features
from care_scale.query import sql


@pytest.mark.slow
def test_embed_then_export_probe_similar(tmp_path, capsys):
    from care_scale.synthetic import write_synthetic_slide

    src = tmp_path / "slides"
    src.mkdir()
    for i in range(6):  # slide i is mostly tissue type i % 3 (make_demo_cohort's rule)
        bias = np.zeros(3, np.float32)
        bias[i % 3] = 0.8
        write_synthetic_slide(src / f"slide_{i:03d}.tif", width=1536, height=1024, mpp=0.5,
                              seed=i, n_types=3, type_bias=bias)
    wh = str(tmp_path / "wh")
    # The job as a user runs it: its own process and local Ray cluster (bounded), not an
    # in-process run on the suite's shared cluster.
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    sets = ["progress=none", "keep_patches=true", "slide_encoder.name=care_tiny",
            "decode_batch_size=16", "encode_batch_size=16", "concurrency.decode_tasks=1",
            "concurrency.encoder_actors=1", "concurrency.torch_threads=1"]
    proc = subprocess.run([sys.executable, "-m", "care_scale", "embed", str(src), "--warehouse",
                           wh, *[x for kv in sets for x in ("--set", kv)]],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]

    out = tmp_path / "features"
    assert main(["tables", "export-features", "--warehouse", wh, "--out", str(out)]) == 0
    assert "6 h5 files" in capsys.readouterr().out
    patches = sql(wh, "SELECT x, y, feature FROM patches WHERE slide_id = 'slide_002' "
                      "ORDER BY y, x").to_pydict()
    pf = read_patch_features(str(out / "slide_002.h5"))
    assert np.array_equal(pf.coords, np.stack([patches["x"], patches["y"]], 1))
    assert np.array_equal(pf.features, np.asarray(patches["feature"], np.float32))

    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,dominant_type\n" + "".join(
        f"slide_{i:03d},{i % 3}\n" for i in range(6)))
    assert main(["probe", "--warehouse", wh, "--labels", str(labels), "--target",
                 "dominant_type", "--folds", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_samples"] == 6 and len(res["folds"]) == 2
    assert main(["similar", "--warehouse", wh, "slide_000", "--k", "3", "--json"]) == 0
    near = json.loads(capsys.readouterr().out)
    assert len(near) == 3 and all(r["slide_id"] != "slide_000" for r in near)
    assert sql(wh, "SELECT count(*) AS n FROM probes").to_pylist() == [{"n": 1}]
