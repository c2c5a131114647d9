"""Patch-encoder throughput and CARE forward time: torch vs ONNX Runtime, side by side.

    python benchmarks/bench_export.py                      # tiny + ViT-B/16, CARE at N=5000
    python benchmarks/bench_export.py --models vit_tiny_patch16_224 --rounds 3 --skip-care

Regime: this is the CPU, compute-bound regime (a real-size encoder on 2 cores); on a GPU node
with the tiny encoder, decode and I/O dominate and these ratios matter less. Variants are run
round-robin (one batch each per round, best of rounds) so that load from other processes
on the shared machine hits every variant alike. Prints, never asserts.

Variants (ratios against "torch eager" = the module under ``torch.no_grad``):
  torch inference_mode            the torch backend's default
  + channels_last                 NHWC weights for the patch-embedding conv
  + bf16 autocast                 CPU autocast to bfloat16 (AVX-512 BF16 / AMX CPUs)
  onnxruntime                     the onnxruntime backend as shipped (full optimisation,
                                  intra-op threads = cores, 1 inter-op thread, no spinning)
  onnxruntime spinning            same with spin-waiting threads (idle machines only)
  onnxruntime int8 dynamic        MatMul weights int8 per channel, 7-bit (any CPU), with its
                                  error
    int8, 8-bit weights           full-range weights (CPUs with VNNI / AMX-INT8 only)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def timed_rounds(fns: dict, rounds: int, settle: float = 0.5) -> dict[str, float]:
    """Best-of-``rounds`` seconds per call of each function, run round-robin after a warm-up.

    Best-of (as ``timeit`` does) because interference from other processes only ever adds
    time. ``settle`` seconds of sleep before each call let the previous variant's thread pool
    (OpenMP or ONNX Runtime spin-waiting) go idle so it does not steal cores from the next.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)))


def quantize_int8(src: Path, dst: Path, weight_bits: int = 7) -> Path:
    """The int8 variant exactly as ``care-scale export --int8 [--int8-weights 8]`` makes it."""
    from care_scale.export.onnx_export import quantize_patch_onnx

    return quantize_patch_onnx(src, dst, weight_bits=weight_bits).path


def bench_patch(name: str, batch: int, rounds: int, cache: Path, threads: int) -> None:
    from care_scale.artifacts import ONNX_FILE
    from care_scale.export import cached_export, create_patch_backend
    from care_scale.inference.onnx_backend import OnnxPatchBackend
    from care_scale.models import create_patch_encoder

    encoder = create_patch_encoder(name)
    size = encoder.spec.input_size
    tiles = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(tiles)

    def eager():
        with torch.no_grad():
            return encoder(x).numpy()

    t_inf = create_patch_backend("torch", encoder)
    t_cl = create_patch_backend("torch", create_patch_encoder(name), channels_last=True)
    t_bf = create_patch_backend("torch", create_patch_encoder(name), precision="bf16")
    onnx_path = cached_export(encoder, cache_dir=cache) / ONNX_FILE
    ort = OnnxPatchBackend(onnx_path, threads=threads)
    ort_spin = OnnxPatchBackend(onnx_path, spinning=True, threads=threads)
    q_path = quantize_int8(onnx_path, onnx_path.with_name("model.int8.onnx"))
    ort_q = OnnxPatchBackend(q_path, threads=threads)
    from care_scale.inference.precision import int8_weight_bits

    # 8-bit weights: only where this CPU has VNNI / AMX-INT8 (they refuse to load elsewhere)
    ort_q8 = (OnnxPatchBackend(quantize_int8(onnx_path, onnx_path.with_name("model.int8w8.onnx"),
                                             8), threads=threads)
              if int8_weight_bits() == 8 else None)

    variants = {
        "torch eager": eager,
        "torch inference_mode": lambda: t_inf(tiles),
        "  + channels_last": lambda: t_cl(tiles),
        "  + bf16 autocast": lambda: t_bf(tiles),
        "onnxruntime": lambda: ort(tiles),
        "onnxruntime spinning": lambda: ort_spin(tiles),
        "onnxruntime int8 dynamic": lambda: ort_q(tiles),
        **({"  int8, 8-bit weights": lambda: ort_q8(tiles)} if ort_q8 else {}),
    }
    ref = eager()
    errors = {k: rel_err(np.asarray(fn(), dtype=np.float32), ref) for k, fn in variants.items()}
    med = timed_rounds(variants, rounds)
    base = med["torch eager"]
    print(f"\n{name}: batch {batch} of {size}px uint8 tiles, {rounds} rounds, "
          f"{torch.get_num_threads()} torch threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"  {'variant':<28}{'tiles/s':>10}{'vs eager':>10}{'max rel err':>14}")
    for k, t in med.items():
        print(f"  {k:<28}{batch / t:>10.2f}{base / t:>9.2f}x{errors[k]:>14.1e}")


def bench_care(n: int, rounds: int, cache: Path, threads: int) -> None:
    from care_scale.export import create_slide_backend
    from care_scale.export.parity import random_slide
    from care_scale.models import create_slide_encoder

    care = create_slide_encoder("care")
    feats, grid = random_slide(n, care.config.in_dim, seed=0)
    t = create_slide_backend("torch", care)
    o = create_slide_backend("onnxruntime", care, cache_dir=cache, threads=threads)
    ref, got = t.run_grid(feats, grid), o.run_grid(feats, grid)
    same = bool(np.array_equal(ref["region_of_patch"], got["region_of_patch"]))
    err = rel_err(got["slide_embedding"][None], ref["slide_embedding"][None])
    med = timed_rounds({"torch": lambda: t.run_grid(feats, grid),
                        "onnxruntime": lambda: o.run_grid(feats, grid)}, rounds)
    print(f"\nCARE (paper config, {care.config.in_dim}->{care.config.hidden_dim}) forward, "
          f"N={n} patches, {int(ref['num_regions'])} regions, {rounds} rounds")
    print(f"  torch        {med['torch'] * 1e3:9.1f} ms")
    print(f"  onnxruntime  {med['onnxruntime'] * 1e3:9.1f} ms   "
          f"{med['torch'] / med['onnxruntime']:.2f}x vs torch; identical assignments: {same}; "
          f"slide embedding rel err {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batch", default="32,8",
                    help="batch size per model (comma list, last one repeats)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--care-n", type=int, default=5000)
    ap.add_argument("--skip-care", action="store_true")
    ap.add_argument("--cache", help="export cache dir (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads and ONNX Runtime intra-op threads (default 2); 1 is "
                         "steadier when other processes load the cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="bench-export-"))
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batch.split(",")]
    print(f"care-scale export benchmark: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start (other processes share these cores)")
    for i, name in enumerate(models):
        bench_patch(name, batches[min(i, len(batches) - 1)], args.rounds, cache, args.threads)
    if not args.skip_care:
        bench_care(args.care_n, args.rounds, cache, args.threads)


if __name__ == "__main__":
    main()
