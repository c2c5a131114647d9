"""Patch grid positions and a slide encoder's numpy result: torch-free, shared by torch CARE
(``care_scale.models``), the ONNX / TensorRT slide backends (``care_scale.inference``) and the
embedding job's slide-encoder actors, which run CARE from its ONNX export without importing
torch (importing ``care_scale.models`` imports torch: its families register on import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from care_scale.exceptions import ModelInputError


@dataclass
class SlideEncoding:
    """One slide's CARE result as numpy arrays (what tables store).

    Our CARE fills every field. A remote-code model (``care_scale.models.remote``) fills what
    its outputs expose; the others are None and the tables hold nulls there.
    """

    slide_embedding: np.ndarray  # (H,) float32
    region_embeddings: np.ndarray  # (R, H) float32
    num_regions: int
    region_of_patch: np.ndarray | None  # (N,) int64, in the order of the input patches
    coverage: np.ndarray | None  # (R,)
    semantic_weight: np.ndarray | None  # (R,)
    fused_weight: np.ndarray | None  # (R,)
    roi_index: int | None
    roi_embedding: np.ndarray | None  # (H,)
    model_version: str
    patch_step: int = 0  # level-0 pixels between grid positions used for this encoding


# ------------------------------------------------------------------------- grid positions

#: Level-0 patch spacings of CLAM / TRIDENT preprocessing. The CARE authors' code takes the
#: most frequent of these among the distances between consecutive coordinates as the step.
COMMON_STEPS = (128, 256, 512, 1024)


def detect_step(coords: np.ndarray) -> int:
    """The lattice step of tile coordinates (1 when there is a single position).

    In this order:

    1. The CARE authors' rule: among the moves from one coordinate to the next (file order)
       along one axis, the most frequent distance, when it is one of ``COMMON_STEPS``, is
       the most frequent move of any length and makes at least half of all moves. CLAM and
       TRIDENT write coordinates in scan order, so on their files this is the patch spacing,
       whatever the metadata says (the authors' own file says 1024 and is spaced 512).
    2. Otherwise (shuffled order, other spacings): the most frequent gap between neighbours
       within a row (same y) and within a column (same x). Gaps inside one row never mix
       lattice origins, so tissue pieces on differently offset lattices do not shrink it
       to the offset between them (taking gaps over all x values at once did: 81 on the
       authors' file).
    3. Coordinates that jitter around the lattice share no rows. Then the gaps between
       sorted distinct x (and y) values are used: a jump of more than 3x separates jitter
       from steps, and the step is refined by least squares on all positions.
    """
    c = np.asarray(coords, dtype=np.float64)
    if len(np.unique(c, axis=0)) < 2:
        return 1
    moves = np.abs(np.diff(c, axis=0))
    along = np.where(moves[:, 1] == 0, moves[:, 0], np.where(moves[:, 0] == 0, moves[:, 1], 0))
    values, counts = np.unique(np.rint(along[along > 0]).astype(np.int64), return_counts=True)
    # Scan order: most consecutive pairs are one such move (a shuffled file has few, spread
    # over multiples of the step, and falls through to the gaps within rows).
    if (values.size and int(values[np.argmax(counts)]) in COMMON_STEPS
            and counts.max() >= 0.5 * len(moves)):
        return int(values[np.argmax(counts)])
    gaps = _line_gaps(c)
    if gaps.size >= max(2, len(c) // 4):
        values, counts = np.unique(np.rint(gaps).astype(np.int64), return_counts=True)
        # Holes make multiples of the step as common as the step itself: the smallest
        # frequent gap. Gaps spread over many values are jitter, not a lattice (3. below).
        frequent = values[counts >= 0.5 * counts.max()]
        if counts.max() >= 0.3 * gaps.size:
            return max(1, int(frequent.min()))
    return _jittered_step(c)


def _line_gaps(c: np.ndarray) -> np.ndarray:
    """Gaps between neighbouring positions within each row (same y) and column (same x)."""
    out = []
    for axis in (0, 1):
        other = c[:, 1 - axis]
        order = np.lexsort((c[:, axis], other))
        same_line = other[order][1:] == other[order][:-1]
        step = np.diff(c[order, axis])[same_line]
        out.append(step[step > 0])
    return np.concatenate(out)


def _jittered_step(c: np.ndarray) -> int:
    gaps = np.concatenate([np.diff(np.unique(c[:, axis])) for axis in (0, 1)])
    gaps = np.sort(gaps[gaps > 0])
    if gaps.size == 0:
        return 1
    ratios = gaps[1:] / gaps[:-1]
    jumps = np.nonzero(ratios > 3.0)[0]
    jitter = jumps.size > 0
    if jitter:
        gaps = gaps[jumps[0] + 1:]  # drop the jitter cluster below the first big jump
    steps = gaps[gaps <= 1.5 * gaps[0]]
    values, counts = np.unique(np.rint(steps).astype(np.int64), return_counts=True)
    step = float(values[np.argmax(counts)]) if not jitter else float(np.median(steps))
    if jitter:
        rel = c - c.min(axis=0)
        for _ in range(2):  # least-squares slope (with an offset per axis) on lattice indices
            idx = np.rint(rel / step)
            di, dr = idx - idx.mean(axis=0), rel - rel.mean(axis=0)
            if (di * di).sum() > 0:
                step = float((di * dr).sum() / (di * di).sum())
    return max(1, round(step))


def coords_to_grid(coords: Any, step: int | None = None) -> tuple[np.ndarray, int]:
    """Level-0 pixel coordinates (N, 2) -> integer grid positions (N, 2) and the step used.

    Positions are ``round((coords - min) / step)``, so coordinates that are not multiples of
    the step (an offset origin, float rounding) land on the nearest lattice point.
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ModelInputError(f"coords must be (N, 2), got shape {c.shape}")
    if c.shape[0] == 0:
        raise ModelInputError("coords are empty: a slide needs at least one patch")
    if not np.isfinite(c).all():
        raise ModelInputError("coords contain NaN or inf")
    if step is None:
        step = detect_step(c)
    step = int(step)
    if step < 1:
        raise ModelInputError(f"patch step must be >= 1, got {step}")
    grid = np.rint((c - c.min(axis=0)) / step).astype(np.int64)
    return grid, step


__all__ = ["COMMON_STEPS", "SlideEncoding", "coords_to_grid", "detect_step"]
