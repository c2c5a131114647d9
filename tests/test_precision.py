"""`precision: auto`: the candidates follow the CPU's flags, each is measured against fp32 on
the same tiles with real backends, and only one within the cosine bound can win."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from care_scale.inference import precision as P

KIND = {"fp32": "onnxruntime", "bf16": "torch", "int8": "onnxruntime"}  # as the job's auto


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    from care_scale.export import create_patch_backend

    cache = tmp_path_factory.mktemp("exports")
    built = {}

    def make(p: str):
        if p not in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[p] = create_patch_backend(KIND[p], "vit_micro_patch16_64", precision=p,
                                                cache_dir=cache, threads=1)
        return built[p]

    return make


TILES = np.random.default_rng(0).integers(0, 255, (16, 64, 64, 3), dtype=np.uint8)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert P.cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert P.cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_measures_every_candidate_the_cpu_has_and_picks_the_fastest_within_bound(make):
    choice = P.choose_precision(make, TILES, flags=frozenset({"avx512_bf16", "avx512_vnni"}))
    trials = {t.precision: t for t in choice.trials}
    assert set(trials) == {"fp32", "bf16", "int8"}
    assert all(t.skipped is None and t.tiles_per_s > 0 for t in trials.values())
    ok = [t for t in choice.trials if t.min_cosine >= P.MIN_COSINE]
    assert choice.precision == max(ok, key=lambda t: t.tiles_per_s).precision
    assert trials["bf16"].min_cosine < 1.0 and trials["int8"].min_cosine < 1.0  # measured
    record = choice.as_record()
    assert record["min_cosine_bound"] == P.MIN_COSINE and len(record["trials"]) == 3


def test_a_precision_outside_the_bound_never_wins(make, monkeypatch):
    first = P.choose_precision(make, TILES, flags=frozenset({"avx512_vnni"}))
    int8 = next(t for t in first.trials if t.precision == "int8")
    monkeypatch.setattr(P, "MIN_COSINE", (int8.min_cosine + 1.0) / 2)  # stricter than int8
    choice = P.choose_precision(make, TILES, flags=frozenset({"avx512_vnni"}))
    assert choice.precision == "fp32" and "int8 min cosine" in choice.reason


def test_without_the_instructions_reduced_precisions_are_skipped_with_the_reason(make):
    choice = P.choose_precision(make, TILES, flags=frozenset({"avx2"}))
    assert choice.precision == "fp32"
    skipped = {t.precision: t.skipped for t in choice.trials if t.skipped}
    assert "AVX-512 BF16" in skipped["bf16"] and "VNNI" in skipped["int8"]


def test_an_earlier_auto_choice_is_kept_for_the_same_encoder():
    from care_scale.embed.calibrate import earlier_choice
    from care_scale.embed.config import EmbedConfig

    cfg = EmbedConfig(source="s", warehouse="w", precision="auto")
    import dataclasses

    run = dataclasses.asdict(dataclasses.replace(cfg, precision="int8"))
    run["precision_auto"] = {"precision": "int8", "reason": "r", "trials": []}
    assert earlier_choice(cfg, [run])["precision"] == "int8"
    other = dict(run, patch_size=512)
    assert earlier_choice(cfg, [other]) is None


def test_the_heap_calibration_freed_goes_back_to_the_os():
    """glibc keeps freed chunks: the trim after calibrating returns them (the driver held
    ~800 MiB more for the whole run without it)."""
    import subprocess
    import sys

    code = (
        "from care_scale.embed.calibrate import release_freed_memory\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status')\n"
        "                    if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "held = [bytearray(4000) for _ in range(60000)]  # ~240 MB of small heap chunks\n"
        "pin = bytearray(4000)  # allocated after them: free() alone cannot shrink the heap\n"
        "del held\n"
        "before = rss()\n"
        "release_freed_memory()\n"
        "print(before, rss())\n")
    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    before, after = (int(v) for v in out)
    assert before - after > 150, (before, after)
