"""Parity checks: ONNX Runtime against PyTorch on the same inputs.

Figures (all float64 on the float32 outputs, ``ref`` = PyTorch, ``got`` = ONNX Runtime):

- ``max_abs``  = max |got - ref|
- ``rel_linf`` = max |got - ref| / max |ref|          (error relative to the output's scale)
- ``rel_l2``   = max over rows of ||got_i - ref_i|| / ||ref_i||   (worst single embedding)

A check passes when both relative figures are below ``tol`` (1e-4 by default). CARE checks
also require identical region assignments (``region_of_patch``) and ROI index. A failed check
raises :class:`ParityError` whose message carries the numbers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from care_scale.exceptions import ExportError, ParityError

DEFAULT_TOL = 1e-4


@dataclass
class ParityReport:
    """One comparison. ``source`` says what went in (``random`` or a slide file name)."""

    name: str
    source: str
    n: int
    max_abs: float
    rel_linf: float
    rel_l2: float
    tol: float
    passed: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (f"{self.name} [{self.source}, n={self.n}]: rel_linf={self.rel_linf:.2e} "
                f"rel_l2={self.rel_l2:.2e} max_abs={self.max_abs:.2e} (tol {self.tol:.0e})"
                f"{extra} -> {'ok' if self.passed else 'FAILED'}")


def compare(name: str, ref: np.ndarray, got: np.ndarray, *, source: str,
            tol: float = DEFAULT_TOL, extra: dict[str, Any] | None = None,
            require: bool = True, n: int | None = None) -> ParityReport:
    """Compare two output arrays; raise :class:`ParityError` (with the figures) on failure."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ParityError(f"{name} [{source}]: output shapes differ: torch {ref.shape} vs "
                          f"onnxruntime {got.shape}")
    diff = np.abs(got - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel_linf = max_abs / scale if scale > 0 else max_abs
    rows = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.reshape(1, -1)
    drows = (got - ref).reshape(rows.shape)
    norms = np.linalg.norm(rows, axis=1)
    rel_l2 = float(np.max(np.linalg.norm(drows, axis=1) / np.maximum(norms, 1e-30))) \
        if rows.size else 0.0
    finite = bool(np.isfinite(got).all())
    extra = dict(extra or {})
    passed = finite and rel_linf < tol and rel_l2 < tol and all(
        v for k, v in extra.items() if isinstance(v, bool))
    if n is None:
        n = int(ref.shape[0]) if ref.ndim else 1
    report = ParityReport(name, source, n, max_abs,
                          rel_linf, rel_l2, tol, passed, extra)
    if require and not passed:
        why = "" if finite else " (ONNX Runtime returned NaN/inf)"
        raise ParityError(f"parity check failed{why}: {report}")
    return report


def random_tiles(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Uniform-noise uint8 tiles ``(n, size, size, 3)``: every pixel value, no structure."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def slide_tiles(path: str | os.PathLike, n: int, size: int) -> np.ndarray:
    """Up to ``n`` level-0 tiles of ``size`` px from a real slide, most tissue-like first.

    Used by tests and ``--parity-slide``: real H&E statistics exercise the normalisation and
    resize paths differently from noise. The product never needs a particular slide.
    """
    tiles, _ = slide_grid_tiles(path, size)
    # Prefer tiles with tissue (darker than the white background) so the inputs are real H&E.
    darkness = 255.0 - tiles.reshape(len(tiles), -1).mean(axis=1)
    order = np.argsort(-darkness, kind="stable")[:n]
    return np.ascontiguousarray(tiles[order])


def slide_grid_tiles(path: str | os.PathLike, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All non-overlapping level-0 tiles of ``size`` px of a slide (row-major) and their
    level-0 top-left coordinates ``(N, 2)``."""
    path = str(path)
    try:
        from care_scale.slides import open_slide
    except ImportError:  # the slides package is optional for exports; OpenSlide reads .svs too
        open_slide = None
    if open_slide is not None:
        with open_slide(path) as slide:
            w, h = slide.dimensions
            coords = _grid(w, h, size, path)
            return slide.read_regions(coords, (size, size), level=0), coords
    import openslide

    try:
        slide = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, FileNotFoundError) as exc:
        raise ExportError(f"{path}: cannot open slide for parity tiles ({exc})") from exc
    with slide:
        w, h = slide.dimensions
        coords = _grid(w, h, size, path)
        tiles = np.stack([np.asarray(slide.read_region((int(x), int(y)), 0, (size, size))
                                     .convert("RGB")) for x, y in coords])
        return tiles, coords


def _grid(w: int, h: int, size: int, path: str) -> np.ndarray:
    if w < size or h < size:
        raise ExportError(f"{path}: slide smaller than one {size} px tile")
    xs = np.arange(0, w - size + 1, size)
    ys = np.arange(0, h - size + 1, size)
    return np.array([(x, y) for y in ys for x in xs], dtype=np.int64)


def torch_patch_features(encoder, tiles: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            out.append(encoder(torch.from_numpy(tiles[i:i + batch_size])).float().numpy())
    return np.concatenate(out)


def onnx_patch_features(session, tiles: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    return np.concatenate([session.run(None, {"tiles": tiles[i:i + batch_size]})[0]
                           for i in range(0, len(tiles), batch_size)])


def check_patch_parity(onnx_path: str | os.PathLike, encoder, tiles: np.ndarray, *,
                       source: str = "random", tol: float = DEFAULT_TOL,
                       batch_size: int = 16, session=None) -> ParityReport:
    """Patch encoder: ONNX Runtime (CPU EP, full optimisation) vs the torch module.

    Batches of several sizes go through the graph, which also checks the dynamic batch axis.
    """
    from care_scale.inference.onnx_backend import create_session

    session = session or create_session(onnx_path, device="cpu")
    ref = torch_patch_features(encoder, tiles, batch_size=batch_size)
    got = onnx_patch_features(session, tiles, batch_size=batch_size)
    return compare(f"patch encoder {encoder.spec.name}", ref, got, source=source, tol=tol)


def random_slide(n: int, in_dim: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random features ``(n, in_dim)`` and a tissue-like blob of ``n`` distinct grid cells."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * 1.6)))
    yy, xx = np.mgrid[0:side, 0:side]
    # Cells ordered by a noisy distance from the centre: a compact, ragged tissue outline.
    dist = np.hypot(xx - side / 2, yy - side / 2) + rng.uniform(0, side / 6, xx.shape)
    cells = np.argsort(dist.ravel(), kind="stable")[:n]
    grid = np.stack([cells % side, cells // side], 1).astype(np.int64)
    feats = rng.standard_normal((n, in_dim)).astype(np.float32)
    return feats, grid


def check_slide_parity(onnx_path: str | os.PathLike, care, cases: list[tuple[np.ndarray,
                       np.ndarray]], *, source: str = "random", tol: float = DEFAULT_TOL,
                       session=None) -> list[ParityReport]:
    """CARE: ONNX Runtime vs torch on slides ``(features (N, D), grid (N, 2))``.

    Each slide must give identical region assignments, number of regions and ROI, and slide
    and region embeddings within ``tol`` relative error. Several N in one call also check the
    dynamic patch axis of the exported graph.
    """
    from care_scale.inference.onnx_backend import OnnxSlideBackend
    from care_scale.inference.torch_backend import TorchSlideBackend

    ref_backend = TorchSlideBackend(care, model_version="reference", device="cpu")
    ort_backend = OnnxSlideBackend(onnx_path, device="cpu")
    if session is not None:
        ort_backend.session = session
    reports = []
    for feats, grid in cases:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        grid = np.ascontiguousarray(grid, dtype=np.int64)
        ref = ref_backend.run_grid(feats, grid)
        got = ort_backend.run_grid(feats, grid)
        same_r = int(ref["num_regions"]) == int(got["num_regions"])
        regions = compare("regions", ref["region_embeddings"], got["region_embeddings"],
                          source=source, tol=tol, require=False) if same_r else None
        extra = {
            "assignments_equal": bool(np.array_equal(ref["region_of_patch"],
                                                     got["region_of_patch"])),
            "num_regions": int(ref["num_regions"]),
            "num_regions_equal": same_r,
            "roi_equal": int(ref["roi_index"]) == int(got["roi_index"]),
            "region_rel_l2": None if regions is None else float(f"{regions.rel_l2:.3e}"),
            "regions_ok": bool(regions is not None and regions.passed),
        }
        rep = compare(f"CARE {getattr(care, 'name', 'care')} N={len(feats)}",
                      ref["slide_embedding"][None], got["slide_embedding"][None],
                      source=source, tol=tol, extra=extra, n=len(feats))
        reports.append(rep)
    return reports
