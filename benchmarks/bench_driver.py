"""What the job's driver costs per tile, before and after CARE and the table writes moved
into Ray workers (issue 11), side by side in one run.

    python benchmarks/bench_driver.py [--files 3 6] [--patches 10000] [--slides 8 16]
                                      [--side 8192] [--before b3c9837] [--repeats 1]
                                      [--workloads features pixels speeds manifest] [--out DIR]

Two workloads, each run by both designs, each run in a fresh driver process:

- features: CONCH-sized patch features (768-d, ``--patches`` per file, written as CLAM/TRIDENT
  .h5) into the paper-size CARE (``care``), ``--features``: the issue's measurement.
- pixels: generated slides (``--side`` px squared) through decode, the tiny patch encoder and
  ``care_tiny``: the regime of a GPU node, where decode and I/O dominate.
- speeds (this design only): both cohort sizes and a few slides of twice the side, through
  the tiny and a slower patch encoder, twice, fitted to fixed + per second of run + per tile
  + per slide: the driver's ceiling in tiles/s.
- manifest: time to the first block and driver memory for manifests of 1k-100k rows.

"Before" is the code at ``--before`` (the last commit with CARE in the driver), checked out
with ``git worktree`` and put first on ``PYTHONPATH`` of its runs; "after" is this checkout.

Per run, in the driver process only (Ray's own processes are not the driver): CPU seconds
(``time.process_time``, all threads) from the first block or slide the driver handles to the
end of ``run_embedding``, i.e. the streaming phase plus the commits; the bytes it receives
(block columns as the driver iterates them; for the new design also the pickled outcomes of
the slide-encoder actors); end-to-end tiles/s. Each design runs two cohort sizes; the slope
between them is the marginal driver CPU per tile, which excludes fixed costs (Ray start-up,
model build). The projected ceiling of one driver is 1 / (marginal driver CPU per tile).
Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The last commit whose driver assembled features and ran CARE itself.
BEFORE_REV = "b3c9837"

CHILD = r"""
import json, pickle, sys, time
import numpy as np
from care_scale.config import load_config
from care_scale.embed import EmbedConfig, run_embedding
from care_scale.embed import pipeline

state = {"t0": None, "w0": None, "bytes": 0}

def nbytes(batch):
    n = 0
    for v in batch.values():
        v = np.asarray(v)
        n += sum(len(str(x)) for x in v.ravel()) if v.dtype == object else v.nbytes
    return n

def mark():
    if state["t0"] is None:
        state["t0"], state["w0"] = time.process_time(), time.perf_counter()

C = pipeline._Collector
orig_consume = C.consume
def consume(self, batch):
    mark()
    state["bytes"] += nbytes(batch)
    return orig_consume(self, batch)
C.consume = consume
if hasattr(C, "submit_feature_file"):
    orig_submit = C.submit_feature_file
    def submit_feature_file(self, src):
        mark()
        return orig_submit(self, src)
    C.submit_feature_file = submit_feature_file
try:
    from care_scale.embed import slide_stage
except ImportError:
    slide_stage = None
if slide_stage is not None:
    S = slide_stage.SlideStage
    for name in ("poll", "drain"):
        def wrap(f):
            def g(self):
                out = f(self)
                state["bytes"] += sum(len(pickle.dumps(o)) for o in out)
                return out
            return g
        setattr(S, name, wrap(getattr(S, name)))

cfg = load_config(EmbedConfig, None, json.loads(sys.argv[1]))
w0 = time.perf_counter()
summary = run_embedding(cfg)
end = time.perf_counter()
wall = end - w0
cpu = time.process_time() - (state["t0"] or 0.0)
stream_wall = end - (state["w0"] or w0)
print("RESULT " + json.dumps({"tiles": summary.tiles, "done": summary.done,
                              "failed": summary.failed, "cpu": cpu, "bytes": state["bytes"],
                              "wall": wall, "stream_wall": stream_wall}))
