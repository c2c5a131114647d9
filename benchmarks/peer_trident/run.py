"""care-scale and TRIDENT side by side: same slides, same random timm model, alternating.

    bash benchmarks/peer_trident/install.sh          # once: TRIDENT in $PEER_VENV
    python benchmarks/peer_trident/run.py [--slides 2] [--side 4096] [--repeats 3]
        [--model vit_tiny_patch16_224] [--precision fp32] [--venv /tmp/peer-trident-venv]
        [--warmup 1]

Both sides run as commands, timed from spawn to exit (end to end, imports and start-up
included), on the same generated 20x slides (0.5 um/px, pyramidal JPEG TIFF), 512 px tiles
at 20x, with TRIDENT's tiling (care-scale ``tiling: trident``: TRIDENT's grid, Otsu mask and
keep rule) so the tile sets are meant to match:

- care-scale: ``python -m care_scale embed`` with ``patch_encoder.name=MODEL`` (its seeded
  random build), ``keep_patches``, a fresh local warehouse per run, care_tiny as the slide
  encoder (``in_dim`` set to the model's width; CARE's cost is noise here).
- TRIDENT: ``trident_side.py`` in TRIDENT's venv: ``segment_tissue`` (Otsu),
  ``extract_tissue_coords`` (20x, 512 px), ``extract_patch_features`` with the same weights
  as a timm model through ``CustomInferenceEncoder``, fp32, batch 32.

Prints each run, the medians, per-pair ratios (TRIDENT seconds / care-scale seconds: > 1 means
care-scale is faster; care-scale / TRIDENT peak PSS of the whole process tree), the load
average around each run and the CPU's flags; then compares the tile sets of the last pair
slide by slide (level-0 x, y). Asserts nothing.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fixed_cost import TreeSampler, cpu_line, load_line


def timed(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float,
                                                            float]:
    """Run ``cmd`` to its end: the result, its seconds from spawn to exit, and the peak PSS
    (MiB) of its whole process tree (the driver, Ray's processes and workers; sampled every
    0.25 s through /proc, as ``bench_fixed_cost.py --processes`` does)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=3600)
    finally:
        sampler.done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    seconds = time.time() - t0
    return (subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds,
            sampler.result()["peak_pss_mib"])


def make_inputs(tmp: Path, n: int, side: int, model: str) -> tuple[Path, Path, dict]:
    """The slides, our random weights as a timm state dict, and the model's preprocessing."""
    import torch

    from care_scale.models import create_patch_encoder
    from care_scale.synthetic import write_synthetic_slide

    slides = tmp / "slides"
    slides.mkdir()
    for i in range(n):
        write_synthetic_slide(slides / f"slide_{i}.tiff", width=side, height=side, mpp=0.5,
                              seed=i)
    enc = create_patch_encoder(model)
    weights = tmp / "weights.pt"
    torch.save(enc.state_dict(), weights)
    spec = enc.spec
    # The same architecture in timm, for the names timm does not have (vit_micro, vit_demo):
    # its ViT with our spec's sizes (the state dicts share timm's layout).
    timm_kwargs = {"img_size": spec.input_size, "patch_size": spec.patch_size,
                   "embed_dim": spec.width, "depth": spec.depth, "num_heads": spec.num_heads}
    return slides, weights, {"input_size": spec.input_size, "mean": list(spec.mean),
                             "std": list(spec.std), "width": spec.embed_dim,
                             "timm_kwargs": timm_kwargs}


