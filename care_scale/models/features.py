"""Patch-feature files users already have, and coordinates -> grid positions.

Readers return :class:`PatchFeatures` (features float32 (N, D), level-0 coords int64 (N, 2),
patch size at level 0 when the file says it) for:

- CLAM / TRIDENT ``.h5``: datasets ``features`` and ``coords``; attributes ``patch_size``,
  ``patch_size_level0``, ``patch_level``/``downsample`` on the coords dataset or the file.
- Parquet: columns ``x``, ``y`` and a list column ``feature`` / ``features`` / ``embedding``
  (optionally ``patch_size_level0``).
- The CARE repository's ``.npy``: a pickled dict ``{"feature": (N, 768) float32, "index":
  ["{x}_{y}_{size}.png", ...], "inst_label": ...}``. It is read through a restricted unpickler
  that admits plain containers, strings, numbers and numpy arrays only, so a crafted file cannot
  run code; anything else is refused with :class:`FeatureFileError` naming the file.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

import numpy as np

from care_scale.exceptions import FeatureFileError, ModelInputError
from care_scale.storage import redact, strip_file_scheme, to_fsspec

log = logging.getLogger(__name__)


@dataclass
class PatchFeatures:
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64, level-0 top-left (x, y)
    patch_size_level0: int | None
    slide_id: str

    def __len__(self) -> int:
        return int(self.features.shape[0])


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


def file_step(pf: PatchFeatures) -> int:
    """The step of a feature file's grid: detected from its coordinates; the file's own
    patch size only where they cannot tell (a single patch). Feature files' size attributes
    are not always the spacing (the CARE authors' file: size 1024, spacing 512)."""
    step = detect_step(pf.coords)  # 1: a single position, nothing to tell
    if step == 1:
        return int(pf.patch_size_level0 or 1)
    if pf.patch_size_level0 and step != pf.patch_size_level0:
        log.info("%s: patches are %d level-0 px apart, the file says size %d: using %d",
                 pf.slide_id, step, pf.patch_size_level0, step)
    return step


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


# -------------------------------------------------------------------------------- readers

def _slide_id(uri: str) -> str:
    name = PurePosixPath(strip_file_scheme(str(uri)).rstrip("/")).name
    for suffix in (".h5", ".hdf5", ".parquet", ".pq", ".npy", ".pkl"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_bytes(uri: str, storage_options: dict[str, Any] | None) -> bytes:
    import fsspec

    path = strip_file_scheme(str(uri))
    try:
        with fsspec.open(path, "rb", **to_fsspec(storage_options, path)) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FeatureFileError(f"{redact(uri)}: no such feature file") from exc
    except OSError as exc:
        raise FeatureFileError(f"{redact(uri)}: cannot read: {redact(exc)}") from exc


def _finish(uri: str, feats: Any, coords: Any, patch_size: Any) -> PatchFeatures:
    feats = np.asarray(feats)
    coords = np.asarray(coords)
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM sometimes keeps a batch axis
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise FeatureFileError(f"{redact(uri)}: features must be a non-empty (N, D) array, "
                               f"got shape {feats.shape}")
    if coords.shape != (feats.shape[0], 2):
        raise FeatureFileError(f"{redact(uri)}: coords shape {coords.shape} does not match "
                               f"{feats.shape[0]} features")
    if not np.issubdtype(feats.dtype, np.number):
        raise FeatureFileError(f"{redact(uri)}: features have non-numeric dtype {feats.dtype}")
    feats = feats.astype(np.float32, copy=False)
    if not np.isfinite(feats).all():
        raise FeatureFileError(f"{redact(uri)}: features contain NaN or inf")
    ps = None if patch_size is None else int(np.asarray(patch_size).reshape(-1)[0])
    return PatchFeatures(feats, np.rint(coords).astype(np.int64), ps, _slide_id(uri))


def _read_h5(uri: str, data: bytes) -> PatchFeatures:
    import h5py

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            for name in ("features", "coords"):
                if name not in f:
                    raise FeatureFileError(f"{redact(uri)}: h5 file has no '{name}' dataset "
                                           f"(has {sorted(f.keys())})")
            feats = f["features"][()]
            coords = f["coords"][()]
            attrs = {**dict(f.attrs), **dict(f["coords"].attrs)}
    except OSError as exc:
        raise FeatureFileError(f"{redact(uri)}: not a readable HDF5 file: {exc}") from exc
    size = attrs.get("patch_size_level0")
    if size is None and "patch_size" in attrs:
        # CLAM writes patch_size at patch_level; level-0 size needs the downsample.
        level = int(np.asarray(attrs.get("patch_level", 0)).reshape(-1)[0])
        down = attrs.get("downsample")
        if level == 0:
            size = attrs["patch_size"]
        elif down is not None:
            size = round(float(np.asarray(attrs["patch_size"]).reshape(-1)[0])
                         * float(np.asarray(down).reshape(-1)[0]))
    return _finish(uri, feats, coords, size)


def _read_parquet(uri: str, data: bytes) -> PatchFeatures:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FeatureFileError(f"{redact(uri)}: not a readable Parquet file: {exc}") from exc
    cols = set(table.column_names)
    fcol = next((c for c in ("feature", "features", "embedding") if c in cols), None)
    if fcol is None or not {"x", "y"} <= cols:
        raise FeatureFileError(f"{redact(uri)}: Parquet needs columns x, y and one of "
                               f"feature/features/embedding; has {sorted(cols)}")
    col = table.column(fcol).combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_fixed_size_list(col.type) \
            and not pa.types.is_large_list(col.type):
        raise FeatureFileError(f"{redact(uri)}: column {fcol} must be a list of floats, got "
                               f"{col.type}")
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if n == 0 or flat.size % n:
        raise FeatureFileError(f"{redact(uri)}: column {fcol} has rows of different lengths "
                               "or no rows")
    feats = flat.reshape(n, flat.size // n)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    size = None
    if "patch_size_level0" in cols:
        size = table.column("patch_size_level0").to_numpy()[:1]
    elif table.schema.metadata and b"patch_size_level0" in table.schema.metadata:
        size = int(table.schema.metadata[b"patch_size_level0"])
    return _finish(uri, feats, coords, size)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, str/bytes/numbers and numpy arrays; nothing callable else."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
    })

    def __init__(self, data: bytes, uri: str):
        super().__init__(io.BytesIO(data))
        self.uri = uri

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise FeatureFileError(
            f"{redact(self.uri)}: refused to unpickle {module}.{name}: only plain containers, "
            "strings, numbers and numpy arrays are allowed in feature files"
        )


def _restricted_load(data: bytes, uri: str) -> Any:
    try:
        return _RestrictedUnpickler(data, uri).load()
    except FeatureFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError) as exc:
        raise FeatureFileError(f"{redact(uri)}: corrupt pickle: {exc}") from exc


