"""The ``patches`` table out to per-slide CLAM / TRIDENT feature files.

Users feed their existing MIL code (CLAM, TRIDENT's slide encoders, Patho-Bench, eva) from
files, one per slide. Two layouts:

- ``h5`` (TRIDENT's ``features_<encoder>/<slide>.h5``, CLAM's ``h5_files``): datasets
  ``features`` (N, D) float32 and ``coords`` (N, 2) int64, level-0 top-left pixels, in
  row-major scan order (TRIDENT's default patcher order). ``coords`` carries the attributes
  TRIDENT's ``coords_to_h5`` writes (``patch_size`` at the target magnification,
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
  ``name``, ``savetodir``, ``level0_width``, ``level0_height``), which its readers need to
  rebuild the patcher; ``features`` carries ``name``, ``savetodir``, ``encoder``, as
  TRIDENT's ``extract_features`` writes them. Magnifications follow TRIDENT's rounding of
  MPP (``trident_magnification``). Attributes we cannot know (a slide embedded from feature
  files has no MPP) are left out rather than written as guesses.
- ``pt`` (CLAM's ``pt_files``): ``torch.save`` of the (N, D) float32 tensor, same row order.

Only slides with a ``slides`` row are exported: that row is written last and marks a slide
complete (a crashed run may have left patches of an unfinished slide). The output folder is
never emptied; existing files are refused unless ``overwrite=True``, checked for every slide
before the first file is written, so a refused export writes nothing. Each file is written
whole (local: beside, then renamed; object stores: one PUT).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from care_scale.exceptions import FeatureFileError, TableError
from care_scale.storage import join, redact, url_to_fs, write_bytes
from care_scale.warehouse.versions import pick_model_version
from care_scale.warehouse.writer import Warehouse

log = logging.getLogger(__name__)

FeatureFormat = Literal["h5", "pt"]
_SLIDE_COLUMNS = ["slide_id", "model_version", "width", "height", "mpp", "target_mpp",
                  "patch_size", "patch_size_level0", "patch_encoder_version"]


@dataclass(frozen=True)
class ExportedFile:
    slide_id: str
    uri: str
    num_patches: int


@dataclass
class ExportReport:
    model_version: str
    files: list[ExportedFile] = field(default_factory=list)
    #: Slides of the ``slides`` table with no ``patches`` rows (embedded without
    #: ``--keep-patches``), skipped with a warning when no slide was asked for by name.
    without_patches: list[str] = field(default_factory=list)


def trident_magnification(mpp: float | None) -> int | None:
    """TRIDENT's magnification of a pixel size (``WSI._fetch_magnification``: 0.25 um/px ->
    40, 0.5 -> 20); None for no MPP or one outside its table (> 2.4 um/px)."""
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return None
    from care_scale.trident import MAG_BUCKETS

    for bound, mag in MAG_BUCKETS:
        if mpp < bound:
            return mag
    return None


def coords_attributes(slide: dict[str, Any], *, patch_size_level0: int | None,
                      savetodir: str) -> dict[str, Any]:
    """The ``coords`` attributes of TRIDENT's ``coords_to_h5`` for one ``slides`` row."""
    attrs: dict[str, Any] = {
        "patch_size": slide.get("patch_size"),
        "patch_size_level0": patch_size_level0 or slide.get("patch_size_level0"),
        "level0_magnification": trident_magnification(slide.get("mpp")),
        "target_magnification": trident_magnification(slide.get("target_mpp")),
        "overlap": 0,  # our grids never overlap
        "name": slide["slide_id"],
        "savetodir": savetodir,
        "level0_width": slide.get("width"),
        "level0_height": slide.get("height"),
    }
    return {k: (int(v) if isinstance(v, (int, np.integer)) else v)
            for k, v in attrs.items() if v is not None}


def _h5_bytes(features: np.ndarray, coords: np.ndarray, coords_attrs: dict[str, Any],
              features_attrs: dict[str, Any]) -> bytes:
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fd = f.create_dataset("features", data=features)
        cd = f.create_dataset("coords", data=coords)
        for k, v in coords_attrs.items():
            cd.attrs[k] = v
        for k, v in features_attrs.items():
            fd.attrs[k] = v
    return buf.getvalue()


def _pt_bytes(features: np.ndarray) -> bytes:
    import torch

    buf = io.BytesIO()
    # A plain tensor: CLAM's loaders and torch.load(weights_only=True) read it back.
    torch.save(torch.from_numpy(np.ascontiguousarray(features)), buf)
    return buf.getvalue()


def _slide_filter(slide_id: str, model_version: str) -> Any:
    import pyarrow.compute as pc

    return (pc.field("slide_id") == slide_id) & (pc.field("model_version") == model_version)


def _has_patches(dataset: Any, slide_id: str, model_version: str) -> bool:
    return dataset.count_rows(filter=_slide_filter(slide_id, model_version)) > 0


