"""``precision: auto``: the fastest patch-encoder precision whose features stay within a bound
of fp32 on the job's own tiles, among those this CPU has the instructions for.

Reduced precision changes the embeddings, so ``auto`` never trades accuracy silently: every
candidate is run on the same calibration tiles as fp32 and kept only if each tile's feature
has cosine similarity >= :data:`MIN_COSINE` to its fp32 feature; among those kept (fp32
always is), the one with the most tiles/s wins. What was measured is returned, and the
embedding job stores it with the run.

Which candidates are tried follows the CPU's flags (``/proc/cpuinfo``): bf16 autocast only
where the CPU computes bf16 natively (AVX-512 BF16 or AMX; elsewhere it is emulated and
slower than fp32), int8 (dynamically quantised ONNX) only with VNNI dot-product instructions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The bound: every calibration tile's feature within this cosine of its fp32 feature.
MIN_COSINE = 0.999

#: precision -> (CPU flags any one of which it needs, why it is skipped without them).
CPU_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "bf16": (("avx512_bf16", "amx_bf16"),
             "no AVX-512 BF16 / AMX: bf16 would be emulated, slower than fp32"),
    "int8": (("avx512_vnni", "avx_vnni", "amx_int8"),
             "no VNNI / AMX-INT8: int8 matmuls would not be faster than fp32"),
}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_weight_bits(flags: frozenset[str] | None = None) -> int:
    """Bits of the int8 graph's weights for this CPU (``flags``: its /proc/cpuinfo flags).

    8 where the CPU has int8 dot-product instructions (VNNI, AMX-INT8): they sum u8 x s8
    products in 32 bits, so full-range weights are exact there, and closer to fp32 (ViT-B
    min cosine 0.9994 against 0.9984 with 7-bit weights, README "precision"). 7 elsewhere:
    without them ONNX Runtime pairs the products in 16-bit sums, which saturate with
    full-range weights (its ``reduce_range``; measured on an AVX2-only CPU, the micro ViT's
    error was 1.2e-1 with 8-bit weights and 2.3e-2 with 7)."""
    flags = cpu_flags() if flags is None else flags
    return 8 if flags & set(CPU_NEEDS["int8"][0]) else 7


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total; >= 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Trial:
    """One precision measured on the calibration tiles (or skipped, with why)."""

    precision: str
    tiles_per_s: float | None = None
    min_cosine: float | None = None
    skipped: str | None = None

    @property
    def within_bound(self) -> bool:
        return self.skipped is None and self.min_cosine is not None and \
            self.min_cosine >= MIN_COSINE


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str
    trials: list[Trial] = field(default_factory=list)
    min_cosine_bound: float = MIN_COSINE

    def as_record(self) -> dict[str, Any]:
        """What the runs table keeps (JSON)."""
        return asdict(self)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).min())


#: Tiles of the untimed first call per candidate: it pays the one-time costs (memory arenas,
#: autocast's first-call set-up) on a few tiles instead of on the whole calibration batch.
WARMUP_TILES = 4


def _timed(backend: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray
           ) -> tuple[np.ndarray, float]:
    """Features of ``tiles`` and tiles/s of that call."""
    t0 = time.perf_counter()
    feats = np.asarray(backend(tiles))
    return feats, len(tiles) / max(time.perf_counter() - t0, 1e-9)


def choose_precision(make_backend: Callable[[str], Callable[[np.ndarray], np.ndarray]],
                     tiles: np.ndarray, *, flags: frozenset[str] | None = None
                     ) -> PrecisionChoice:
    """Measure fp32 and each candidate this CPU can run on ``tiles`` (uint8 (B, H, W, 3));
    ``make_backend(precision)`` builds the patch backend for one precision."""
    flags = cpu_flags() if flags is None else flags
    # Each precision: an untimed call on WARMUP_TILES, then one timed call on all the tiles
    # that also gives the features (36 tile encodes instead of the 96 of a best-of-2 after a
    # full warm-up: on ViT-B at 8 tiles/s, three precisions took 36 s of a 308-tile run's
    # 84 s that way). fp32 goes last: load early in a run (its Ray cluster starting beside
    # the calibration) slows whatever is measured first, so it can only make a reduced
    # precision look slower, never faster, than it is. One backend alive at a time (each
    # lives only inside measure()).
    def measure(precision: str) -> tuple[np.ndarray, float]:
        backend = make_backend(precision)
        backend(tiles[:WARMUP_TILES])
        return _timed(backend, tiles)

    skipped = {p: why for p, (needs, why) in CPU_NEEDS.items() if not flags & set(needs)}
    measured = {p: measure(p) for p in CPU_NEEDS if p not in skipped}
    ref, ref_rate = measure("fp32")
    trials = [Trial("fp32", tiles_per_s=ref_rate, min_cosine=1.0)]
    for precision in CPU_NEEDS:
        if precision in skipped:
            trials.append(Trial(precision, skipped=skipped[precision]))
        else:
            feats, rate = measured[precision]
            trials.append(Trial(precision, tiles_per_s=rate, min_cosine=_min_cosine(ref, feats)))
    best = max((t for t in trials if t.within_bound), key=lambda t: t.tiles_per_s or 0.0)
    if best.precision == "fp32":
        faster = [t for t in trials if t.skipped is None and t.precision != "fp32"]
        reason = ("fp32: " + ("; ".join(
            f"{t.precision} min cosine {t.min_cosine:.5f}, {t.tiles_per_s / ref_rate:.2f}x"
            for t in faster) or "no reduced precision this CPU computes natively"))
    else:
        reason = (f"{best.precision}: min cosine {best.min_cosine:.5f} >= {MIN_COSINE} over "
                  f"{len(tiles)} tiles, {best.tiles_per_s / ref_rate:.2f}x fp32 tiles/s")
    return PrecisionChoice(precision=best.precision, reason=reason, trials=trials)


__all__ = ["CPU_NEEDS", "MIN_COSINE", "PrecisionChoice", "Trial", "choose_precision",
           "cpu_flags", "int8_weight_bits", "usable_cores"]