def run_ours(slides: Path, work: Path, model: str, width: int, precision: str) -> dict:
    wh = work / "ours-wh"
    shutil.rmtree(wh, ignore_errors=True)
    cmd = [sys.executable, "-m", "care_scale", "embed", str(slides), "--warehouse", str(wh),
           "--keep-patches", "--precision", precision, "--set", "progress=none",
           "--set", f"patch_encoder.name={model}", "--set", "tiling=trident",
           "--set", "patch_size=512", "--set", "target_mpp=0.5",
           "--set", f"slide_encoder.overrides.in_dim={width}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    proc, seconds, peak = timed(cmd, env)
    if proc.returncode != 0:
        raise SystemExit(f"care-scale failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from deltalake import DeltaTable

    patches = DeltaTable(str(wh / "patches")).to_pyarrow_table(columns=["slide_id", "x", "y"])
    tiles = {}
    for sid, x, y in zip(*(patches.column(c).to_pylist() for c in ("slide_id", "x", "y"))):
        tiles.setdefault(sid, set()).add((x, y))
    # The precision the run used (what `auto` picked): the patch encoder version's suffix.
    versions = set(DeltaTable(str(wh / "slides")).to_pyarrow_table(
        columns=["patch_encoder_version"]).column(0).to_pylist())
    used = sorted({v.rsplit("+", 1)[1] if "+" in v else "fp32" for v in versions})
    return {"seconds": seconds, "tiles": sum(len(t) for t in tiles.values()), "sets": tiles,
            "peak_mib": peak, "precision": ",".join(used)}


def run_trident(venv: Path, slides: Path, work: Path, model: str, weights: Path,
                prep: dict) -> dict:
    job = work / "trident-job"
    shutil.rmtree(job, ignore_errors=True)
    cmd = [str(venv / "bin" / "python"), str(Path(__file__).with_name("trident_side.py")),
           "--slides", str(slides), "--job", str(job), "--model", model,
           "--weights", str(weights), "--input-size", str(prep["input_size"]),
           "--mean", *map(str, prep["mean"]), "--std", *map(str, prep["std"]),
           "--timm-kwargs", json.dumps(prep["timm_kwargs"])]
    proc, seconds, peak = timed(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"TRIDENT failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import h5py

    sets = {}
    for sid, path in out["coords"].items():
        with h5py.File(path, "r") as fh:
            sets[sid] = {(int(x), int(y)) for x, y in fh["coords"][:]}
    return {"seconds": seconds, "tiles": out["tiles"], "sets": sets, "peak_mib": peak}


def compare_tiles(ours: dict, theirs: dict) -> None:
    print("\ntile sets (level-0 x, y), care-scale vs TRIDENT:")
    for sid in sorted(set(ours) | set(theirs)):
        a, b = ours.get(sid, set()), theirs.get(sid, set())
        verdict = "EQUAL" if a == b else f"only ours {len(a - b)}, only TRIDENT's {len(b - a)}"
        print(f"  {sid}: {len(a)} vs {len(b)} tiles: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--precision", default="fp32", help="care-scale's (TRIDENT runs fp32)")
    ap.add_argument("--venv", default=os.environ.get("PEER_VENV", "/tmp/peer-trident-venv"))
    ap.add_argument("--warmup", type=int, default=1,
                    help="uncounted runs per side first (care-scale's export and model-facts "
                         "caches, both sides' page cache)")
    args = ap.parse_args()
    venv = Path(args.venv)
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"{venv}: no TRIDENT venv; run benchmarks/peer_trident/install.sh")
    print(f"CPU: {cpu_line()}\nstart: {load_line()}")
    with tempfile.TemporaryDirectory(prefix="peer-trident-") as tmp:
        tmp = Path(tmp)
        slides, weights, prep = make_inputs(tmp, args.slides, args.side, args.model)
        sides = {
            "care-scale": lambda: run_ours(slides, tmp, args.model, prep["width"],
                                           args.precision),
            "TRIDENT": lambda: run_trident(venv, slides, tmp, args.model, weights, prep),
        }
        for _ in range(args.warmup):
            for name, run in sides.items():
                r = run()
                print(f"  warm-up {name:<10} {r['seconds']:7.2f} s (not counted)", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for i in range(args.repeats):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for name in order:
                r = sides[name]()
                runs[name].append(r)
                print(f"  pair {i + 1} {name:<10} {r['seconds']:7.2f} s  {r['tiles']} tiles  "
                      f"{r.get('precision', 'fp32'):>5}  peak PSS {r['peak_mib']:6.0f} MiB  "
                      f"[{load_line()}]", flush=True)
        print(f"\nmedians over {args.repeats} runs ({args.slides} slides of {args.side}^2, "
              f"{args.model}, care-scale precision {args.precision}, TRIDENT fp32):")
        for name, rs in runs.items():
            secs = statistics.median(r["seconds"] for r in rs)
            peak = statistics.median(r["peak_mib"] for r in rs)
            print(f"  {name:<10} {secs:7.2f} s  {rs[0]['tiles'] / secs:7.2f} tiles/s  "
                  f"peak PSS {peak:6.0f} MiB (process tree)")
        ratios = [t["seconds"] / o["seconds"] for o, t in zip(runs["care-scale"],
                                                                runs["TRIDENT"])]
        print(f"per-pair TRIDENT/care-scale seconds: {' '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f}x)")
        mem = [o["peak_mib"] / t["peak_mib"] for o, t in zip(runs["care-scale"],
                                                              runs["TRIDENT"])]
        print(f"per-pair care-scale/TRIDENT peak PSS: {' '.join(f'{r:.2f}' for r in mem)} "
              f"(median {statistics.median(mem):.2f}x; < 1 means care-scale uses less)")
        compare_tiles(runs["care-scale"][-1]["sets"], runs["TRIDENT"][-1]["sets"])
    print(f"\nend: {load_line()}; CPU: {cpu_line()}")


if __name__ == "__main__":
    main()