"""


# Cohort size: a manifest of N rows (all pointing at one small real slide, under N ids) is
# listed, anti-joined and planned; the run stops when the first block reaches the driver.
CHILD_PLAN = r"""
import json, resource, sys, time
from care_scale.config import load_config
from care_scale.embed import EmbedConfig, run_embedding
from care_scale.embed import pipeline

class FirstBlock(Exception):
    pass

t0 = time.perf_counter()
def consume(self, batch):
    raise FirstBlock(time.perf_counter() - t0)
pipeline._Collector.consume = consume
cfg = load_config(EmbedConfig, None, json.loads(sys.argv[1]))
try:
    run_embedding(cfg)
    first = None
except FirstBlock as exc:
    first = exc.args[0]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"first_block_s": first, "peak_rss_mib": rss}))
"""


def cpu_info() -> str:
    flags = set()
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(wanted)}"


def make_feature_files(out: Path, n: int, patches: int) -> Path:
    import h5py
    import numpy as np

    d = out / f"features_{patches}"
    d.mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(patches)))
    for i in range(n):
        p = d / f"feat_{i}.h5"
        if p.exists():
            continue
        rng = np.random.default_rng(i)
        gy, gx = np.divmod(np.arange(patches), side)
        coords = np.stack([gx, gy], 1).astype(np.int64) * 512
        with h5py.File(p, "w") as fh:
            fh["features"] = rng.standard_normal((patches, 768)).astype(np.float32)
            fh["coords"] = coords
            fh["coords"].attrs["patch_size_level0"] = 512
    return d


def subset(folder: Path, n: int, pattern: str) -> Path:
    """A folder of symlinks to the first ``n`` files (each cohort size is its own source)."""
    files = sorted(folder.glob(pattern))[:n]
    d = folder.parent / f"{folder.name}_first{n}"
    d.mkdir(exist_ok=True)
    for f in files:
        if not (d / f.name).exists():
            os.symlink(f, d / f.name)
    return d


def run(code_root: Path, values: dict, child: str = CHILD) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "RAY_ADDRESS": "",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", child, json.dumps(values)], env=env,
                          capture_output=True, text=True, cwd=str(code_root), check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def before_tree(rev: str, out: Path) -> Path:
    tree = out / f"before-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                       check=True, capture_output=True)
    return tree


def median_run(runs: list[dict]) -> dict:
    """The median of each measured quantity over repeats of one run."""
    import numpy as np

    return {k: float(np.median([r[k] for r in runs])) for k in ("tiles", "cpu", "bytes", "wall")}


def report(name: str, design: str, runs: list[dict]) -> dict:
    small, big = runs
    dt = big["tiles"] - small["tiles"]
    marginal = (big["cpu"] - small["cpu"]) / max(dt, 1)
    per_tile = big["cpu"] / max(big["tiles"], 1)
    line = {
        "workload": name, "design": design, "tiles": int(big["tiles"]),
        "driver_cpu_s": round(big["cpu"], 2),
        "driver_cpu_ms_per_1k_tiles": round(per_tile * 1e6, 1),
        "marginal_cpu_ms_per_1k_tiles": round(marginal * 1e6, 1),
        "bytes_per_tile": round(big["bytes"] / max(big["tiles"], 1), 1),
        "tiles_per_s": round(big["tiles"] / big["wall"], 1),
        "driver_ceiling_tiles_per_s": round(1 / marginal) if marginal > 0 else float("inf"),
    }
    print(f"  {name:8s} {design:6s}: {line['tiles']} tiles, driver {line['driver_cpu_s']} "
          f"CPU-s = {line['driver_cpu_ms_per_1k_tiles']} CPU-ms per 1k tiles (marginal "
          f"{line['marginal_cpu_ms_per_1k_tiles']}), {line['bytes_per_tile']} B/tile "
          f"received, {line['tiles_per_s']} tiles/s end to end, one driver keeps up with "
          f"~{line['driver_ceiling_tiles_per_s']} tiles/s", flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, nargs=2, default=[3, 6])
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--slides", type=int, nargs=2, default=[8, 16])
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--before", default=BEFORE_REV)
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--workloads", nargs="+",
                    default=["features", "pixels", "speeds", "manifest"])
    ap.add_argument("--manifest-rows", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per design and cohort, alternating designs; medians reported")
    ap.add_argument("--encode-batch-size", type=int, default=64)
    ap.add_argument("--decode-batch-size", type=int, default=64)
    ap.add_argument("--out", default="/tmp/care-bench-driver")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_info()}; date {time.strftime('%Y-%m-%d')}")
    designs = {"after": ROOT}
    if not args.skip_before:
        designs = {"before": before_tree(args.before, out), **designs}

    common = {"progress": "none", "commit_every": 16, "num_cpus": 2,
              "encode_batch_size": args.encode_batch_size,
              "decode_batch_size": args.decode_batch_size,
              "concurrency": {"decode_tasks": 1, "encoder_actors": 1, "torch_threads": 1}}
    workloads = {}
    if "features" in args.workloads:
        feats = make_feature_files(out, max(args.files), args.patches)
        workloads["features"] = ([subset(feats, n, "*.h5") for n in args.files],
                                 {"features": True, "slide_encoder": {"name": "care"}})
    if "pixels" in args.workloads:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_embed import TINY_PATCH_ENCODER, make_slides

        slides = make_slides(out / f"slides_{args.side}", max(args.slides), args.side)
        workloads["pixels"] = ([subset(slides[0].parent, n, "*.tiff") for n in args.slides],
                               {"patch_encoder": {"name": TINY_PATCH_ENCODER},
                                "slide_encoder": {"name": "care_tiny",
                                                  "overrides": {"in_dim": 64}}})
    lines = []
    for name, (sources, extra) in workloads.items():
        print(f"{name}: cohorts of {[len(list(s.iterdir())) for s in sources]}, designs "
              f"alternating, {args.repeats} repeat(s), medians")
        runs: dict[str, list[list[dict]]] = {d: [[] for _ in sources] for d in designs}
        for _ in range(args.repeats):
            for i, src in enumerate(sources):
                for design, code in designs.items():
                    wh = out / f"wh-{name}-{design}-{src.name}-{time.time_ns()}"
                    runs[design][i].append(run(code, {**common, **extra, "source": str(src),
                                                      "warehouse": str(wh)}))
        for design in designs:
            lines.append(report(name, design, [median_run(r) for r in runs[design]]))
    if "speeds" in args.workloads:
        lines += two_speeds(out, args.slides, args.side, common)
    if "manifest" in args.workloads:
        lines += manifest_sizes(designs, out, args.manifest_rows, common)
    print(json.dumps(lines))


def two_speeds(out: Path, sizes: list[int], side: int, common: dict) -> list[dict]:
    """Split the driver's CPU into fixed, per-second, per-tile and per-slide parts (this
    design).

    Cohorts: the two ``sizes`` at ``side`` px, plus ``min(sizes) // 4`` slides at twice the
    side (the same tiles in a quarter of the slides), each through a fast and a slower patch
    encoder (same tiles, different run times), twice: twelve runs, fitted by least squares to
    ``driver CPU = fixed + per_second * streaming wall + per_tile * tiles + per_slide *
    slides``. The slower encoder separates time from tiles; the big slides separate tiles
    from slides; the two sizes separate both from the fixed part."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_embed import TINY_PATCH_ENCODER, make_slides

    slides = make_slides(out / f"slides_{side}", max(sizes), side)
    n_big = max(1, min(sizes) // 4)
    big = make_slides(out / f"slides_{2 * side}", n_big, 2 * side)
    cohorts = [(n, subset(slides[0].parent, n, "*.tiff")) for n in sizes]
    cohorts.append((n_big, subset(big[0].parent, n_big, "*.tiff")))
    runs = []
    for rep in range(2):
        for n, src in cohorts:
            for name, enc, care in (
                    ("fast", TINY_PATCH_ENCODER,
                     {"name": "care_tiny", "overrides": {"in_dim": 64}}),
                    ("slow", "vit_demo_patch16_112", {"name": "care_tiny"})):
                r = run(ROOT, {**common, "source": str(src), "patch_encoder": {"name": enc},
                               "slide_encoder": care,
                               "warehouse": str(out / f"wh-speed-{name}-{time.time_ns()}")})
                if r["failed"]:
                    raise RuntimeError(f"speeds run: {r['failed']} slides failed; a fit over "
                                       "failed slides would measure something else")
                runs.append({"encoder": name, "slides": n, **r})
                print(f"  speeds run {len(runs)}: {n} slides ({src.name}), {name} encoder, "
                      f"{r['tiles']} tiles in {r['stream_wall']:.1f} s streaming, driver "
                      f"{r['cpu']:.3f} CPU-s", flush=True)
    x = np.array([[1.0, r["stream_wall"], r["tiles"], r["slides"]] for r in runs])
    y = np.array([r["cpu"] for r in runs])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    fixed, per_second, per_tile, per_slide = coef
    resid = y - x @ coef
    # The driver's load at a cluster rate R tiles/s of S-tile slides (in cores):
    # per_second + R * (per_tile + per_slide / S).
    tiles_per_slide = 10_000
    # A per-tile term that fits below zero is no per-tile cost within the noise: count it 0.
    load = max(per_tile, 0.0) + per_slide / tiles_per_slide
    ceiling = (1 - per_second) / load if load > 0 else float("inf")
    print(f"  speeds fit over {len(runs)} runs: fixed {fixed:.3f} CPU-s, {per_second * 1000:.1f}"
          f" CPU-ms per second of streaming, {per_tile * 1e6:.1f} CPU-ms per 1k tiles, "
          f"{per_slide * 1000:.1f} CPU-ms per slide (residuals up to "
          f"{abs(resid).max() * 1000:.0f} CPU-ms); with {tiles_per_slide:,}-tile slides at "
          f"50,000 tiles/s the driver would use {per_second + load * 50_000:.2f} of a core; "
          f"one driver keeps up with ~{ceiling:,.0f} tiles/s", flush=True)
    return [{"workload": "speeds", "runs": runs, "fixed_cpu_s": fixed,
             "cpu_ms_per_s": per_second * 1000, "cpu_ms_per_1k_tiles": per_tile * 1e6,
             "cpu_ms_per_slide": per_slide * 1000,
             "max_abs_residual_cpu_s": float(abs(resid).max()),
             "driver_ceiling_tiles_per_s": ceiling}]


def manifest_sizes(designs: dict, out: Path, sizes: list[int], common: dict) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_embed import TINY_PATCH_ENCODER, make_slides

    slide = make_slides(out / "slides_manifest", 1, 2048)[0]
    lines = []
    for n in sizes:
        manifest = out / f"manifest_{n}.csv"
        if not manifest.exists():
            manifest.write_text("uri,slide_id,site\n" + "".join(
                f"{slide},s{i:07d},site{i % 7}\n" for i in range(n)))
        for design, code in designs.items():
            res = run(code, {**common, "source": str(manifest), "patch_encoder": {
                "name": TINY_PATCH_ENCODER}, "slide_encoder": {
                "name": "care_tiny", "overrides": {"in_dim": 64}},
                "warehouse": str(out / f"wh-manifest-{design}-{n}-{time.time_ns()}")},
                child=CHILD_PLAN)
            print(f"  manifest {n:>7} rows {design:6s}: first block at the driver after "
                  f"{res['first_block_s']:.1f} s, driver peak RSS {res['peak_rss_mib']:.0f} MiB",
                  flush=True)
            lines.append({"workload": "manifest", "rows": n, "design": design, **res})
    return lines


if __name__ == "__main__":
    main()
