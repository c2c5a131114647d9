"""The measurements of ``care-scale bench``, side by side in one run on one machine.

- decode: tissue tiles of the given (or generated) slides read with each slide backend this
  machine has, one worker thread and then one per core; tiles/s, and CPU time per tile (all
  threads), whose inverse is the per-core rate the plan scales by cores;
- patch encoder: tiles/s of each backend x precision this machine can run, on the same decoded
  tiles, with the parity of its features against torch fp32 eager (min and mean cosine, max
  absolute difference); those it cannot run are listed as skipped with the reason;
- CARE: forward time and peak memory at N patches (1k, 10k, 50k; fewer and smaller where the
  time budget is small).

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
    """What ``care-scale bench`` measures. ``seconds``: the time budget of the timed parts
    (decode, encoder and CARE share it; model builds and exports come on top)."""

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


def timed(fn: Callable[[], Any], budget_s: float) -> tuple[float, int]:
    """(best seconds per call, calls timed): one warm-up call, then calls until ``budget_s``
    is spent (at least one, at most :data:`MAX_REPEATS`)."""
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

    side = 2048 if config.small else 6144
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
    """Per slide backend: tiles/s with 1 worker and with ``cores`` workers, CPU ms per tile."""
    from care_scale.slides import backend_available

    out = []
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


def measure_patch_encoder(encoder, tiles: np.ndarray, cands: list[Candidate], *,
                          flags: frozenset[str], budget_s: float, workdir: Path
                          ) -> list[dict[str, Any]]:
    """tiles/s and parity vs torch fp32 eager for each candidate (the first must be that)."""
    runnable = [c for c in cands if skip_reason(c, flags) is None]
    share = budget_s / max(1, len(runnable))
    ref: np.ndarray | None = None
    out = []
    for c in cands:
        entry: dict[str, Any] = {"backend": c.backend, "device": c.device,
                                 "precision": c.precision, "mode": c.mode,
                                 "batch_size": len(tiles), "tiles_per_s": None, "calls": None,
                                 "min_cosine": None, "mean_cosine": None, "max_abs_err": None,
                                 "skipped": skip_reason(c, flags)}
        out.append(entry)
        if entry["skipped"]:
            continue
        try:
            run = _make_runner(c, encoder, workdir)
            feats = np.asarray(run(tiles), dtype=np.float32)
            best, calls = timed(lambda run=run: run(tiles), share)
        except (CareScaleError, ImportError, RuntimeError) as exc:
            entry["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            continue
        if ref is None:
            ref = feats
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


def measure_care(care, sizes: tuple[int, ...], *, device: str, budget_s: float
                 ) -> list[dict[str, Any]]:
    """Forward seconds (best of the calls the budget allows) and peak memory at each N; a size
    whose time, extrapolated linearly from the last one measured, exceeds what is left of the
    budget is skipped with that estimate."""
    import torch

    care = care.eval().to(device)
    in_dim = care.config.in_dim
    end = time.perf_counter() + budget_s
    out, per_patch = [], None
    for n in sizes:
        entry: dict[str, Any] = {"n": n, "device": device, "seconds": None,
                                 "ms_per_1k_patches": None, "peak_memory_mib": None,
                                 "memory_source": None, "skipped": None}
        out.append(entry)
        left = end - time.perf_counter()
        if per_patch is not None and per_patch * n * 2 > left:
            entry["skipped"] = (f"about {per_patch * n:.1f} s per forward (linear from the "
                                f"last size), {max(left, 0):.1f} s of the budget left")
            continue
        gen = torch.Generator().manual_seed(n)
        feats = torch.randn(1, n, in_dim, generator=gen).to(device)
        grid = torch.from_numpy(round_grid(n))[None].to(device)
        num_valid = torch.tensor([n], device=device)

        def forward(feats=feats, num_valid=num_valid, grid=grid):
            with torch.inference_mode():
                care(feats, num_valid, grid)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        if device.startswith("cuda"):
            forward()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            source = "torch.cuda.max_memory_allocated above the inputs"
        else:
            forward()
            with PeakRSS() as mem:
                forward()
            peak, source = mem.peak_mib, "peak RSS above the start (sampled every 5 ms)"
        best, _ = timed(forward, max(0.0, min(left, budget_s / len(sizes))))
        per_patch = best / n
        entry.update(seconds=best, ms_per_1k_patches=best * 1e6 / n, peak_memory_mib=peak,
                     memory_source=source)
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


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure this node (see the module docstring); a JSON-ready dict."""
    import torch

    from care_scale.bench.hardware import hardware
    from care_scale.inference import DEFAULT_PATCH_ENCODER
    from care_scale.inference.precision import cpu_flags
    from care_scale.models import create_patch_encoder, create_slide_encoder

    if config.seconds <= 0:
        raise ConfigError(f"--seconds must be > 0, got {config.seconds}")
    backends = resolve_backends(config.backends)
    precisions = check_precisions(tuple(config.precisions))
    small = config.small
    flags = cpu_flags()
    hw = hardware(flags)
    started = time.perf_counter()
    name = config.patch_encoder or ("vit_micro_patch16_64" if small else DEFAULT_PATCH_ENCODER)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained weights: the bench says so in its record
        encoder = create_patch_encoder(name)
        care = create_slide_encoder(config.slide_encoder)
    spec = encoder.spec
    batch = config.batch_size or (8 if small else 32)
    sizes = config.care_sizes or ((256, 1024) if small else CARE_SIZES)
    with _workdir() as work:
        paths, origin = slide_paths(config, work)
        grids = _grids(paths, target_mpp=spec.mpp, patch_size=spec.input_size,
                       storage_options=config.storage_options)
        decode = measure_decode(grids, cores=hw["cores"], budget_s=config.seconds * 0.25,
                                storage_options=config.storage_options)
        tiles = sample_tiles(grids, batch, config.storage_options)
        patch = measure_patch_encoder(encoder, tiles, candidates(backends, precisions),
                                      flags=flags, budget_s=config.seconds * 0.45, workdir=work)
    care_device = "cuda" if torch.cuda.is_available() else "cpu"
    care_entries = measure_care(care, tuple(sizes), device=care_device,
                                budget_s=config.seconds * 0.3)
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
        "patch_encoder": {"model": name, "embed_dim": int(spec.embed_dim),
                          "input_size": int(spec.input_size),
                          "trained": bool(getattr(encoder, "trained", False)),
                          "reference": "torch/cpu/fp32/eager", "entries": patch},
        "slide_encoder": {"model": config.slide_encoder, "in_dim": care.config.in_dim,
                          "hidden_dim": care.config.hidden_dim, "entries": care_entries},
        "elapsed_s": time.perf_counter() - started,
    }


__all__ = ["BACKENDS", "CARE_SIZES", "BenchConfig", "Candidate", "PeakRSS", "candidates",
           "measure_care", "measure_decode", "measure_patch_encoder", "parity", "round_grid",
           "run_bench", "skip_reason", "timed"]
