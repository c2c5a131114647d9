"""Patch-feature files users already have (grid positions: ``care_scale.patch_grid``).

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

from care_scale.exceptions import FeatureFileError

# Grid positions live in a torch-free leaf module (the ONNX backends use them too); these
# names stay importable from here and from care_scale.models.
from care_scale.patch_grid import COMMON_STEPS, coords_to_grid, detect_step  # noqa: F401
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
