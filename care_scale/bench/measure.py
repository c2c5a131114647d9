"""The measurements of ``care-scale bench``, side by side in one run on one machine.

- decode: tissue tiles of the given (or generated) slides read with each slide backend this
  machine has, one worker thread and then one per core; tiles/s, and CPU time per tile (all
  threads), whose inverse is the per-core rate the plan scales by cores;
- patch encoder: tiles/s of each backend x precision this machine can run, on the same decoded
  tiles, with the parity of its features against torch fp32 eager (min and mean cosine, max
  absolute difference); those it cannot run are listed as skipped with the reason;
- CARE: forward time and peak memory at N patches (1k, 10k, 50k; smaller in a small run);
  a size that would not fit the memory available or the budget is listed as skipped.

``seconds`` bounds the whole run, builds included: how, in care_scale.bench.budget.

Every entry is a plain dict (JSON-ready); ``tiles_per_s`` and the parity fields are None on
skipped entries, never left out.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from care_scale.bench.budget import Budget, BuildEstimate, Stage
from care_scale.exceptions import CareScaleError, ConfigError

#: Patch-encoder backends the bench knows (``--backends all``), in report order.
BACKENDS = ("torch", "onnxruntime", "tensorrt")
#: Slide (decode) backends the bench tries.
SLIDE_BACKENDS = ("cucim", "openslide", "tifffile")
#: CARE sizes (patches per slide) of a full bench.
CARE_SIZES = (1_000, 10_000, 50_000)
#: Below this many --seconds the bench uses small sizes (a CI smoke run).
SMALL_BELOW_S = 5.0
#: Upper bound on timed repetitions of any one measurement (the time budget ends it first).
MAX_REPEATS = 200


@dataclass(frozen=True)
class BenchConfig:
    """What ``care-scale bench`` measures. ``seconds``: the time budget of the whole run,
    model builds, exports and quantisation included (care_scale.bench.budget)."""

    slides: str | None = None
    patch_encoder: str | None = None
    slide_encoder: str = "care"
    backends: tuple[str, ...] | str = "auto"
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
    seconds: float = 20.0
    batch_size: int | None = None
    care_sizes: tuple[int, ...] | None = None
    max_slides: int = 4
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def small(self) -> bool:
        return self.seconds < SMALL_BELOW_S


# ---------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], budget_s: float, *, warmup: bool = True) -> tuple[float, int]:
    """(best seconds per call, calls timed): one warm-up call (unless ``warmup`` is False),
    then calls until ``budget_s`` is spent (at least one, at most :data:`MAX_REPEATS`)."""
    if warmup:
        fn()
    best, calls, end = float("inf"), 0, time.perf_counter() + budget_s
    while calls < 1 or (time.perf_counter() < end and calls < MAX_REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best, calls


class PeakRSS:
    """Peak resident memory above the start, sampled every 5 ms from /proc/self/statm while
    the block runs (CPU; on CUDA the bench reads torch's allocator peak instead). Free heap
    pages are handed back first (glibc ``malloc_trim``), so a block that reuses memory an
    earlier call freed still shows its own peak."""

    def __init__(self):
        self.peak_mib = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")
        except (OSError, ValueError, IndexError):
            return 0

    @staticmethod
    def _trim() -> None:
        import ctypes
        import ctypes.util

        with contextlib.suppress(OSError, AttributeError, TypeError):
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)

    def __enter__(self) -> Self:
        self._trim()
        self._base = self._rss()
        self._peak = self._base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._peak = max(self._peak, self._rss())
        self.peak_mib = (self._peak - self._base) / 2**20


# ---------------------------------------------------------------------------------- decode


def slide_paths(config: BenchConfig, workdir: Path) -> tuple[list[str], str]:
    """(local slide paths, where they came from): the user's, or one generated slide."""
    if config.slides:
        from care_scale.embed.sources import list_sources

        found = list_sources(config.slides, storage_options=config.storage_options)
        if not found:
            raise ConfigError(f"--slides {config.slides}: no slides found")
        return [s.uri for s in found[: config.max_slides]], config.slides
    from care_scale.synthetic import write_synthetic_slide

    # Writing the 6144 px slide takes ~25 s on 2 busy cores, 2048-3072 px ~5 s: the big one
    # only where the budget is long.
    side = 2048 if config.small else (6144 if config.seconds >= 120 else 3072)
    path = workdir / "bench_slide.tif"
    write_synthetic_slide(path, width=side, height=side, seed=0, tissue_fraction=0.6)
    return [str(path)], f"generated ({side} x {side} px synthetic JPEG TIFF, 0.5 um/px)"


def _grids(paths: list[str], *, target_mpp: float, patch_size: int, storage_options):
    from care_scale.slides import open_slide
    from care_scale.tiling import tile_grid

    out = []
    for path in paths:
        with open_slide(path, storage_options=storage_options) as s:
            g = tile_grid(s, target_mpp=target_mpp, patch_size=patch_size)
        if len(g):
            out.append((path, g))
    if not out:
        raise ConfigError("no tissue tiles in the bench slides")
    return out


def _decode_once(backend: str, grids, workers: int, budget_s: float,
                 storage_options) -> tuple[int, float, float]:
    """(tiles, seconds, CPU seconds of this process) reading the grids' tiles in batches of 64
    until every tile is read or ``budget_s`` is spent."""
    from care_scale.slides import open_slide

    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for path, g in grids:
        with open_slide(path, backend=backend, storage_options=storage_options) as s:
            for i in range(0, len(g), 64):
                tiles = s.read_regions(g.coords[i:i + 64], (g.read_size, g.read_size),
                                       level=g.level, num_workers=workers)
                n += len(tiles)
                if time.perf_counter() - t0 > budget_s:
                    return n, time.perf_counter() - t0, time.process_time() - c0
    return n, time.perf_counter() - t0, time.process_time() - c0


def measure_decode(grids, *, cores: int, budget_s: float, storage_options=None
                   ) -> list[dict[str, Any]]:
    """Per slide backend: tiles/s with 1 worker and with ``cores`` workers, CPU ms per tile;
    the backends installed share ``budget_s``."""
    from care_scale.slides import backend_available

    out = []
    budget_s /= max(1, sum(backend_available(b) for b in SLIDE_BACKENDS))  # per backend
    for backend in SLIDE_BACKENDS:
        entry: dict[str, Any] = {"backend": backend, "tiles": None, "workers": cores,
                                 "tiles_per_s_one_worker": None, "tiles_per_s_node": None,
                                 "cpu_ms_per_tile": None, "tiles_per_s_per_core": None,
                                 "skipped": None}
        if not backend_available(backend):
            entry["skipped"] = f"{backend} is not installed"
            out.append(entry)
            continue
        try:
            _decode_once(backend, grids[:1], 1, min(0.2, budget_s / 4), storage_options)
            n1, s1, _ = _decode_once(backend, grids, 1, budget_s / 2, storage_options)
            n, s, cpu = _decode_once(backend, grids, cores, budget_s / 2, storage_options)
        except CareScaleError as exc:
            entry["skipped"] = f"{backend} cannot read the bench slides: {exc}"
            out.append(entry)
            continue
        entry.update(tiles=n, tiles_per_s_one_worker=n1 / s1, tiles_per_s_node=n / s,
                     cpu_ms_per_tile=cpu * 1e3 / n, tiles_per_s_per_core=n / cpu)
        out.append(entry)
    return out


def sample_tiles(grids, count: int, storage_options=None) -> np.ndarray:
    """``count`` decoded tiles of the bench slides, at the grid's tile size (the encoder's
    input size): what the encoder is timed on."""
    from care_scale.slides import open_slide
    from care_scale.tiling import iter_tile_batches

    batches = []
    have = 0
    for path, g in grids:
        with open_slide(path, storage_options=storage_options) as s:
            for batch in iter_tile_batches(s, g, batch_size=count):
                batches.append(batch.tiles)
                have += len(batch.tiles)
                break
        if have >= count:
            break
    tiles = np.concatenate(batches)
    while len(tiles) < count:  # a small slide: repeat its tiles
        tiles = np.concatenate([tiles, tiles])
    return np.ascontiguousarray(tiles[:count])


# --------------------------------------------------------------------------- patch encoder


def parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """min / mean cosine of each row with its reference row, and the max absolute difference."""
    a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    b = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_err": float(np.abs(ref - got).max())}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _onnx_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Candidate:
    """One backend x device x precision x mode the bench may measure."""

    backend: str
    device: str
    precision: str
    mode: str  # "eager" (torch.no_grad), "inference_mode", "ort", "engine"

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}/{self.mode}"


