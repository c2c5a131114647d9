"""CARE forward cost on the CPU vs. one global self-attention over all patches.

    python benchmarks/bench_care.py                     # N = 1k, 5k, 20k, 50k, paper-size CARE
    python benchmarks/bench_care.py --sizes 1000,5000 --model care_tiny

Regime: the paper-size encoder (hidden 512, 8 heads, k = 8) on a 2-core CPU is compute-bound,
so wall time tracks FLOPs. Each measurement runs in its own process so the peak resident memory
(ru_maxrss) belongs to that forward pass alone. CARE attends only inside k x k sub-regions and
adaptive regions, so time/N should stay flat; the baseline (same blocks, same width, one
attention over all N patches, what the paper argues against) grows with N. The baseline is not
run where its time, extrapolated quadratically from the largest N measured, exceeds
--max-baseline-seconds, or where the attention matrix it would need without a fused kernel
exceeds --max-baseline-gb; the estimate is printed instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ONE = r"""
import json, resource, sys, time, warnings
import numpy as np, torch
warnings.simplefilter("ignore")
torch.set_num_threads(int(sys.argv[4]))
from care_scale.models import create_slide_encoder
from care_scale.models.care import MaskedBlock

kind, model_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
care = create_slide_encoder(model_name)
cfg = care.config
side = int(np.ceil(np.sqrt(n * 1.3)))
# A roughly round piece of tissue on the patch grid (partially filled windows at the rim).
yy, xx = np.mgrid[0:side, 0:side]
d = (xx - side / 2) ** 2 + (yy - side / 2) ** 2
order = np.argsort(d.ravel(), kind="stable")[:n]
grid = np.stack([xx.ravel()[order], yy.ravel()[order]], 1)
feats = torch.randn(1, n, cfg.in_dim)

class GlobalAttention(torch.nn.Module):
    # Same width, heads and number of blocks as CARE, one attention over all patches.
    def __init__(self):
        super().__init__()
        h = cfg.hidden_dim
        self.proj = torch.nn.Linear(cfg.in_dim, h)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, h))
        self.blocks = torch.nn.ModuleList(
            MaskedBlock(h, cfg.num_heads, cfg.mlp_ratio)
            for _ in range(cfg.subregion_depth + cfg.region_depth))
    def forward(self, x):
        t = torch.cat([self.cls[0], self.proj(x[0])])  # (N + 1, H) flat token list
        ids = torch.arange(t.shape[0])
        index, valid = ids[None], torch.ones(1, t.shape[0], dtype=torch.bool)
        back = (torch.zeros_like(ids), ids)  # one group holding every token
        for b in self.blocks:
            t = b(t, index, valid, back)
        return t[0]

model = care if kind == "care" else GlobalAttention().eval()
with torch.no_grad():  # warm-up: first-call kernel setup is not part of the per-N cost
    w = torch.from_numpy(grid[:256])[None]
    if kind == "care":
        model(feats[:, :256], torch.tensor([min(n, 256)]), w)
    else:
        model(feats[:, :256])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
repeats = 2 if n <= 5000 else 1  # best of two where it is cheap: less scheduler noise
dt = float("inf")
with torch.no_grad():
    for _ in range(repeats):
        t = time.perf_counter()
        if kind == "care":
            out = model(feats, torch.tensor([n]), torch.from_numpy(grid)[None])
            regions = int(out.num_regions[0])
        else:
            out = model(feats)
            regions = 0
        dt = min(dt, time.perf_counter() - t)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_mb": after / 1024, "delta_mb": (after - before) / 1024,
                  "regions": regions}))
"""


def run_one(kind: str, model: str, n: int, threads: int) -> dict:
    res = subprocess.run([sys.executable, "-c", ONE, kind, model, str(n), str(threads)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="care")
    ap.add_argument("--sizes", default="1000,5000,20000,50000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-baseline-seconds", type=float, default=120.0)
    ap.add_argument("--max-baseline-gb", type=float, default=16.0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import warnings

    warnings.simplefilter("ignore")
    from care_scale.models import get_slide_encoder_spec

    cfg = get_slide_encoder_spec(args.model).config
    print(f"CARE '{args.model}' (in {cfg['in_dim']}, hidden {cfg['hidden_dim']}, "
          f"{cfg['num_heads']} heads, k={cfg['subregion_size']}) on CPU, "
          f"{args.threads} threads; regime: compute-bound forward, batch of one slide")
    header = (f"{'N':>7} | {'CARE s':>8} {'us/patch':>9} {'peak MB':>8} {'regions':>7} | "
              f"{'global s':>9} {'us/patch':>9} {'peak MB':>8} | {'global/CARE':>11}")
    print(header)
    print("-" * len(header))
    last_baseline: tuple[int, float] | None = None
    t_start = time.time()
    for n in sizes:
        c = run_one("care", args.model, n, args.threads)
        if "error" in c:
            print(f"{n:>7} | CARE failed: {c['error']}")
            continue
        care_cols = (f"{c['seconds']:>8.2f} {c['seconds'] / n * 1e6:>9.1f} "
                     f"{c['peak_mb']:>8.0f} {c['regions']:>7}")
        # Decide whether to run the quadratic baseline at this N.
        heads = cfg["num_heads"]
        attn_gb = (n + 1) ** 2 * heads * 4 / 1e9  # scores matrix of an unfused kernel
        est_s = None if last_baseline is None else last_baseline[1] * (n / last_baseline[0]) ** 2
        if est_s is not None and est_s > args.max_baseline_seconds:
            print(f"{n:>7} | {care_cols} | not run: estimated {est_s:,.0f} s "
                  f"(quadratic from N={last_baseline[0]}), ~{est_s / c['seconds']:,.0f}x CARE")
            continue
        if attn_gb > args.max_baseline_gb:
            print(f"{n:>7} | {care_cols} | not run: an unfused attention matrix would need "
                  f"{attn_gb:,.0f} GB")
            continue
        b = run_one("global", args.model, n, args.threads)
        if "error" in b:
            print(f"{n:>7} | {care_cols} | baseline failed: {b['error']}")
            continue
        last_baseline = (n, b["seconds"])
        print(f"{n:>7} | {care_cols} | {b['seconds']:>9.2f} {b['seconds'] / n * 1e6:>9.1f} "
              f"{b['peak_mb']:>8.0f} | {b['seconds'] / c['seconds']:>10.1f}x")
    print(f"(total {time.time() - t_start:.0f} s; peak MB = process max RSS incl. ~300 MB of "
          "torch runtime and the input features)")


if __name__ == "__main__":
    main()
