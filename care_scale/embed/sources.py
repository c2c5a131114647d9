"""Where the slides of a job come from: a folder, a URI prefix/glob, or a manifest file.

``list_sources(source, ...)`` turns the user's SOURCE into a sorted list of
:class:`SlideSource` rows with stable, unique slide ids:

- a local folder or ``s3://bucket/prefix/``: every file below it with a slide extension
  (or a feature-file extension with ``features=True``);
- a glob (``s3://bucket/cohort/*.svs``, ``/data/**/*.ndpi``): the matching files;
- a manifest (``.csv`` / ``.parquet`` file) with columns ``uri`` (required; relative paths are
  resolved against the manifest's folder), ``slide_id`` (optional: derived from the file name
  when absent or empty), ``mpp`` (optional; empty means "use the file's metadata"),
  ``cohort`` (optional), ``annotations`` (optional: a QuPath/GeoJSON file restricting tiling,
  ``care_scale.annotations``); every other column is carried as string metadata into the slides table.

Slide ids are the file stem (``TCGA-XX.svs`` -> ``TCGA-XX``). When two listed files share a stem
(``a/x.svs``, ``b/x.svs``), both get their path relative to the listing root with ``/`` replaced
by ``__`` (``a__x``, ``b__x``): deterministic, so a re-run finds the same ids. In a manifest,
a repeated ``slide_id`` is an error naming the repeated ids.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from care_scale.exceptions import ConfigError
from care_scale.slides import SLIDE_EXTENSIONS as _SLIDE_EXTENSIONS
from care_scale.storage import check_no_userinfo, is_remote, redact, strip_file_scheme, url_to_fs

SLIDE_EXTENSIONS = tuple(sorted(_SLIDE_EXTENSIONS))  # defined once, by the slide layer
FEATURE_EXTENSIONS = (".h5", ".hdf5", ".parquet", ".npy")
MANIFEST_EXTENSIONS = (".csv", ".parquet")
# Multi-part extensions stripped whole when deriving a slide id from a file name.
_DOUBLE_EXTENSIONS = (".ome.tiff", ".ome.tif")
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class SlideSource:
    """One input of the job: a slide (or a patch-feature file) and what the user said of it."""

    slide_id: str
    uri: str
    mpp: float | None = None
    cohort: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    annotations: str | None = None  # the manifest's annotation file (care_scale.annotations)

    def to_row(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id,
            "uri": self.uri,
            "mpp": self.mpp,
            "cohort": self.cohort,
            "metadata": dict(self.metadata),
            "annotations": self.annotations,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SlideSource:
        mpp = row.get("mpp")
        return cls(
            slide_id=str(row["slide_id"]),
            uri=str(row["uri"]),
            mpp=None if mpp is None or math.isnan(float(mpp)) else float(mpp),
            cohort=row.get("cohort") or None,
            metadata=dict(row.get("metadata") or {}),
            annotations=row.get("annotations") or None,
        )


def stem(uri: str) -> str:
    """File name without its (possibly double) extension."""
    name = posixpath.basename(str(uri).rstrip("/"))
    lower = name.lower()
    for ext in _DOUBLE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    root, _ = posixpath.splitext(name)
    return root or name


def _full_uri(fs: Any, path: str, like: str) -> str:
    """Give a listed path back its scheme (fsspec strips ``s3://``)."""
    if is_remote(like):
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        scheme = like.split("://", 1)[0] if "://" in like else protocol
        return f"{scheme}://{path}"
    return path


def is_manifest(source: str) -> bool:
    return str(source).lower().endswith(MANIFEST_EXTENSIONS) and not any(
        c in str(source) for c in _GLOB_CHARS
    )


@dataclass
class Listing:
    """What a SOURCE holds: the inputs to embed, and the files of a folder that are not
    inputs, each with the reason (so every file is accounted for in the run summary)."""

    sources: list[SlideSource]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)