def candidates(backends: tuple[str, ...], precisions: tuple[str, ...]) -> list[Candidate]:
    """Everything the bench asks about, runnable or not (skips are decided later)."""
    out = []
    for device in ("cpu", "cuda"):
        if "torch" in backends:
            if device == "cpu" and "fp32" in precisions:
                out.append(Candidate("torch", "cpu", "fp32", "eager"))
            out += [Candidate("torch", device, p, "inference_mode") for p in precisions
                    if p != "int8"]
        if "onnxruntime" in backends:
            out += [Candidate("onnxruntime", device, p, "ort") for p in precisions
                    if p in ("fp32", "int8") and not (device == "cuda" and p == "int8")]
        if "tensorrt" in backends and device == "cuda":
            out += [Candidate("tensorrt", "cuda", p, "engine") for p in precisions
                    if p in ("fp16", "fp32")]
    return out


def skip_reason(c: Candidate, flags: frozenset[str]) -> str | None:
    """Why this machine cannot run ``c`` (None: it can). CPU precisions follow the flags rule
    of ``precision: auto`` (care_scale.inference.precision.CPU_NEEDS)."""
    from care_scale.inference.precision import CPU_NEEDS

    if c.device == "cuda":
        if not _cuda():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if c.backend == "onnxruntime" and not _onnx_cuda():
            return "onnxruntime has no CUDAExecutionProvider here"
        if c.backend == "tensorrt":
            from care_scale.inference.tensorrt_backend import tensorrt_status

            ok, why = tensorrt_status()
            return None if ok else why
        return None
    if c.backend == "onnxruntime" and not _importable("onnxruntime"):
        return "onnxruntime is not installed"
    if c.precision == "fp16":
        if not flags & {"avx512_fp16", "amx_fp16"}:
            return "no AVX-512 FP16 / AMX-FP16: fp16 on this CPU would be emulated"
        return None
    if c.precision in CPU_NEEDS:
        needs, why = CPU_NEEDS[c.precision]
        if not flags & set(needs):
            return why
    return None