_INDEX_RE = re.compile(r"^(-?\d+)_(-?\d+)(?:_(\d+))?(?:\.\w+)?$")


def _read_care_npy(uri: str, data: bytes) -> PatchFeatures:
    if data[:6] == b"\x93NUMPY":
        # np.save(dict) stores an object array whose payload is a pickle; plain arrays load
        # without any pickle at all.
        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        try:
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        except ValueError as exc:
            raise FeatureFileError(f"{redact(uri)}: bad .npy header: {exc}") from exc
        if not dtype.hasobject:
            raise FeatureFileError(f"{redact(uri)}: plain {shape} array without coordinates; "
                                   "expected the CARE dict (feature, index)")
        obj = _restricted_load(data[buf.tell():], uri)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
    else:
        obj = _restricted_load(data, uri)
    if not isinstance(obj, dict) or "feature" not in obj or "index" not in obj:
        raise FeatureFileError(f"{redact(uri)}: expected a dict with 'feature' and 'index', got "
                               f"{type(obj).__name__}"
                               + (f" with keys {sorted(map(str, obj))}"
                                  if isinstance(obj, dict) else ""))
    index = [str(s) for s in obj["index"]]
    xs, ys, sizes = [], [], []
    for s in index:
        m = _INDEX_RE.match(PurePosixPath(s).name)
        if m is None:
            raise FeatureFileError(f"{redact(uri)}: index entry {s!r} is not '{{x}}_{{y}}_"
                                   "{size}.png'")
        xs.append(int(m.group(1)))
        ys.append(int(m.group(2)))
        if m.group(3) is not None:
            sizes.append(int(m.group(3)))
    size = int(np.bincount(sizes).argmax()) if sizes else None
    return _finish(uri, obj["feature"], np.stack([xs, ys], axis=1), size)


_READERS = {"h5": _read_h5, "parquet": _read_parquet, "npy": _read_care_npy}
_SUFFIX = {".h5": "h5", ".hdf5": "h5", ".parquet": "parquet", ".pq": "parquet",
           ".npy": "npy", ".pkl": "npy"}


def read_patch_features(
    uri: str, *, storage_options: dict[str, Any] | None = None,
    format: Literal["auto", "h5", "parquet", "npy"] = "auto",
) -> PatchFeatures:
    """Read patch features + level-0 coordinates from a CLAM/TRIDENT .h5, Parquet or CARE .npy
    (local path or fsspec URI)."""
    if format == "auto":
        suffix = PurePosixPath(strip_file_scheme(str(uri))).suffix.lower()
        if suffix not in _SUFFIX:
            raise FeatureFileError(f"{redact(uri)}: unknown feature file type {suffix!r}; "
                                   "use .h5, .parquet or .npy (or pass format=)")
        format = _SUFFIX[suffix]
    if format not in _READERS:
        raise FeatureFileError(f"{redact(uri)}: unknown format {format!r}")
    return _READERS[format](uri, _read_bytes(uri, storage_options))
