"""What ``--overlays`` adds to the embedding job, side by side in one run.

    python benchmarks/bench_overlays.py [--slides 4] [--side 4096] [--repeats 2]

(a) the job twice on the same generated cohort and the same local Ray cluster, overlays off
    and on, alternating ``--repeats`` times, each run into a fresh warehouse; the medians of
    the wall times give the added seconds per slide and the ratio;
(b) the workers' share alone, in this process, on one slide of the cohort: the decode task's
    (thumbnail JPEG + tissue GeoJSON) and the slide-stage actor's (read them back, the
    regions' shapes, two pictures, PNG encoding, GeoJSON), median of 5.

Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def cpu_info() -> str:
    import os

    with open("/proc/cpuinfo") as fh:
        name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                    "unknown CPU")
    return f"{name}, {os.cpu_count()} cores"


def job_seconds(cohort: Path, wh: Path, overlays: bool) -> tuple[float, int]:
    from care_scale.config import load_config
    from care_scale.embed import EmbedConfig, run_embedding

    cfg = load_config(EmbedConfig, None, {
        "source": str(cohort), "warehouse": str(wh), "overlays": overlays, "progress": "none",
        "concurrency": {"decode_tasks": 1, "encoder_actors": 1}})
    t0 = time.perf_counter()
    summary = run_embedding(cfg)
    return time.perf_counter() - t0, summary.tiles


def worker_share(slide_path: Path, wh: Path, slide_id: str) -> tuple[float, float]:
    """Median seconds of the decode task's and the actor's overlay work on one slide."""
    from care_scale.overlays.files import finish_from_folder, write_tissue
    from care_scale.overlays.show import slide_rows
    from care_scale.slides import open_slide
    from care_scale.tiling import tile_grid
    from care_scale.warehouse import Warehouse

    slide_row, regions, _ = slide_rows(Warehouse(str(wh)), slide_id, None)
    out = wh.parent / "bench-folder"
    decode, actor = [], []
    with open_slide(str(slide_path)) as slide:
        grid = tile_grid(slide, target_mpp=0.5, patch_size=224)  # reads the 1024 px thumbnail
        for _ in range(5):
            t0 = time.perf_counter()
            write_tissue(str(out), slide_id, slide.thumbnail(1024), grid.tissue.contours, None)
            t1 = time.perf_counter()
            finish_from_folder(str(out), slide_row, regions, None)
            t2 = time.perf_counter()
            decode.append(t1 - t0)
            actor.append(t2 - t1)
    return statistics.median(decode), statistics.median(actor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from care_scale.local_ray import init_local
    from care_scale.synthetic import write_synthetic_slide

    root = Path(tempfile.mkdtemp(prefix="bench-overlays-"))
    cohort = root / "cohort"
    for i in range(args.slides):
        write_synthetic_slide(cohort / f"slide_{i:03d}.tif", width=args.side,
                              height=args.side * 3 // 4, mpp=0.5, seed=i)
    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False,
               runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    import ray  # after the local cluster set its loopback switch

    try:
        job_seconds(cohort, root / "warm", False)  # warm-up: actors' imports, the export
        times: dict[bool, list[float]] = {False: [], True: []}
        tiles = 0
        for r in range(args.repeats):
            for on in (False, True) if r % 2 == 0 else (True, False):
                s, tiles = job_seconds(cohort, root / f"wh-{r}-{int(on)}", on)
                times[on].append(s)
                print(f"repeat {r}: overlays {'on ' if on else 'off'} {s:7.2f} s")
        off, on = statistics.median(times[False]), statistics.median(times[True])
        decode, actor = worker_share(cohort / "slide_000.tif", root / "wh-0-1", "slide_000")
    finally:
        ray.shutdown()
    n = args.slides
    print(f"\nCPU: {cpu_info()}; {n} slides of {args.side} x {args.side * 3 // 4} px, "
          f"{tiles} tiles, {args.repeats} repeats (medians)")
    print(f"(a) job: off {off:.2f} s, on {on:.2f} s: ratio {on / off:.3f}, "
          f"+{(on - off) / n:.3f} s per slide")
    print(f"(b) per slide in the workers: decode task {decode * 1000:.0f} ms, slide-stage "
          f"actor {actor * 1000:.0f} ms")


if __name__ == "__main__":
    main()