def _make_runner(c: Candidate, encoder, workdir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A tiles -> features callable for ``c`` (builds exports into ``workdir`` as needed)."""
    import torch

    from care_scale.inference.torch_backend import TorchPatchBackend

    if c.backend == "torch" and c.mode == "eager":
        model = encoder.eval()

        def eager(tiles: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(tiles)).float().numpy()

        return eager
    if c.backend == "torch":
        return TorchPatchBackend(encoder, device=c.device, precision=c.precision)
    if c.backend == "onnxruntime":
        from care_scale.export import create_patch_backend

        return create_patch_backend("onnxruntime", encoder, device=c.device,
                                    precision=c.precision, cache_dir=workdir / "exports")
    from care_scale.export import create_patch_backend, export_patch_encoder

    out = workdir / f"trt_{c.precision}"
    export_patch_encoder(encoder, out=str(out), tensorrt=True)
    return create_patch_backend("tensorrt", encoder, artifacts=str(out), device=c.device)


def _entry(c: Candidate, batch: int, skipped: str | None) -> dict[str, Any]:
    return {"backend": c.backend, "device": c.device, "precision": c.precision, "mode": c.mode,
            "batch_size": batch, "tiles_per_s": None, "calls": None, "build_s": None,
            "min_cosine": None, "mean_cosine": None, "max_abs_err": None, "skipped": skipped}


def measure_patch_encoder(encoder, tiles: np.ndarray, cands: list[Candidate], *,
                          flags: frozenset[str], stage: Stage, builds: BuildEstimate,
                          workdir: Path) -> list[dict[str, Any]]:
    """tiles/s and parity vs torch fp32 eager for each candidate (the first must be that,
    and is always measured); later ones whose build and two calls would not fit what is left
    of ``stage`` are skipped with a ``budget`` reason (see care_scale.bench.budget)."""
    runnable = [c for c in cands if skip_reason(c, flags) is None]
    ref: np.ndarray | None = None
    out = []
    for c in cands:
        entry = _entry(c, len(tiles), skip_reason(c, flags))
        out.append(entry)
        if entry["skipped"]:
            continue
        pending = len(runnable) - runnable.index(c)
        if ref is not None:
            entry["skipped"] = builds.skip(c.backend, c.precision, stage.left())
            if entry["skipped"]:
                continue
        try:
            t0 = time.perf_counter()
            run = _make_runner(c, encoder, workdir)
            entry["build_s"] = time.perf_counter() - t0
            builds.record(c.backend, c.precision, entry["build_s"])
            feats = np.asarray(run(tiles), dtype=np.float32)
            best, calls = timed(lambda run=run: run(tiles), max(0.0, stage.left() / pending))
        except (CareScaleError, ImportError, RuntimeError) as exc:
            entry["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            continue
        if ref is None:
            ref, builds.call_s = feats, best
        entry.update(tiles_per_s=len(tiles) / best, calls=calls, **parity(ref, feats))
    return out


# ------------------------------------------------------------------------------------ CARE


def round_grid(n: int) -> np.ndarray:
    """(n, 2) grid positions of a roughly round piece of tissue (partial windows at the rim)."""
    side = int(np.ceil(np.sqrt(n * 1.3)))
    yy, xx = np.mgrid[0:side, 0:side]
    d = (xx - side / 2) ** 2 + (yy - side / 2) ** 2
    order = np.argsort(d.ravel(), kind="stable")[:n]
    return np.stack([xx.ravel()[order], yy.ravel()[order]], 1).astype(np.int64)


def _care_forward(care, n: int, device: str) -> Callable[[], None]:
    import torch

    gen = torch.Generator().manual_seed(n)
    feats = torch.randn(1, n, care.config.in_dim, generator=gen).to(device)
    grid = torch.from_numpy(round_grid(n))[None].to(device)
    num_valid = torch.tensor([n], device=device)

    def forward():
        with torch.inference_mode():
            care(feats, num_valid, grid)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return forward


def _peak_call(forward: Callable[[], None], device: str) -> tuple[float, float, str]:
    """(seconds, peak MiB, how the peak was read) of one call."""
    import torch

    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return (time.perf_counter() - t0, peak,
                "torch.cuda.max_memory_allocated above the inputs")
    with PeakRSS() as mem:
        forward()
    return time.perf_counter() - t0, mem.peak_mib, "peak RSS above the start (sampled every 5 ms)"


def measure_care(care, sizes: tuple[int, ...], *, device: str, stage: Stage,
                 available_mib: float | None = None) -> list[dict[str, Any]]:
    """Forward seconds and peak memory at each N, smallest first. A size is skipped for
    memory when its peak, extrapolated from the measured ones, exceeds the memory available
    (``available_mib``; read from the device when None), and for budget when one forward,
    linear in N from the last size, does not fit what is left of ``stage``. Each size is
    measured with one call (its time and peak), then, where another fits its share of what is
    left after one call of each larger size, with more calls (best of)."""
    from care_scale.bench.budget import available_memory_mib, care_skip, extrapolate_peak

    care = care.eval().to(device)
    out, peaks, last = [], [], None  # last: (n, seconds per call) of the last size measured
    for i, n in enumerate(sorted(sizes)):
        entry: dict[str, Any] = {"n": n, "device": device, "seconds": None, "calls": None,
                                 "ms_per_1k_patches": None, "peak_memory_mib": None,
                                 "memory_source": None, "estimated_peak_mib": None,
                                 "skipped": None}
        out.append(entry)
        entry["estimated_peak_mib"] = extrapolate_peak(peaks, n)
        call_s = None if last is None else last[1] * n / last[0]
        left = stage.left()
        entry["skipped"] = care_skip(
            n, peak_mib=entry["estimated_peak_mib"], call_s=call_s, left_s=left,
            available_mib=available_memory_mib(device) if available_mib is None else available_mib,
            measured_from=None if last is None else last[0])
        if entry["skipped"]:
            continue
        forward = _care_forward(care, n, device)
        best, peak, source = _peak_call(forward, device)  # also the warm-up
        # Repeats share what is left after one call of each larger size (linear in N).
        reserve = sum(best * m / n for m in sorted(sizes)[i + 1:])
        calls, share = 1, (stage.left() - reserve) / (len(sizes) - i)
        if best <= share:
            more, timed_calls = timed(forward, share, warmup=False)
            best, calls = min(best, more), 1 + timed_calls
        # RSS may not grow at all (freed heap reused): estimate from no less than the inputs.
        peaks.append((n, max(peak, n * care.config.in_dim * 4 / 2**20)))
        last = (n, best)
        entry.update(seconds=best, calls=calls, ms_per_1k_patches=best * 1e6 / n,
                     peak_memory_mib=peak, memory_source=source)
    return out


# ------------------------------------------------------------------------------------- run


def resolve_backends(backends: tuple[str, ...] | str) -> tuple[str, ...]:
    """``auto``: the backends importable here; ``all``: every one (the rest listed skipped)."""
    if backends == "all" or backends == ("all",):
        return BACKENDS
    if backends == "auto" or backends == ("auto",):
        return tuple(b for b in BACKENDS if b == "torch" or _importable(b))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; choose from auto, all, "
                          f"{', '.join(BACKENDS)}")
    return tuple(backends)


def check_precisions(precisions: tuple[str, ...]) -> tuple[str, ...]:
    from care_scale.choices import Precision, values

    bad = [p for p in precisions if p not in values(Precision)]
    if bad or not precisions:
        raise ConfigError(f"precisions must be among {list(values(Precision))}, got "
                          f"{list(precisions)}")
    if "fp32" not in precisions:  # the parity reference
        precisions = ("fp32", *precisions)
    return precisions


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="care-scale-bench-") as d:
        yield Path(d)


def choose_patch_encoder(config: BenchConfig, *, cuda: bool, batch: int,
                         budget: Budget) -> tuple[str, str]:
    """(name, why) of the patch encoder to measure: ``--patch-encoder``; the micro ViT in a
    small run; the job's default on CUDA; on the CPU the largest ladder encoder that fits
    the patch-encoder share of the budget (care_scale.bench.budget.default_cpu_encoder)."""
    from care_scale.bench.budget import STAGE_SHARES, default_cpu_encoder, node_gflops
    from care_scale.inference import DEFAULT_PATCH_ENCODER

    if config.patch_encoder:
        return config.patch_encoder, "--patch-encoder"
    if config.small:
        return "vit_micro_patch16_64", f"--seconds < {SMALL_BELOW_S:g}: small run"
    if cuda:
        return DEFAULT_PATCH_ENCODER, "CUDA: the embedding job's default"
    return default_cpu_encoder(STAGE_SHARES["patch_encoder"] * budget.seconds, batch,
                               node_gflops())


def _build_models(name: str, slide_encoder: str):
    """(patch encoder, CARE, seconds the patch encoder took to build)."""
    import warnings

    from care_scale.models import create_patch_encoder, create_slide_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained weights: the bench says so in its record
        t0 = time.perf_counter()
        encoder = create_patch_encoder(name)
        build_s = time.perf_counter() - t0
        care = create_slide_encoder(slide_encoder)
    return encoder, care, build_s


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure this node (see the module docstring) within ``config.seconds`` for the whole
    run (care_scale.bench.budget); a JSON-ready dict."""
    import torch

    from care_scale.bench.hardware import hardware
    from care_scale.inference.precision import cpu_flags

    if config.seconds <= 0:
        raise ConfigError(f"--seconds must be > 0, got {config.seconds}")
    budget = Budget(config.seconds)
    backends = resolve_backends(config.backends)
    precisions = check_precisions(tuple(config.precisions))
    small = config.small
    flags = cpu_flags()
    hw = hardware(flags)
    cuda = torch.cuda.is_available()
    batch = config.batch_size or (8 if small else 32)
    name, why = choose_patch_encoder(config, cuda=cuda, batch=batch, budget=budget)
    encoder, care, build_s = _build_models(name, config.slide_encoder)
    spec = encoder.spec
    sizes = config.care_sizes or ((256, 1024) if small else CARE_SIZES)
    ends = {"models": budget.elapsed()}  # seconds since the start at the end of each part
    with _workdir() as work:
        paths, origin = slide_paths(config, work)
        grids = _grids(paths, target_mpp=spec.mpp, patch_size=spec.input_size,
                       storage_options=config.storage_options)
        ends["slides"] = budget.elapsed()
        decode = measure_decode(grids, cores=hw["cores"],
                                budget_s=max(0.0, budget.stage("decode").left()),
                                storage_options=config.storage_options)
        tiles = sample_tiles(grids, batch, config.storage_options)
        ends["decode"] = budget.elapsed()
        patch = measure_patch_encoder(encoder, tiles, candidates(backends, precisions),
                                      flags=flags, stage=budget.stage("patch_encoder"),
                                      builds=BuildEstimate(build_s), workdir=work)
        ends["patch_encoder"] = budget.elapsed()
    care_entries = measure_care(care, tuple(sizes), device="cuda" if cuda else "cpu",
                                stage=budget.stage("care"))
    ends["care"] = budget.elapsed()
    return {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hw,
        "config": {"seconds": config.seconds, "backends": list(backends),
                   "precisions": list(precisions), "small": small,
                   "torch_threads": torch.get_num_threads()},
        "slides": {"source": origin, "count": len(grids),
                   "tissue_tiles": int(sum(len(g) for _, g in grids)),
                   "target_mpp": spec.mpp, "tile_size": spec.input_size},
        "decode": decode,
        "patch_encoder": {"model": name, "chosen_by": why, "build_s": build_s,
                          "embed_dim": int(spec.embed_dim), "input_size": int(spec.input_size),
                          "trained": bool(getattr(encoder, "trained", False)),
                          "reference": "torch/cpu/fp32/eager", "entries": patch},
        "slide_encoder": {"model": config.slide_encoder, "in_dim": care.config.in_dim,
                          "hidden_dim": care.config.hidden_dim, "entries": care_entries},
        "elapsed_s": budget.elapsed(),
        "ends_s": ends,
    }


__all__ = ["BACKENDS", "CARE_SIZES", "BenchConfig", "Candidate", "PeakRSS", "candidates",
           "choose_patch_encoder",
           "measure_care", "measure_decode", "measure_patch_encoder", "parity", "round_grid",
           "run_bench", "skip_reason", "timed"]
