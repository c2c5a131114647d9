"""Fixed cost of one embedding run: command start -> first encoded tile, last tile -> exit.

    python benchmarks/bench_fixed_cost.py [--repeats 3] [--side 2048] [--baseline-rev REV]

Runs ``python -m care_scale embed SLIDE_DIR --warehouse WH`` (one generated slide, the seeded
tiny models care_tiny + vit_demo_patch16_112 on ONNX Runtime, a fresh local Ray cluster per
run, a fresh warehouse per run) as a subprocess, timed from just before it is spawned to its
exit, and breaks the time down with the run's timeline (``runs.counts_json`` ->
``timeline``, see ``care_scale/timeline.py``): the driver's phases, the encoder actor's
start-up, its first and last encoded batch, the tail (CARE + commits, shutdown, exit).

``--baseline-rev REV``: also run the same command on the tree of git revision REV (extracted
with ``git archive`` into a temporary folder, first on ``PYTHONPATH``), alternating with this
tree run by run, and print per-pair ratios. A revision without the timeline gives the total
only. ``--warmup`` uncounted runs per tree first (the ONNX export cache, the page cache).

Prints medians and the load average beside the CPU; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (label, phase ends at, phase starts at: the latest of these marks before its end): the
#: breakdown, in the order a run goes. Since Ray starts while the driver prepares, "Ray start"
#: overlaps the phases before it.
PHASES = [
    ("interpreter + care_scale.cli imports", "cli", ("spawn",)),
    ("config, care_scale.embed imports", "run", ("cli",)),
    ("model registry resolved (imports torch)", "resolved", ("listed", "run")),
    ("listing the source", "listed", ("run", "resolved")),
    ("models built (versions, torch)", "models", ("resolved", "listed")),
    ("warehouse tables, runs row", "warehouse", ("models",)),
    ("Ray start (overlaps the above where early)", "ray", ("ray_start", "warehouse")),
    ("driver ONNX export (cached)", "exported", ("prepared", "ray")),
    ("Ray Data plan, actors created", "planned", ("exported",)),
    ("encoder actor start (process -> __init__)", "actor_init", ("planned",)),
    ("encoder actor __init__ (backend load)", "actor_ready", ("actor_init",)),
    ("decode task start", "decode_task", ("planned",)),
    ("slide opened and tiled", "tiled", ("decode_task",)),
    ("-> first batch encoded", "first_encoded", ("spawn",)),
    ("encoding (first -> last batch)", "last_encoded", ("first_encoded",)),
    ("last batch -> stream done", "stream_done", ("last_encoded",)),
    ("CARE + commits", "collected", ("stream_done",)),
    ("actor pools killed, staging removed", "pools_down", ("collected",)),
    ("ray.shutdown()", "shutdown", ("pools_down", "collected")),
    ("runs row, summary printed", "summary", ("shutdown",)),
    ("interpreter exit", "exit", ("summary", "shutdown")),
]


def cpu_line() -> str:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    want = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    have = [f for f in want if f in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(have) or 'none of ' + str(want)}"


def load_line() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_slide(folder: Path, side: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from care_scale.synthetic import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(folder / "slide_0.tiff", width=side, height=side, mpp=0.5, seed=0)
    return folder


def run_once(tree: Path, slides: Path, work: Path, extra: list[str],
             env_extra: dict[str, str] | None = None) -> dict:
    """One ``care-scale embed`` run on ``tree``; its wall time and the run's timeline."""
    wh = work / "wh"
    shutil.rmtree(wh, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1", **(env_extra or {})}  # the summary arrives when printed
    cmd = [sys.executable, "-m", "care_scale", "embed", str(slides), "--warehouse", str(wh),
           "--set", "progress=none", "--backend", "onnxruntime", *extra]
    spawn = time.time()
    summary = None
    with (tempfile.TemporaryFile("w+") as errf,
          subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=errf,
                           text=True) as proc):
        out = []
        for line in proc.stdout:
            if line.startswith("run ") and summary is None:  # the summary's first line
                summary = time.time()
            out.append(line)
        code = proc.wait(timeout=300)
        end = time.time()
        errf.seek(0)
        err = errf.read()
    if code != 0:
        raise SystemExit(f"run failed ({code}):\n{''.join(out)}\n{err}")
    marks = {"spawn": spawn, "exit": end, **({"summary": summary} if summary else {})}
    from deltalake import DeltaTable

    (row,) = DeltaTable(str(wh / "runs")).to_pyarrow_table().to_pylist()
    counts = json.loads(row["counts_json"] or "{}")
    marks.update(counts.get("timeline", {}))
    return {"total": end - spawn, "marks": marks, "tiles": counts.get("tiles")}


