"""`care-scale bench`: a real (small) measurement run on this machine, the plan arithmetic on
fixed rates, and the torch-only GPU check in its CPU fallback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from care_scale.bench.plan import Alternative, ClusterShape, Rates, plan_cohort
from care_scale.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_run_writes_json_with_every_field(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "care_scale", "bench", "--seconds", "1", "--slide-encoder",
         "care_tiny", "--patch-encoder", "vit_micro_patch16_64", "--backends", "all",
         "--care-sizes", "256,1024", "--json"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert {"hardware", "config", "slides", "decode", "patch_encoder", "slide_encoder",
            "elapsed_s"} <= set(result)
    assert result["hardware"]["cores"] >= 1 and isinstance(result["hardware"]["cpu_flags"], list)
    measured = [e for e in result["patch_encoder"]["entries"] if e["skipped"] is None]
    skipped = [e for e in result["patch_encoder"]["entries"] if e["skipped"] is not None]
    assert any(e["backend"] == "torch" and e["precision"] == "fp32" for e in measured)
    for e in measured:
        assert e["tiles_per_s"] > 0 and -1.0 <= e["min_cosine"] <= 1.0 + 1e-6, e
    for e in skipped:  # a precision the machine cannot run says why, and has no figure
        assert e["skipped"].strip() and e["tiles_per_s"] is None, e
    decoded = [d for d in result["decode"] if d["skipped"] is None]
    assert decoded and all(d["tiles_per_s_node"] > 0 for d in decoded)
    sizes = {e["n"] for e in result["slide_encoder"]["entries"] if e["skipped"] is None}
    assert sizes == {256, 1024}


def _rates(**gpu) -> Rates:
    return Rates(machine="fixed", decode_tiles_per_s_per_core=100.0, decode_backend="tifffile",
                 encoder_tiles_per_s_per_cpu_core=10.0, encoder_cpu="torch fp32",
                 care_core_s_per_patch=0.001,
                 cpu_alternatives=(Alternative("onnxruntime int8", 20.0, 0.9995),), **gpu)


def test_plan_arithmetic_on_fixed_rates():
    # CPU-only: 2 nodes x 10 cores; core-seconds per tile 1/100 + 1/10 + 0.001 = 0.111.
    plan = plan_cohort(_rates(), ClusterShape(2, 0, 10), slides=100, tiles_per_slide=1000)
    assert plan["tiles_per_s"] == pytest.approx(20 / 0.111)
    assert plan["wall_hours"] == pytest.approx(100_000 * 0.111 / 20 / 3600)
    assert plan["bottleneck"] == "patch_encoder" and plan["gpu_hours"] == 0.0
    assert any("int8" in line for line in plan["advice"])
    # GPUs: 1 node x 4 GPUs x 8 cores; per GPU 1 / (1/1000 + 0.0001) = 909 tiles/s, decode
    # 800 tiles/s: decode limits.
    rates = _rates(encoder_tiles_per_s_per_gpu=1000.0, encoder_gpu="torch fp16",
                   care_gpu_s_per_patch=0.0001)
    plan = plan_cohort(rates, ClusterShape(1, 4, 8), slides=10, tiles_per_slide=8000)
    assert plan["bottleneck"] == "decode" and plan["tiles_per_s"] == pytest.approx(800.0)
    assert plan["gpu_hours"] == pytest.approx(80_000 / 800 / 3600 * 4)
    with pytest.raises(ConfigError, match="GPU"):  # GPUs planned from CPU-only rates
        plan_cohort(_rates(), ClusterShape(1, 4, 8), slides=10, tiles_per_slide=10)


def test_gpu_check_tiny_falls_back_to_the_cpu_and_says_so(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                          str(tmp_path), "--tiny", "--device", "cpu"],
                         check=False, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["all_ok"] is True and "NOT GPU figures" in result["note"]
    assert result["patch_encoders"] and result["care_forward"]
    assert "CPU fallback: not GPU figures" in out.stdout
