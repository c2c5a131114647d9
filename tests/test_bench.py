"""`care-scale bench`: a real (small) measurement run on this machine, the plan arithmetic on
fixed rates, and the torch-only GPU check in its CPU fallback."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from care_scale.bench.budget import (
    BUILD_FACTORS,
    CPU_ENCODER_LADDER,
    INT8_OVER_FP32,
    Budget,
    BuildEstimate,
    Stage,
    care_skip,
    default_cpu_encoder,
    extrapolate_peak,
)
from care_scale.bench.measure import Candidate, measure_care, measure_patch_encoder
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
    care = result["slide_encoder"]["entries"]
    assert [e["n"] for e in care] == [256, 1024] and care[0]["skipped"] is None
    for e in care:  # the budget covers the whole run: a size may be skipped, saying why
        assert (e["seconds"] > 0 and e["calls"] >= 1) if e["skipped"] is None else \
            e["skipped"].startswith(("budget: ", "memory: ")), e
    assert result["patch_encoder"]["build_s"] >= 0 and result["patch_encoder"]["chosen_by"]


# ------------------------------------------------------------------------ the time budget

def test_build_estimates_follow_the_torch_build_then_the_builds_measured():
    builds = BuildEstimate(torch_build_s=2.0, call_s=0.5)
    fp32 = BUILD_FACTORS["onnxruntime"][0] * 2.5 + BUILD_FACTORS["onnxruntime"][1]
    assert builds.seconds("torch", "bf16") == 0.0
    assert builds.seconds("onnxruntime", "fp32") == pytest.approx(fp32)
    assert builds.seconds("onnxruntime", "int8") == pytest.approx(INT8_OVER_FP32 * fp32)
    left = fp32 + 1.0 + 0.5  # the fp32 build and two calls fit, int8 does not
    assert builds.skip("onnxruntime", "fp32", left) is None
    why = builds.skip("onnxruntime", "int8", left)
    assert why.startswith("budget: ") and "estimated from the 2.0 s fp32 torch build" in why
    builds.record("onnxruntime", "fp32", 1.0)  # measured faster: int8 now fits
    assert builds.seconds("onnxruntime", "int8") == pytest.approx(INT8_OVER_FP32)
    assert builds.skip("onnxruntime", "int8", left) is None


def test_stages_end_at_their_cumulative_share_but_keep_their_own():
    now = time.perf_counter()
    assert Budget(10.0, start=now).stage("patch_encoder").left() == pytest.approx(7.0, abs=0.5)
    late = Budget(10.0, start=now - 100.0)  # the stages before overran
    assert late.stage("care").left() == pytest.approx(3.0, abs=0.5)


def test_patch_encoder_entries_whose_build_would_overrun_are_skipped_for_budget(tmp_path):
    import warnings

    from care_scale.models import create_patch_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = create_patch_encoder("vit_micro_patch16_64")
    tiles = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    cands = [Candidate("torch", "cpu", "fp32", "eager"),
             Candidate("torch", "cpu", "fp32", "inference_mode"),
             Candidate("onnxruntime", "cpu", "fp32", "ort"),
             Candidate("onnxruntime", "cpu", "int8", "ort")]
    stage = Stage("patch_encoder", time.perf_counter() + 4.0)
    # As if the fp32 torch build had taken 100 s: no export fits 4 s, torch entries do.
    out = measure_patch_encoder(encoder, tiles, cands, flags=frozenset({"avx512_vnni"}),
                                stage=stage, builds=BuildEstimate(100.0), workdir=tmp_path)
    assert [e["skipped"] is None for e in out] == [True, True, False, False]
    assert all(e["skipped"].startswith("budget: ") and e["tiles_per_s"] is None
               and e["build_s"] is None for e in out[2:])
    assert not (tmp_path / "exports").exists()  # nothing was built for them
    # No time left at all: the fp32 reference is still measured, everything else skipped.
    out = measure_patch_encoder(encoder, tiles, cands[:2], flags=frozenset(),
                                stage=Stage("patch_encoder", time.perf_counter()),
                                builds=BuildEstimate(0.0), workdir=tmp_path)
    assert out[0]["tiles_per_s"] > 0 and out[1]["skipped"].startswith("budget: ")


def test_care_sizes_skip_for_memory_from_the_measured_peaks_or_for_budget():
    assert extrapolate_peak([], 10) is None
    # The larger of the line through the last two peaks and proportional scaling of the last.
    assert extrapolate_peak([(1_000, 10.0), (10_000, 1000.0)], 50_000) == pytest.approx(5400.0)
    assert extrapolate_peak([(1_000, 100.0), (10_000, 400.0)], 50_000) == pytest.approx(2000.0)
    assert extrapolate_peak([(1_000, 60.0)], 50_000) == pytest.approx(3000.0)  # proportional
    kw = {"call_s": 1.0, "left_s": 10.0, "measured_from": 10_000}
    assert care_skip(50_000, peak_mib=2020.0, available_mib=4000.0, **kw) is None
    why = care_skip(50_000, peak_mib=2020.0, available_mib=2000.0, **kw)
    assert why.startswith("memory: ") and "2,020 MiB" in why
    why = care_skip(50_000, peak_mib=10.0, available_mib=4000.0, call_s=20.0, left_s=10.0,
                    measured_from=10_000)
    assert why.startswith("budget: ") and "N=10,000" in why


def test_measure_care_keeps_the_first_size_and_skips_what_the_budget_cannot_hold():
    import warnings

    from care_scale.models import create_slide_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        care = create_slide_encoder("care_tiny")
    out = measure_care(care, (256, 100_000), device="cpu",
                       stage=Stage("care", time.perf_counter()))
    assert out[0]["skipped"] is None and out[0]["seconds"] > 0 and out[0]["calls"] >= 1
    assert out[1]["skipped"].startswith("budget: ") and out[1]["estimated_peak_mib"] is not None
    # Memory decides before time: with no memory free the big size is skipped for memory.
    out = measure_care(care, (256, 100_000), device="cpu",
                       stage=Stage("care", time.perf_counter() + 0.5), available_mib=0.0)
    assert out[0]["skipped"] is None and out[1]["skipped"].startswith("memory: "), out[1]
    assert out[1]["estimated_peak_mib"] >= 100_000 * 192 * 4 / 2**20  # at least the inputs


def test_cpu_default_encoder_is_the_largest_that_fits():
    assert default_cpu_encoder(10.0, 32, gflops=1e-3)[0] == CPU_ENCODER_LADDER[0]
    assert default_cpu_encoder(1e9, 32, gflops=1e6)[0] == CPU_ENCODER_LADDER[-1]
    picks = [default_cpu_encoder(s, 32, gflops=100.0)[0] for s in (5.0, 50.0, 500.0, 5000.0)]
    assert [CPU_ENCODER_LADDER.index(p) for p in picks] == sorted(
        CPU_ENCODER_LADDER.index(p) for p in picks)
    assert len(set(picks)) > 1


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