def breakdown(marks: dict) -> dict[str, float]:
    out = {}
    for label, end, starts in PHASES:
        if end not in marks:
            continue
        before = [marks[m] for m in starts if m in marks and marks[m] <= marks[end]]
        if before:
            out[label] = marks[end] - max(before)
    if "first_encoded" in marks and "last_encoded" in marks:
        out["FIXED: to first batch + last batch to exit"] = (
            marks["first_encoded"] - marks["spawn"] + marks["exit"] - marks["last_encoded"])
    return out


def extract(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` in ``into`` (git archive; no checkout is touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "care_scale"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def report(name: str, runs: list[dict]) -> None:
    print(f"\n{name}: {len(runs)} runs, {runs[0]['tiles']} tiles each; medians (s)")
    tables = [breakdown(r["marks"]) for r in runs]
    for label in dict.fromkeys(k for t in tables for k in t):
        vals = [t[label] for t in tables if label in t]
        print(f"  {label:<46} {statistics.median(vals):7.2f}   "
              f"({' '.join(f'{v:.2f}' for v in vals)})")
    totals = [r["total"] for r in runs]
    print(f"  {'TOTAL command wall time':<46} {statistics.median(totals):7.2f}   "
          f"({' '.join(f'{v:.2f}' for v in totals)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--side", type=int, default=2048, help="slide side in px at 0.5 um/px")
    ap.add_argument("--baseline-rev", help="git revision to compare with, run alternately")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="the baseline is this tree (or --baseline-rev's) with these "
                         "variables set, e.g. CARE_SCALE_FAST_EXIT=0")
    ap.add_argument("--warmup", type=int, default=1,
                    help="uncounted runs per tree first (0 once the export cache is warm)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra --set KEY=VALUE for both trees")
    args = ap.parse_args()
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    print(f"CPU: {cpu_line()}")
    print(f"start: {load_line()}")
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as tmp:
        tmp = Path(tmp)
        slides = make_slide(tmp / "slides", args.side)
        base_env = dict(kv.split("=", 1) for kv in args.baseline_env)
        trees = {"this tree": (ROOT, {})}
        if args.baseline_rev or base_env:
            base = extract(args.baseline_rev, tmp / "base") if args.baseline_rev else ROOT
            label = " ".join([args.baseline_rev or "this tree", *args.baseline_env])
            trees = {f"baseline {label}": (base, base_env), **trees}
        runs: dict[str, list[dict]] = {n: [] for n in trees}
        for _ in range(args.warmup):  # export cache, page cache
            for tree, env in trees.values():
                run_once(tree, slides, tmp / "work", extra, env)
        for i in range(args.repeats):
            for name, (tree, env) in (list(trees.items()) if i % 2 == 0
                                      else list(trees.items())[::-1]):
                runs[name].append(run_once(tree, slides, tmp / "work", extra, env))
                print(f"  run {i + 1} {name}: {runs[name][-1]['total']:.2f} s  [{load_line()}]",
                      flush=True)
        for name in trees:
            report(name, runs[name])
        if len(trees) == 2:
            base, this = (runs[n] for n in trees)
            ratios = [b["total"] / t["total"] for b, t in zip(base, this)]
            fixed = [(breakdown(b["marks"]), breakdown(t["marks"])) for b, t in zip(base, this)]
            key = "FIXED: to first batch + last batch to exit"
            print(f"\nper-pair total ratio baseline/this: {' '.join(f'{r:.2f}' for r in ratios)}"
                  f" (median {statistics.median(ratios):.2f})")
            if all(key in b and key in t for b, t in fixed):
                print("per-pair fixed cost baseline -> this (s): "
                      + "  ".join(f"{b[key]:.2f}->{t[key]:.2f}" for b, t in fixed))
    print(f"\nend: {load_line()}; CPU: {cpu_line()}")


if __name__ == "__main__":
    main()
