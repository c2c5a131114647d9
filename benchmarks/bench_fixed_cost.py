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

``--processes``: also sample the run's process tree (every 0.25 s, through /proc): per process
role (Ray's process title, ``ray::PatchEncoder``, or the program's name) its CPU seconds and
peak PSS, and the tree's peak PSS, so a run's cost shows by process (how many there are,
what each imports). Sampling costs a little CPU of its own; compare runs made with it.

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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (label, phase ends at, phase starts at: the latest of these marks before its end): the
#: breakdown, in the order a run goes. Since Ray starts while the driver prepares, "Ray start"
#: overlaps the phases before it.
PHASES = [
    ("interpreter + care_scale.cli imports", "cli", ("spawn",)),
    ("config, care_scale.embed imports", "run", ("cli",)),
    ("model facts (cached: no torch import)", "resolved", ("listed", "run")),
    ("listing the source", "listed", ("run", "resolved")),
    ("versions, checks, precision", "models", ("resolved", "listed")),
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


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _role(pid: int) -> str:
    """What a process is: its Ray title (``ray::PatchEncoder``) or its program's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return ""
    first = argv[0].decode(errors="replace").strip()
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]  # ray::PatchEncoder.encode -> ray::PatchEncoder
    args = [a.decode(errors="replace") for a in argv if a]
    for a in args[1:]:  # a Python program: its script (raylet, GCS: the binary)
        if a.endswith(".py"):
            return os.path.basename(a)
        if a == "-m":
            return "python -m " + args[args.index(a) + 1]
    return os.path.basename(first)


def _tree_sample(root: int) -> dict[int, tuple[str, float, int]]:
    """pid -> (role, CPU seconds so far, PSS KiB) for ``root`` and its descendants."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _CLK
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    out = {}
    for pid in tree:
        pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                pss = next((int(ln.split()[1]) for ln in fh if ln.startswith("Pss:")), 0)
        except OSError:
            pass
        if pid in cpu:
            out[pid] = (_role(pid), cpu[pid], pss)
    return out


class TreeSampler(threading.Thread):
    """Samples a process tree until told to stop: per process its last role seen, CPU
    seconds and peak PSS; the tree's peak PSS."""

    def __init__(self, root: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.every_s = root, every_s
        self.procs: dict[int, dict] = {}
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            sample = _tree_sample(self.root)
            self.peak_kib = max(self.peak_kib, sum(p for _, _, p in sample.values()))
            for pid, (role, cpu, pss) in sample.items():
                rec = self.procs.setdefault(pid, {"role": role, "cpu": 0.0, "pss": 0})
                if role and not role.startswith("ray::IDLE"):
                    rec["role"] = role  # a worker's title once it runs something
                rec["cpu"] = max(rec["cpu"], cpu)
                rec["pss"] = max(rec["pss"], pss)
            self.done.wait(self.every_s)

    def result(self) -> dict:
        roles: dict[str, dict] = {}
        for rec in self.procs.values():
            r = roles.setdefault(rec["role"] or "?", {"n": 0, "cpu": 0.0, "pss_mib": 0.0})
            r["n"] += 1
            r["cpu"] += rec["cpu"]
            r["pss_mib"] += rec["pss"] / 1024
        return {"peak_pss_mib": self.peak_kib / 1024, "roles": roles,
                "processes": len(self.procs),
                "cpu_s": sum(r["cpu"] for r in self.procs.values())}


def run_once(tree: Path, slides: Path, work: Path, extra: list[str],
             env_extra: dict[str, str] | None = None, processes: bool = False) -> dict:
    """One ``care-scale embed`` run on ``tree``; its wall time and the run's timeline (and
    with ``processes``, its process tree's breakdown: :class:`TreeSampler`)."""
    wh = work / "wh"
    shutil.rmtree(wh, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1", **(env_extra or {})}  # the summary arrives when printed
    # Run from ``work``: ``python -m`` puts the working directory first on sys.path, so run
    # from a checkout it would import that checkout's care_scale, whatever PYTHONPATH says.
    cmd = [sys.executable, "-m", "care_scale", "embed", str(slides), "--warehouse", str(wh),
           "--set", "progress=none", "--backend", "onnxruntime", *extra]
    spawn = time.time()
    summary = None
    with (tempfile.TemporaryFile("w+") as errf,
          subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=errf,
                           text=True, cwd=work) as proc):
        sampler = TreeSampler(proc.pid) if processes else None
        if sampler is not None:
            sampler.start()
        out = []
        for line in proc.stdout:
            if line.startswith("run ") and summary is None:  # the summary's first line
                summary = time.time()
            out.append(line)
        code = proc.wait(timeout=300)
        end = time.time()
        if sampler is not None:
            sampler.done.set()
            sampler.join()
        errf.seek(0)
        err = errf.read()
    if code != 0:
        raise SystemExit(f"run failed ({code}):\n{''.join(out)}\n{err}")
    marks = {"spawn": spawn, "exit": end, **({"summary": summary} if summary else {})}
    from deltalake import DeltaTable

    (row,) = DeltaTable(str(wh / "runs")).to_pyarrow_table().to_pylist()
    counts = json.loads(row["counts_json"] or "{}")
    marks.update(counts.get("timeline", {}))
    return {"total": end - spawn, "marks": marks, "tiles": counts.get("tiles"),
            "tree": sampler.result() if sampler is not None else None}


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
    trees = [r["tree"] for r in runs if r.get("tree")]
    if trees:
        print(f"  process tree, medians: {statistics.median(t['processes'] for t in trees):.0f}"
              f" processes, {statistics.median(t['cpu_s'] for t in trees):.1f} CPU s, peak PSS"
              f" {statistics.median(t['peak_pss_mib'] for t in trees):.0f} MiB "
              f"({' '.join(str(round(t['peak_pss_mib'])) for t in trees)})")
        print(f"    {'role':<40} {'n':>3} {'CPU s':>7} {'peak PSS MiB':>13}")
        for role in sorted({k for t in trees for k in t["roles"]}):
            vals = [t["roles"].get(role, {"n": 0, "cpu": 0.0, "pss_mib": 0.0}) for t in trees]
            print(f"    {role[:40]:<40} {statistics.median(v['n'] for v in vals):3.0f} "
                  f"{statistics.median(v['cpu'] for v in vals):7.2f} "
                  f"{statistics.median(v['pss_mib'] for v in vals):13.0f}")


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
    ap.add_argument("--processes", action="store_true",
                    help="sample each run's process tree: CPU s and peak PSS by process")
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
                runs[name].append(run_once(tree, slides, tmp / "work", extra, env,
                                           processes=args.processes))
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