def _slide_patches(dataset: Any, slide_id: str, model_version: str
                   ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """One slide's features (N, D) float32, coords (N, 2) int64 in row-major order, and its
    most common level-0 patch size."""
    t = dataset.to_table(columns=["x", "y", "patch_size_level0", "feature"],
                         filter=_slide_filter(slide_id, model_version))
    if t.num_rows == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 2), np.int64), None
    x = t.column("x").to_numpy()
    y = t.column("y").to_numpy()
    order = np.lexsort((x, y))  # row-major: by y, then x (TRIDENT's default scan order)
    col = t.column("feature").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    feats = flat.reshape(t.num_rows, -1)[order].astype(np.float32, copy=False)
    coords = np.stack([x, y], axis=1)[order].astype(np.int64, copy=False)
    sizes = [s for s in t.column("patch_size_level0").to_pylist() if s is not None]
    size = Counter(sizes).most_common(1)[0][0] if sizes else None
    return np.ascontiguousarray(feats), np.ascontiguousarray(coords), size


def export_features(warehouse: str, out: str, *, format: FeatureFormat = "h5",
                    slides: list[str] | None = None, model_version: str | None = None,
                    overwrite: bool = False,
                    storage_options: dict[str, Any] | None = None) -> ExportReport:
    """Write one ``<slide_id>.h5`` / ``.pt`` per slide from the ``patches`` table into ``out``
    (a folder, local or fsspec URI; created if missing, never emptied).

    ``slides``: only these (each must have patches; an error names those that do not);
    ``model_version``: required when the tables hold several; ``overwrite``: replace existing
    files (otherwise any existing target file is an error and nothing is written).
    """
    if format not in ("h5", "pt"):
        raise FeatureFileError(f"{redact(out)}: unknown format {format!r}; use h5 or pt")
    wh = Warehouse(warehouse, storage_options=storage_options)
    patches_dt = wh.open("patches")
    if patches_dt is None:
        raise TableError("patches", f"no table at {redact(wh.table_uri('patches'))}: embed with "
                                    "--keep-patches to keep patch features")
    slides_dt = wh.open("slides")
    if slides_dt is None:
        raise TableError("slides", f"no table at {redact(wh.table_uri('slides'))}")
    rows = slides_dt.to_pyarrow_table(columns=_SLIDE_COLUMNS).to_pylist()
    mv = pick_model_version((r["model_version"] for r in rows), model_version, table="slides")
    by_id = {r["slide_id"]: r for r in rows if r["model_version"] == mv}
    if slides:
        unknown = [s for s in slides if s not in by_id]
        if unknown:
            raise TableError("slides", f"no complete slide {', '.join(map(repr, unknown))} of "
                                       f"model version {mv}")
        wanted = list(dict.fromkeys(slides))
    else:
        wanted = sorted(by_id)
    for sid in wanted:
        # A slide id becomes a file name: no folder separators or relative parts in it.
        if "/" in sid or "\\" in sid or sid in ("", ".", ".."):
            raise FeatureFileError(f"slide id {sid!r} cannot be a file name")

    dataset = patches_dt.to_pyarrow_dataset()
    if slides:
        # Asked for by name: a slide without patches is an error before anything is written.
        bare = [s for s in wanted if not _has_patches(dataset, s, mv)]
        if bare:
            raise TableError("patches", f"no patch rows for {', '.join(bare)} (model version "
                                        f"{mv}): embedded without --keep-patches")

    fs, root = url_to_fs(out, storage_options)
    targets = {sid: join(out, f"{sid}.{format}") for sid in wanted}
    if not overwrite:
        existing = [t for sid, t in targets.items() if fs.exists(join(root, f"{sid}.{format}"))]
        if existing:
            shown = ", ".join(redact(t) for t in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise FeatureFileError(f"{redact(out)}: {len(existing)} file(s) exist already "
                                   f"({shown}{more}); pass --overwrite to replace them")
    fs.makedirs(root, exist_ok=True)

    report = ExportReport(model_version=mv)
    for sid in wanted:
        feats, coords, size = _slide_patches(dataset, sid, mv)
        if len(feats) == 0:
            report.without_patches.append(sid)
            continue
        slide = by_id[sid]
        if format == "h5":
            data = _h5_bytes(
                feats, coords,
                coords_attributes(slide, patch_size_level0=size, savetodir=str(out)),
                {"name": sid, "savetodir": str(out),
                 "encoder": slide.get("patch_encoder_version") or "unknown",
                 "care_scale_model_version": mv})
        else:
            data = _pt_bytes(feats)
        write_bytes(targets[sid], data, storage_options)
        report.files.append(ExportedFile(sid, targets[sid], len(feats)))
    if report.without_patches:
        log.warning("%d slide(s) have no patch rows (embedded without --keep-patches), not "
                    "exported: %s", len(report.without_patches),
                    ", ".join(report.without_patches[:5]))
    return report