def list_sources(
    source: str,
    *,
    features: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[SlideSource]:
    """All inputs named by ``source`` (folder, prefix, glob or manifest), sorted by slide id.

    A Parquet *manifest* and a Parquet *feature file* share the extension: with
    ``features=True`` a single ``.parquet`` file whose columns include ``uri`` is a manifest,
    otherwise it is one feature file.
    """
    return scan_source(source, features=features, storage_options=storage_options).sources


def scan_source(
    source: str,
    *,
    features: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Listing:
    """:func:`list_sources`, plus the folder's files that are not inputs and why."""
    source = str(source)
    if not source:
        raise ConfigError("no slide source given")
    extensions = FEATURE_EXTENSIONS if features else SLIDE_EXTENSIONS
    if is_manifest(source) and (not features or _looks_like_manifest(source, storage_options)):
        return Listing(read_manifest(source, features=features,
                                     storage_options=storage_options))
    fs, path = url_to_fs(source, storage_options)
    ignored: list[tuple[str, str]] = []
    if any(c in source for c in _GLOB_CHARS):
        root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        root = root if root.endswith("/") else posixpath.dirname(root)
        paths = [p for p in fs.glob(path) if not fs.isdir(p)]
    elif fs.isdir(path):
        root = path
        found = fs.find(path)
        paths = [p for p in found if p.lower().endswith(extensions)]
        ignored = _not_inputs(fs, source, found, paths, extensions, features)
    elif fs.exists(path):
        root = posixpath.dirname(path)
        paths = [path]
    else:
        raise ConfigError(f"slide source {redact(source)} does not exist")
    if not paths:
        kind = "feature files" if features else "slides"
        raise ConfigError(
            f"slide source {redact(source)} holds no {kind} (extensions {', '.join(extensions)})"
        )
    if not features:
        paths = one_per_dicom_series(paths)
    paths = sorted(paths)
    uris = [_full_uri(fs, p, source) for p in paths]
    rels = [posixpath.relpath(p, root.rstrip("/") or "/") for p in paths]
    # A DICOM series is named by its folder (its file names are UIDs or "level-0.dcm"), when
    # the folder holds nothing but .dcm files; a lone .dcm among other slides by its stem.
    series = _dicom_series_folders(paths)
    named = [posixpath.dirname(u) if posixpath.dirname(p) in series else u
             for u, p in zip(uris, paths)]
    named_rels = [posixpath.dirname(r) if posixpath.dirname(p) in series else r
                  for r, p in zip(rels, paths)]
    ids = unique_ids(named, named_rels)
    return Listing(sorted((SlideSource(slide_id=i, uri=u) for i, u in zip(ids, uris)),
                          key=lambda s: s.slide_id), ignored)


def _dicom_series_folders(paths: list[str]) -> set[str]:
    """Folders whose listed inputs are all .dcm files: one DICOM WSI each."""
    kinds: dict[str, set[bool]] = {}
    for p in paths:
        kinds.setdefault(posixpath.dirname(p), set()).add(p.lower().endswith(".dcm"))
    return {folder for folder, k in kinds.items() if k == {True}}


def _not_inputs(fs: Any, source: str, found: list[str], inputs: list[str],
                extensions: tuple[str, ...], features: bool) -> list[tuple[str, str]]:
    """Files of a folder that are not embedded, and why (``inputs``: before one .dcm per
    series is kept, so further files of a series are inputs here). Files inside a MRXS
    slide's data folder (``<stem>/`` beside ``<stem>.mrxs``) belong to that slide; hidden files
    are not reported."""
    # Sets: a cohort folder holds 100,000s of files.
    mrxs = {p[: -len(".mrxs")] for p in inputs if p.lower().endswith(".mrxs")}
    wanted = set(inputs)
    other = FEATURE_EXTENSIONS if not features else SLIDE_EXTENSIONS
    out = []
    for p in found:
        if p in wanted or posixpath.basename(p).startswith("."):
            continue
        if posixpath.dirname(p) in mrxs:
            continue  # the data of a MRXS slide
        if p.lower().endswith(other):
            why = ("a feature file (run with --features)" if not features
                   else "a slide (run without --features)")
        else:
            why = f"not a {'feature file' if features else 'slide'} type ({', '.join(extensions)})"
        out.append((_full_uri(fs, p, source), why))
    return out


def one_per_dicom_series(paths: list[str]) -> list[str]:
    """Keep one ``.dcm`` file per folder: a DICOM WSI is a folder of files (one per level or
    optical path) that OpenSlide opens as one slide from any of them, so listing every file
    would embed the same slide several times."""
    out, seen = [], set()
    for p in sorted(paths):
        if p.lower().endswith(".dcm"):
            folder = posixpath.dirname(p)
            if folder in seen:
                continue
            seen.add(folder)
        out.append(p)
    return out


def unique_ids(uris: list[str], rel_paths: list[str]) -> list[str]:
    """File stems, with colliding stems replaced by their relative path (``a/x`` -> ``a__x``)."""
    stems = [stem(u) for u in uris]
    counts = Counter(stems)
    ids = []
    for s, rel in zip(stems, rel_paths):
        if counts[s] == 1:
            ids.append(s)
        else:
            parent = posixpath.dirname(rel)
            ids.append(f"{parent}/{s}".strip("/").replace("/", "__"))
    dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
    if dupes:  # same stem in the same folder with different extensions (x.svs, x.tiff)
        ids = [
            i if i not in dupes else f"{i}__{posixpath.splitext(u)[1].lstrip('.').lower()}"
            for i, u in zip(ids, uris)
        ]
    return ids


def _below_common_folder(uris: list[str]) -> list[str]:
    """Each URI's path below the folder all of them share (``/d/a/x.svs``, ``/d/b/x.svs`` ->
    ``a/x.svs``, ``b/x.svs``), so colliding stems in a manifest get ids as in a folder
    listing."""
    dirs = [u.split("/")[:-1] for u in uris]
    common = dirs[0]
    for d in dirs[1:]:
        n = 0
        while n < min(len(common), len(d)) and common[n] == d[n]:
            n += 1
        common = common[:n]
    return ["/".join(u.split("/")[len(common):]) for u in uris]


def _looks_like_manifest(uri: str, storage_options: dict[str, Any] | None) -> bool:
    if not uri.lower().endswith(".parquet"):
        return True
    import pyarrow.parquet as pq

    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            names = pq.read_schema(fh).names
    except (OSError, ValueError):
        return False
    return "uri" in names


def _read_table(uri: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise ConfigError(f"manifest {redact(uri)} does not exist")
    try:
        with fs.open(path, "rb") as fh:
            if path.lower().endswith(".csv"):
                # The csv module keeps every value a string: ids like "001" keep their zeros.
                text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
                rows = [
                    {k: (v if v != "" else None) for k, v in r.items()}
                    for r in csv.DictReader(text)
                ]
                return rows
            else:
                table = pq.read_table(fh)
    except (pa.ArrowInvalid, OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"manifest {redact(uri)} cannot be read: {redact(exc)}") from None
    return table.to_pylist()


def read_manifest(
    uri: str,
    *,
    features: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[SlideSource]:
    """The rows of a CSV/Parquet manifest as :class:`SlideSource` (see the module docstring)."""
    rows = _read_table(uri, storage_options)
    if not rows:
        raise ConfigError(f"manifest {redact(uri)} has no rows")
    columns = list(rows[0])
    if "uri" not in columns:
        raise ConfigError(
            f"manifest {redact(uri)} has no 'uri' column (columns: {', '.join(columns)})"
        )
    # Stored URIs are absolute: a manifest given as a relative path still names the same
    # files from any working directory (and from every Ray worker).
    base = (os.path.dirname(os.path.abspath(strip_file_scheme(uri))) if not is_remote(uri)
            else uri.rsplit("/", 1)[0])
    reserved = {"slide_id", "uri", "mpp", "cohort", "annotations"}
    uris, given_ids, out = [], [], []
    for n, row in enumerate(rows, start=2 if uri.lower().endswith(".csv") else 1):
        slide_uri = (row.get("uri") or "").strip() if isinstance(row.get("uri"), str) else row.get("uri")
        if not slide_uri:
            raise ConfigError(f"manifest {redact(uri)} row {n}: empty uri")
        check_no_userinfo(slide_uri, f"manifest {redact(uri)} row {n}: uri")
        uris.append(_resolve(slide_uri, base, uri))
        sid = row.get("slide_id")
        given_ids.append(str(sid).strip() if sid not in (None, "") else None)
        out.append((row, n))
    derived = unique_ids(uris, _below_common_folder(uris))
    ids = [g if g else d for g, d in zip(given_ids, derived)]
    dupes = sorted(k for k, c in Counter(ids).items() if c > 1)
    if dupes:
        shown = ", ".join(dupes[:20]) + (" ..." if len(dupes) > 20 else "")
        raise ConfigError(f"manifest {redact(uri)} has duplicate slide_id(s): {shown}")
    sources = []
    for sid, slide_uri, (row, n) in zip(ids, uris, out):
        sources.append(
            SlideSource(
                slide_id=sid,
                uri=slide_uri,
                mpp=_parse_mpp(row.get("mpp"), uri, n),
                cohort=(str(row["cohort"]) if row.get("cohort") not in (None, "") else None),
                annotations=_resolve(row.get("annotations"), base, uri),
                metadata={
                    str(k): "" if v is None else str(v)
                    for k, v in row.items()
                    if k not in reserved
                },
            )
        )
    return sorted(sources, key=lambda s: s.slide_id)


def _resolve(value: Any, base: str, manifest: str) -> str | None:
    """A manifest cell naming a file: relative paths are relative to the manifest's folder."""
    if value in (None, "") or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    if is_remote(value) or posixpath.isabs(strip_file_scheme(value)):
        return value
    return (f"{base}/{value}" if is_remote(manifest)
            else posixpath.normpath(posixpath.join(base, value)))


def _parse_mpp(value: Any, uri: str, row: int) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"manifest {redact(uri)} row {row}: mpp {value!r} is not a number") from None
    if math.isnan(mpp):  # a Parquet null float
        return None
    if mpp <= 0:
        raise ConfigError(f"manifest {redact(uri)} row {row}: mpp must be > 0, got {mpp}")
    return mpp
