"""How ``care-scale bench`` keeps to ``--seconds``: the budget covers the whole run (model
builds, ONNX exports and int8 quantisation included), not only the timed calls.

- Stages: decode, patch encoder and CARE each end at a cumulative share of the budget
  (:data:`STAGE_SHARES`); a stage that starts late (the ones before it overran) still gets its
  own share, so every stage measures something.
- Patch encoder, CPU default: without ``--patch-encoder`` on a machine without CUDA, the
  largest of :data:`CPU_ENCODER_LADDER` whose fp32 build and three calls fit the stage, from
  its FLOPs and a matmul probe of this node (:func:`default_cpu_encoder`).
- Entries: every backend x precision after the fp32 reference is skipped with a reason that
  starts with ``budget`` when its build (estimated from the measured fp32 torch build and
  call, then from the builds measured so far: :class:`BuildEstimate`) and two calls would not
  fit what is left of the stage.
- CARE sizes: skipped for ``memory`` when the peak, extrapolated from the smaller sizes'
  measured peaks, would exceed the memory available; for ``budget`` when one forward,
  extrapolated from the last size's time, would not fit. Each size is measured with one call
  (time and peak), and with more only where they fit.

Pure arithmetic and two small probes (a matmul, /proc/meminfo); no model is built here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Cumulative share of ``--seconds`` at which each stage ends, in run order.
STAGE_SHARES = {"decode": 0.25, "patch_encoder": 0.45, "care": 0.30}

#: CPU default patch encoders, smallest first (``--patch-encoder`` overrides).
CPU_ENCODER_LADDER = ("vit_micro_patch16_64", "vit_demo_patch16_112", "vit_tiny_patch16_224",
                      "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")

#: Seconds to build (seeded random init) one million encoder parameters, and the share of the
#: matmul probe's GFLOP/s an fp32 eager ViT forward reaches: measured on a 2-core AMD EPYC
#: (avx2, avx512f, avx512_vnni, avx512_bf16; no AMX), ViT-T/S 224 (0.18-0.26 s per M params).
BUILD_S_PER_MPARAM = 0.25
FORWARD_EFFICIENCY = 0.5

#: Build cost of a backend = factor x (fp32 torch build + one call) + fixed seconds. Measured
#: on the same CPU: ONNX export of ViT-micro/demo/T/S 1.5-1.7x (plus ~2 s of exporter start-up
#: on the smallest); TensorRT is a guess (engine builds take minutes; none was timed here).
BUILD_FACTORS: dict[str, tuple[float, float]] = {
    "torch": (0.0, 0.0), "onnxruntime": (2.0, 2.0), "tensorrt": (20.0, 30.0)}
#: int8 (export + dynamic quantisation) over the fp32 ONNX build: 0.8-2.8x measured there.
INT8_OVER_FP32 = 3.0

#: Largest share of the available memory a CARE size may be estimated to need.
MEMORY_FRACTION = 0.8


@dataclass(frozen=True)
class Stage:
    """One stage's clock: it may run until ``end`` (perf_counter seconds)."""

    name: str
    end: float

    def left(self) -> float:
        return self.end - time.perf_counter()


@dataclass
class Budget:
    """``--seconds`` for the whole run, from ``start``."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def stage(self, name: str) -> Stage:
        """The clock of stage ``name``: until its cumulative deadline, but never less than
        its own share from now."""
        names = list(STAGE_SHARES)
        upto = sum(STAGE_SHARES[n] for n in names[: names.index(name) + 1])
        now = time.perf_counter()
        return Stage(name, max(self.start + upto * self.seconds,
                               now + STAGE_SHARES[name] * self.seconds))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------ patch encoder


def vit_cost(spec: Any) -> tuple[float, float]:
    """(GFLOP per tile, million parameters) of a registry ViT spec (blocks only)."""
    tokens = (spec.input_size // spec.patch_size) ** 2 + 1 + getattr(spec, "reg_tokens", 0)
    per_block = (4 + 2 * spec.mlp_ratio) * spec.width**2
    macs = spec.depth * (per_block * tokens + 2 * tokens**2 * spec.width)
    return 2 * macs / 1e9, spec.depth * per_block / 1e6


def node_gflops(seconds: float = 0.2) -> float:
    """fp32 GFLOP/s of 512 x 512 matmuls with torch's threads on this node."""
    import torch

    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    a @ b
    calls, t0 = 0, time.perf_counter()
    while calls < 1000 and (calls < 3 or time.perf_counter() - t0 < seconds):
        a @ b
        calls += 1
    return 2 * 512**3 * calls / (time.perf_counter() - t0) / 1e9


