"""GPU figures with nothing but torch and numpy: patch encoders at paper sizes, CARE at large N,
a few stage-I training steps with CUDA AMP, each checked against CPU fp32.

    python benchmarks/gpu_check.py OUT_DIR [--seconds 5] [--tiny] [--device auto|cuda|cpu]
    benchmarks/gpu_check.sh OUT_DIR            # the same, plus `care-scale bench` where it runs

Made for a GPU machine that has PyTorch with CUDA and none of care-scale's other dependencies
(no Ray, no ONNX Runtime, no TensorRT, no slide libraries, no network). It imports only the
care-scale modules that themselves import nothing beyond torch and numpy (the model modules
and the bench's timing helpers); tests/test_bench.py runs it with an import hook that refuses
everything else, so that stays true.

Measured, on the device (CUDA; on a machine without one, the CPU, said loudly in the output
and the JSON: those are then no GPU figures):
1. patch encoders ViT-B/16 224, ViT-L/16 224 and ViT-L/16 448 (the CONCH v1.5 shape), seeded
   random weights, in fp32 (TF32 off), bf16 and fp16 autocast: tiles/s at batch 64 (best call
   within --seconds), peak memory, and the parity of a few tiles against CPU fp32;
2. CARE (paper size: hidden 512, 8 heads, k = 8, 768-d input) at N = 10k and 50k patches:
   forward seconds and peak memory; the slide embedding at the smaller N against CPU fp32;
3. stage-I steps (student/teacher EMA on two masked views of the patch grid, a DINO-style
   CLS loss, masked-token loss and lambda_RSL * L_RSL, as in the paper), CUDA AMP (fp16
   autocast + GradScaler; bf16 autocast on the CPU): seconds per step, loss finite, peak memory.

Tolerances (min cosine over the compared rows vs CPU fp32): :data:`TOLERANCE`. The JSON
(OUT_DIR/gpu_check.json) holds every figure, the tolerance and pass/fail of each check; the
exit status is 1 when a check fails. ``--tiny``: unit-test sizes for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain checkout, without pip install
    sys.path.insert(0, str(ROOT))

from care_scale.bench.measure import parity, round_grid  # torch/numpy only

#: precision -> min cosine vs CPU fp32 that passes (fp32 with TF32 off is the same maths in
#: another order; fp16 keeps 10 mantissa bits, bf16 7).
TOLERANCE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.99}
PAPER_ENCODERS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_large_patch16_448")
TINY_ENCODERS = ("vit_micro_patch16_64", "vit_demo_patch16_112")
MAX_CALLS = 100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device: torch.device, budget_s: float) -> tuple[float, int]:
    """Best wall seconds of one call (after a warm-up call), calls until ``budget_s``."""
    fn()
    sync(device)
    best, calls, end = float("inf"), 0, time.perf_counter() + budget_s
    while calls < 1 or (time.perf_counter() < end and calls < MAX_CALLS):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best, calls


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16"
                          else torch.float16)


def check(precision: str, stats: dict) -> dict:
    bound = TOLERANCE[precision]
    return {**stats, "min_cosine_bound": bound, "ok": bool(stats["min_cosine"] >= bound)}


def machine(device: torch.device) -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu_model": cpu, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "cuda": torch.version.cuda, "device": str(device),
           "gpu": None, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                      "capability": f"{p.major}.{p.minor}"}
    return out


def patch_encoders(names, device, *, batch: int, ref_tiles: int, budget_s: float) -> list:
    from care_scale.models import create_patch_encoder

    out = []
    for name in names:
        model = create_patch_encoder(name).eval()
        size = model.spec.input_size
        gen = torch.Generator().manual_seed(0)
        tiles = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
        with torch.inference_mode():
            ref = model(tiles[:ref_tiles]).float().numpy()
        model = model.to(device)
        tiles_dev = tiles.to(device)
        for precision in ("fp32", "bf16", "fp16"):
            entry = {"model": name, "input_size": size, "precision": precision,
                     "batch_size": batch, "device": str(device)}
            try:
                def run(precision=precision, model=model, tiles=tiles_dev):
                    with torch.inference_mode(), autocast(device, precision):
                        return model(tiles)

                reset_peak(device)
                best, calls = best_seconds(run, device, budget_s)
                got = run()[:ref_tiles].float().cpu().numpy()
            except RuntimeError as exc:  # e.g. fp16 matmul not implemented on this CPU
                entry["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                out.append(entry)
                continue
            entry.update(tiles_per_s=batch / best, calls=calls, peak_memory_mib=peak_mib(device),
                         parity_vs_cpu_fp32=check(precision, parity(ref, got)))
            out.append(entry)
            print(f"  {name:24s} {precision}  {batch / best:10.1f} tiles/s  min cos "
                  f"{entry['parity_vs_cpu_fp32']['min_cosine']:.5f}", flush=True)
    return out


def care_inputs(n: int, in_dim: int, device: torch.device):
    gen = torch.Generator().manual_seed(n)
    feats = torch.randn(1, n, in_dim, generator=gen)
    grid = torch.from_numpy(round_grid(n))[None]
    return feats.to(device), torch.tensor([n], device=device), grid.to(device)


def care_forward(care_name: str, sizes, device, *, budget_s: float) -> list:
    from care_scale.models import create_slide_encoder

    care = create_slide_encoder(care_name).eval()
    with torch.inference_mode():
        ref = care(*care_inputs(sizes[0], care.config.in_dim, torch.device("cpu")))
    ref = ref.slide_embedding.float().numpy()
    care = care.to(device)
    out = []
    for n in sizes:
        inputs = care_inputs(n, care.config.in_dim, device)

        def run(inputs=inputs):
            with torch.inference_mode():
                return care(*inputs)

        reset_peak(device)
        best, calls = best_seconds(run, device, budget_s)
        entry = {"model": care_name, "n": n, "device": str(device), "seconds": best,
                 "calls": calls, "peak_memory_mib": peak_mib(device)}
        if n == sizes[0]:
            got = run().slide_embedding.float().cpu().numpy()
            entry["parity_vs_cpu_fp32"] = check("fp32", parity(ref, got))
        out.append(entry)
        mem = entry["peak_memory_mib"]
        print(f"  CARE {care_name} N={n:>6}  {best:8.3f} s"
              + (f"  peak {mem:.0f} MiB" if mem is not None else ""), flush=True)
    return out


def stage1_steps(care_name: str, device, *, steps: int, slides: int, patches: int) -> dict:
    """Stage-I pretraining steps (iBOT-style) with AMP, on seeded random patch features."""
    from care_scale.models import create_slide_encoder

    torch.manual_seed(0)
    student = create_slide_encoder(care_name).to(device).train()
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    hidden, k_out = student.config.hidden_dim, 256
    heads = [torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                 torch.nn.Linear(hidden, k_out)).to(device) for _ in range(2)]
    t_heads = [copy.deepcopy(h).requires_grad_(False) for h in heads]
    params = [*student.parameters(), *heads[0].parameters(), *heads[1].parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04)
    use_scaler = device.type == "cuda"
    amp_dtype = torch.float16 if use_scaler else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    grid = torch.from_numpy(round_grid(patches))[None].expand(slides, -1, -1).to(device)
    num_valid = torch.full((slides,), patches, device=device)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(slides, patches, student.config.in_dim, generator=gen).to(device)
    losses, times = [], []
    reset_peak(device)
    for step in range(steps):
        views = [base + 0.1 * torch.randn_like(base) for _ in range(2)]
        mask = torch.rand(slides, patches, device=device) < 0.3
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype):
            with torch.no_grad():
                t_out = [teacher(v, num_valid, grid) for v in views]
                t_cls = [F.softmax(t_heads[0](o.slide_embedding).float() / 0.04, -1)
                         for o in t_out]
                t_tok = F.softmax(t_heads[1](t_out[0].patch_tokens).float() / 0.04, -1)
            s_out = [student(v, num_valid, grid, augmented=views[1 - i],
                             token_mask=mask if i == 0 else None)
                     for i, v in enumerate(views)]
            s_cls = [F.log_softmax(heads[0](o.slide_embedding).float() / 0.1, -1)
                     for o in s_out]
            cls_loss = -((t_cls[1] * s_cls[0]).sum(-1).mean()
                         + (t_cls[0] * s_cls[1]).sum(-1).mean()) / 2
            s_tok = F.log_softmax(heads[1](s_out[0].patch_tokens).float() / 0.1, -1)
            tok_loss = -(t_tok * s_tok).sum(-1)[mask].mean()
            loss = cls_loss + tok_loss + s_out[0].aux_loss.float()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            for src, dst in ((student, teacher), *zip(heads, t_heads, strict=True)):
                for ps, pt in zip(src.parameters(), dst.parameters(), strict=True):
                    pt.mul_(0.996).add_(ps.detach(), alpha=0.004)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    finite = bool(np.isfinite(losses).all())
    steady = times[1:] or times
    print(f"  stage I {care_name}: {steps} steps, {float(np.median(steady)):.3f} s/step "
          f"(median after the first), loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return {"model": care_name, "device": str(device), "amp": str(amp_dtype).split(".")[-1],
            "grad_scaler": use_scaler, "steps": steps, "slides_per_step": slides,
            "patches_per_slide": patches, "first_step_s": times[0],
            "median_step_s": float(np.median(steady)), "losses": losses,
            "peak_memory_mib": peak_mib(device), "ok": finite}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for gpu_check.json")
    ap.add_argument("--seconds", type=float, default=None,
                    help="time budget per timed measurement (default 5; 0.2 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="unit-test sizes (a CPU smoke run)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*UNTRAINED weights")  # the JSON says so
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    note = None
    if not cuda:
        note = ("NO CUDA DEVICE: everything below ran on the CPU; these are NOT GPU figures "
                "(a smoke run of the script only)")
        print(f"gpu_check: {note}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the parity check
    torch.backends.cudnn.allow_tf32 = False
    seconds = args.seconds if args.seconds is not None else (0.2 if args.tiny else 5.0)
    if args.tiny:
        encoders, care_name, sizes = TINY_ENCODERS, "care_tiny", (256, 1024)
        batch, ref_tiles, train = 4, 2, {"steps": 3, "slides": 2, "patches": 64}
    else:
        encoders, care_name, sizes = PAPER_ENCODERS, "care", (10_000, 50_000)
        batch, ref_tiles, train = 64, 4, {"steps": 8, "slides": 16, "patches": 360}
    started = time.perf_counter()
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "note": note, "tiny": args.tiny, "seconds_per_measurement": seconds,
              "machine": machine(device), "tolerance_min_cosine": TOLERANCE,
              "weights": "seeded random (speed and numerics only)"}
    print("patch encoders", flush=True)
    result["patch_encoders"] = patch_encoders(encoders, device, batch=batch,
                                              ref_tiles=ref_tiles, budget_s=seconds)
    print("CARE forward", flush=True)
    result["care_forward"] = care_forward(care_name, sizes, device, budget_s=seconds)
    print("stage I training", flush=True)
    result["stage1_training"] = stage1_steps(care_name, device, **train)
    checks = [e["parity_vs_cpu_fp32"]["ok"] for e in
              [*result["patch_encoders"], *result["care_forward"]] if "parity_vs_cpu_fp32" in e]
    checks.append(result["stage1_training"]["ok"])
    result["all_ok"] = all(checks)
    result["elapsed_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'gpu_check.json'}; all checks {'ok' if result['all_ok'] else 'FAILED'}"
          f"{' (CPU fallback: not GPU figures)' if note else ''}", flush=True)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
