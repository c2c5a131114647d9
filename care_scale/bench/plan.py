"""A cohort plan from measured rates: pure arithmetic, no measurement and no heavy import.

The formula (docs/runbook.md, "Sizing", says the same with its assumptions):

    T = slides x tiles_per_slide                                   tiles in the cohort
    GPU cluster (G = nodes x gpus_per_node, C = nodes x cpus_per_node):
      decode      R_dec = d x C                 d: decode tiles/s per CPU core
      encoder     R_enc = e_gpu x G             e_gpu: patch-encoder tiles/s per GPU
      CARE        R_care = G / c_gpu            c_gpu: CARE GPU-seconds per patch
      the GPUs run encoder and CARE in turn:  R_gpu = G / (1/e_gpu + c_gpu)
      rate = min(R_dec, R_gpu); wall = T / rate; GPU-hours = wall x G / 3600
    CPU-only cluster: every core decodes, encodes and runs CARE in turn (core-seconds per
    tile 1/d + 1/e_core + c_core), rate = C / (1/d + 1/e_core + c_core).

Rates come from one bench result (:func:`rates_from_bench`), i.e. one machine; the plan states
which, and a GPU plan from a bench that saw no GPU is refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from care_scale.exceptions import ConfigError
from care_scale.inference.precision import MIN_COSINE  # the bound of ``precision: auto``


@dataclass(frozen=True)
class Alternative:
    """A faster backend/precision measured on the same device, within the parity bound;
    ``tiles_per_s`` per unit (per GPU, or per CPU core), like the rates it replaces."""

    label: str
    tiles_per_s: float
    min_cosine: float


@dataclass(frozen=True)
class Rates:
    """Per-unit rates of one machine (the bench's ``hardware`` record names it)."""

    machine: str
    decode_tiles_per_s_per_core: float
    decode_backend: str
    encoder_tiles_per_s_per_cpu_core: float
    encoder_cpu: str
    care_core_s_per_patch: float
    encoder_tiles_per_s_per_gpu: float | None = None
    encoder_gpu: str | None = None
    care_gpu_s_per_patch: float | None = None
    cpu_alternatives: tuple[Alternative, ...] = field(default_factory=tuple)
    gpu_alternatives: tuple[Alternative, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("decode_tiles_per_s_per_core", "encoder_tiles_per_s_per_cpu_core"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rates: {name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ClusterShape:
    nodes: int
    gpus_per_node: int
    cpus_per_node: int

    def __post_init__(self):
        if self.nodes < 1 or self.cpus_per_node < 1 or self.gpus_per_node < 0:
            raise ConfigError(f"cluster: need nodes >= 1, cpus_per_node >= 1, gpus_per_node "
                              f">= 0, got {self.nodes}, {self.cpus_per_node}, "
                              f"{self.gpus_per_node}")


def _label(entry: dict[str, Any]) -> str:
    return f"{entry['backend']} {entry['device']} {entry['precision']} ({entry['mode']})"


def _measured(entries: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["device"] == device and e.get("tiles_per_s")]


def _care_s_per_patch(entries: list[dict[str, Any]], device: str) -> float | None:
    """Seconds per patch at the largest N measured on ``device`` (CARE's cost is linear in N:
    it attends inside windows and regions, never over the whole slide)."""
    done = [e for e in entries if e["device"] == device and e.get("seconds")]
    if not done:
        return None
    big = max(done, key=lambda e: e["n"])
    return big["seconds"] / big["n"]


def _alternatives(entries: list[dict[str, Any]], base_rate: float, units: int = 1
                  ) -> tuple[Alternative, ...]:
    alts = [Alternative(_label(e), e["tiles_per_s"] / units, e["min_cosine"]) for e in entries
            if e["precision"] != "fp32" and e["tiles_per_s"] > base_rate
            and (e.get("min_cosine") or 0.0) >= MIN_COSINE]
    return tuple(sorted(alts, key=lambda a: -a.tiles_per_s))


def rates_from_bench(result: dict[str, Any]) -> Rates:
    """The plan's rates from one ``care-scale bench`` result: fastest decode backend per core,
    fastest fp32 encoder per CPU core and per GPU, CARE seconds per patch at the largest N."""
    from care_scale.bench.hardware import describe

    try:
        hw, cores = result["hardware"], int(result["hardware"]["cores"])
        decode = [e for e in result["decode"] if e.get("tiles_per_s_per_core")]
        entries = result["patch_encoder"]["entries"]
        care = result["slide_encoder"]["entries"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"not a care-scale bench result (missing {exc})") from None
    if not decode:
        raise ConfigError("the bench result has no decode rate (no slide backend ran)")
    best_decode = max(decode, key=lambda e: e["tiles_per_s_per_core"])
    cpu = [e for e in _measured(entries, "cpu") if e["precision"] == "fp32"]
    if not cpu:
        raise ConfigError("the bench result has no CPU fp32 patch-encoder rate")
    best_cpu = max(cpu, key=lambda e: e["tiles_per_s"])
    care_cpu = _care_s_per_patch(care, "cpu")
    gpu = [e for e in _measured(entries, "cuda") if e["precision"] == "fp32"]
    best_gpu = max(gpu, key=lambda e: e["tiles_per_s"]) if gpu else None
    care_gpu = _care_s_per_patch(care, "cuda")
    if care_cpu is None and care_gpu is None:
        raise ConfigError("the bench result has no CARE timing")
    ngpu = (hw.get("gpu") or {}).get("count") or 1
    return Rates(
        machine=describe(hw),
        decode_tiles_per_s_per_core=float(best_decode["tiles_per_s_per_core"]),
        decode_backend=best_decode["backend"],
        encoder_tiles_per_s_per_cpu_core=best_cpu["tiles_per_s"] / cores,
        encoder_cpu=_label(best_cpu),
        # CARE timed on the GPU only where there is one: the CPU figure is then unknown and the
        # GPU one (a lower bound on core-seconds) stands in for CPU-only plans.
        care_core_s_per_patch=(care_cpu if care_cpu is not None else care_gpu) * cores,
        encoder_tiles_per_s_per_gpu=best_gpu["tiles_per_s"] if best_gpu else None,
        encoder_gpu=_label(best_gpu) if best_gpu else None,
        care_gpu_s_per_patch=care_gpu * ngpu if care_gpu is not None else None,
        cpu_alternatives=_alternatives(_measured(entries, "cpu"), best_cpu["tiles_per_s"],
                                       cores),
        gpu_alternatives=(_alternatives(_measured(entries, "cuda"), best_gpu["tiles_per_s"])
                          if best_gpu else ()),
    )


def _hours(seconds: float) -> float:
    return seconds / 3600.0


def plan_cohort(rates: Rates, shape: ClusterShape, *, slides: int, tiles_per_slide: int
                ) -> dict[str, Any]:
    """Stage rates for ``shape``, the bottleneck, wall time, GPU-hours and advice (JSON-ready)."""
    if slides < 1 or tiles_per_slide < 1:
        raise ConfigError(f"slides and tiles per slide must be >= 1, got {slides}, "
                          f"{tiles_per_slide}")
    total = slides * tiles_per_slide
    cores = shape.nodes * shape.cpus_per_node
    d = rates.decode_tiles_per_s_per_core
    advice: list[str] = []
    if shape.gpus_per_node:
        if rates.encoder_tiles_per_s_per_gpu is None or rates.care_gpu_s_per_patch is None:
            raise ConfigError(
                f"these rates were measured on {rates.machine}: no GPU patch-encoder or CARE "
                "rate to plan GPUs with; run care-scale bench on a GPU node of the cluster "
                "and pass --rates FILE (or plan with --gpus-per-node 0)")
        gpus = shape.nodes * shape.gpus_per_node
        e, c = rates.encoder_tiles_per_s_per_gpu, rates.care_gpu_s_per_patch
        stages = {"decode": d * cores, "patch_encoder": e * gpus, "care": gpus / c,
                  "gpu (encoder + CARE)": gpus / (1.0 / e + c)}
        rate = min(stages["decode"], stages["gpu (encoder + CARE)"])
        bottleneck = "decode" if stages["decode"] < stages["gpu (encoder + CARE)"] else (
            "patch_encoder" if 1.0 / e >= c else "care")
        per_gpu = 1.0 / (1.0 / e + c)
        need = per_gpu / d
        have = shape.cpus_per_node / shape.gpus_per_node
        if bottleneck == "decode":
            advice.append(f"decode limits: each GPU consumes {per_gpu:,.0f} tiles/s, which "
                          f"takes {need:.1f} decode cores ({rates.decode_backend}); the "
                          f"nodes give {have:.1f} cores per GPU: use >= "
                          f"{need * shape.gpus_per_node:.0f} CPUs per node, or fewer GPUs "
                          "per node, or decode on the GPU (cuCIM / nvJPEG)")
        else:
            advice.append(f"the GPUs limit ({bottleneck}); decode has "
                          f"{stages['decode'] / rate:.1f}x headroom ({have:.1f} cores per "
                          f"GPU, {need:.1f} needed): more GPUs scale the rate up to "
                          f"{stages['decode'] / per_gpu:.0f} GPUs on these CPUs")
            for alt in rates.gpu_alternatives[:2]:
                alt_rate = min(gpus / (1.0 / alt.tiles_per_s + c), stages["decode"])
                limit = " (decode then limits)" if alt_rate == stages["decode"] else ""
                advice.append(f"{alt.label}: {alt.tiles_per_s / e:.2f}x the fp32 encoder, min "
                              f"cosine {alt.min_cosine:.4f} >= {MIN_COSINE}: wall time "
                              f"x{rate / alt_rate:.2f}{limit}")
        wall = total / rate
        gpu_hours = _hours(wall) * gpus
        busy = _hours(total * (1.0 / e + c))
        shares = None
    else:
        e = rates.encoder_tiles_per_s_per_cpu_core
        c = rates.care_core_s_per_patch
        per_tile = {"decode": 1.0 / d, "patch_encoder": 1.0 / e, "care": c}
        core_s = sum(per_tile.values())
        stages = {name: cores / s for name, s in per_tile.items()}
        rate = cores / core_s
        bottleneck = max(per_tile, key=per_tile.get)
        shares = {name: s / core_s for name, s in per_tile.items()}
        advice.append("no GPUs: each core decodes, encodes and runs CARE in turn; core time "
                      "per tile is " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        for alt in rates.cpu_alternatives[:2]:
            alt_core_s = core_s - 1.0 / e + 1.0 / alt.tiles_per_s
            advice.append(f"{alt.label}: {alt.tiles_per_s / e:.2f}x the fp32 encoder, min "
                          f"cosine {alt.min_cosine:.4f} >= {MIN_COSINE}: wall time "
                          f"x{alt_core_s / core_s:.2f}")
        wall = total / rate
        gpu_hours, busy = 0.0, 0.0
    return {
        "rates_from": rates.machine,
        "rates": asdict(rates),
        "cluster": asdict(shape),
        "slides": slides, "tiles_per_slide": tiles_per_slide, "tiles": total,
        "stage_tiles_per_s": stages,
        "core_time_shares": shares,
        "bottleneck": bottleneck,
        "tiles_per_s": rate,
        "wall_hours": _hours(wall),
        "gpu_hours": gpu_hours,
        "gpu_busy_hours": busy,
        "advice": advice,
    }


__all__ = ["MIN_COSINE", "Alternative", "ClusterShape", "Rates", "plan_cohort",
           "rates_from_bench"]