def encoder_estimate(spec: Any, batch: int, gflops: float) -> tuple[float, float]:
    """(build seconds, seconds per call of ``batch`` tiles) of an fp32 torch encoder."""
    gflop, mparams = vit_cost(spec)
    return mparams * BUILD_S_PER_MPARAM, batch * gflop / (gflops * FORWARD_EFFICIENCY)


def default_cpu_encoder(stage_s: float, batch: int, gflops: float) -> tuple[str, str]:
    """(name, why): the largest ladder encoder whose build and three calls fit ``stage_s``."""
    from care_scale.models import get_patch_encoder_spec

    chosen, cost = CPU_ENCODER_LADDER[0], None
    for name in CPU_ENCODER_LADDER:
        build, call = encoder_estimate(get_patch_encoder_spec(name), batch, gflops)
        if name != CPU_ENCODER_LADDER[0] and build + 3 * call > stage_s:
            break
        chosen, cost = name, build + 3 * call
    return chosen, (f"CPU default: the largest of {', '.join(CPU_ENCODER_LADDER)} whose fp32 "
                    f"build and 3 calls (about {cost:.1f} s at {gflops:.0f} GFLOP/s measured) "
                    f"fit the {stage_s:.1f} s patch-encoder share of --seconds")


@dataclass
class BuildEstimate:
    """Build seconds of each backend x precision, from the fp32 torch encoder's measured build
    and call, corrected by the builds measured so far."""

    torch_build_s: float
    call_s: float = 0.0
    measured: dict[tuple[str, str], float] = field(default_factory=dict)

    def seconds(self, backend: str, precision: str) -> float:
        if (backend, precision) in self.measured:
            return self.measured[backend, precision]
        if backend == "onnxruntime" and precision == "int8":
            return INT8_OVER_FP32 * self.seconds("onnxruntime", "fp32")
        factor, fixed = BUILD_FACTORS.get(backend, BUILD_FACTORS["tensorrt"])
        return factor * (self.torch_build_s + self.call_s) + fixed

    def record(self, backend: str, precision: str, seconds: float) -> None:
        self.measured[backend, precision] = seconds

    def skip(self, backend: str, precision: str, left_s: float) -> str | None:
        """Why building and timing this entry does not fit ``left_s`` (None: it fits)."""
        build = self.seconds(backend, precision)
        need = build + 2 * self.call_s
        if need <= left_s:
            return None
        source = ("measured" if (backend, precision) in self.measured else
                  f"estimated from the {self.torch_build_s:.1f} s fp32 torch build")
        return (f"budget: about {need:.1f} s to build and time ({build:.1f} s build, "
                f"{source}; {self.call_s:.2f} s a call), {max(left_s, 0):.1f} s of --seconds "
                "left for the patch encoder")


# ---------------------------------------------------------------------------------- CARE


def available_memory_mib(device: str) -> float | None:
    """Free memory for CARE: CUDA's free device memory, else MemAvailable (None: unknown)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0] / 2**20
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def extrapolate_peak(points: list[tuple[int, float]], n: int) -> float | None:
    """Peak MiB at ``n`` patches from measured (n, peak) points: the larger of the line
    through the last two and proportional scaling of the last (None without points)."""
    if not points:
        return None
    n2, p2 = points[-1]
    estimate = p2 * n / n2
    if len(points) >= 2:
        n1, p1 = points[-2]
        if n2 != n1:
            estimate = max(estimate, p2 + (n - n2) * (p2 - p1) / (n2 - n1))
    return estimate


def care_skip(n: int, *, peak_mib: float | None, available_mib: float | None,
              call_s: float | None, left_s: float, measured_from: int | None) -> str | None:
    """Why CARE at ``n`` patches is not measured (None: it is): memory first, then time."""
    if peak_mib is not None and available_mib is not None and \
            peak_mib > MEMORY_FRACTION * available_mib:
        return (f"memory: about {peak_mib:,.0f} MiB at N={n:,} (extrapolated from the "
                f"measured peaks), {available_mib:,.0f} MiB available")
    if call_s is not None and call_s > left_s:
        return (f"budget: about {call_s:.1f} s per forward (linear from N={measured_from:,}), "
                f"{max(left_s, 0):.1f} s of --seconds left (a larger --seconds runs it)")
    return None


__all__ = ["BUILD_FACTORS", "CPU_ENCODER_LADDER", "INT8_OVER_FP32", "MEMORY_FRACTION",
           "STAGE_SHARES", "Budget", "BuildEstimate", "Stage", "available_memory_mib",
           "care_skip", "default_cpu_encoder", "encoder_estimate", "extrapolate_peak",
           "node_gflops", "vit_cost"]
