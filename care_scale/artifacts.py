"""The export artifact format: directories on local paths and fsspec URIs (s3://, gs://, ...).

A leaf module (it imports only storage and exceptions) because two sides share the format:
``care_scale.export`` writes artifact directories, ``care_scale.inference`` reads them, and
neither may import the other's package for it (the package graph has no cycle).

One exported model is one directory::

    <out>/
      manifest.json                  what is inside, versions, parity figures (this module)
      model.onnx                     ONNX graph with metadata_props (export/onnx_export.py)
      model.int8.onnx                optional int8 (dynamic, per-channel) variant
      tensorrt/<engine key>.engine   TensorRT engines, one per GPU arch x TensorRT version
      tensorrt/<engine key>.cache    their timing caches (speed up the next build on that GPU)

Files are written locally first and uploaded afterwards; the manifest goes last, so a reader
never sees a manifest that names files which are not there yet. Remote directories are read by
staging the files a backend needs into a local cache directory (ONNX Runtime and TensorRT want
local files), checked against the SHA-256 the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from care_scale.exceptions import ExportError, StorageError
from care_scale.storage import is_remote, join, redact, strip_file_scheme, url_to_fs, write_text

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
#: Model-version suffix of an int8 variant by its weights' bits (export.onnx_export's
#: ``quantize_patch_onnx``: 7 runs on any CPU, 8 needs VNNI / AMX-INT8).
INT8_VERSION_SUFFIX = {7: "+int8", 8: "+int8w8"}
ENGINE_DIR = "tensorrt"
FORMAT = "care-scale-export"
FORMAT_VERSION = 1

ArtifactKind = Literal["patch_encoder", "slide_encoder"]

#: Prefix of care-scale's keys in an ONNX file's metadata_props (written by the exporter,
#: read back by the runtime backends without importing torch or onnx).
META_PREFIX = "care_scale."

#: The CARE graph's inputs, and its outputs with their dynamic axes ("patches", "regions"):
#: the contract between the exported graph, the torch reference and the backends.
SLIDE_INPUTS = ("features", "grid")
SLIDE_OUTPUTS: dict[str, dict[int, str]] = {
    "slide_embedding": {},
    "region_embeddings": {0: "regions"},
    "region_of_patch": {0: "patches"},
    "coverage": {0: "regions"},
    "semantic_weight": {0: "regions"},
    "fused_weight": {0: "regions"},
    "roi_index": {},
    "roi_embedding": {},
    "num_regions": {},
}


@dataclass
class EngineRecord:
    """One TensorRT engine in an artifact directory and the GPU/TensorRT it was built for."""

    file: str
    key: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int
    gpu_name: str = ""
    timing_cache: str | None = None
    sha256: str = ""


@dataclass
class Manifest:
    """``manifest.json``: everything a backend needs to know before loading a file."""

    kind: ArtifactKind
    model: str
    model_version: str
    onnx_file: str = ONNX_FILE
    onnx_sha256: str = ""
    opset: int = 17
    #: registry facts: embed_dim, input_size, mean, std, mpp, patch_size (patch encoder) or the
    #: CARE config (slide encoder).
    spec: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    engines: list[EngineRecord] = field(default_factory=list)
    #: extra graphs of the same model, e.g. {"int8": {"file", "sha256", "model_version"}}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    trained: bool = False
    created_utc: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExportError(f"{redact(source)}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ExportError(f"{redact(source)}: not a care-scale export manifest")
        if int(raw.get("format_version", -1)) > FORMAT_VERSION:
            raise ExportError(
                f"{redact(source)}: manifest format_version {raw.get('format_version')} is "
                f"newer than this care-scale reads ({FORMAT_VERSION}); upgrade care-scale"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExportError(f"{redact(source)}: unknown manifest keys {unknown}")
        raw["engines"] = [EngineRecord(**e) for e in raw.get("engines", [])]
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ExportError(f"{redact(source)}: incomplete manifest ({exc})") from exc


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fs(uri: str, storage_options: dict[str, Any] | None):

    try:
        fs, path = url_to_fs(uri, storage_options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{redact(uri)}: cannot open filesystem ({exc})") from exc
    return fs, path


def upload_dir(local_dir: str | os.PathLike, uri: str, *,
               storage_options: dict[str, Any] | None = None) -> None:
    """Copy a local artifact directory to ``uri`` (local path or fsspec URI), manifest last."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == MANIFEST)  # manifest last: readers never see it early
    if not is_remote(uri):
        dest = Path(strip_file_scheme(uri))
        if dest.resolve() == local_dir.resolve():
            return
        for p in files:
            target = dest / p.relative_to(local_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
        return
    fs, root = _fs(uri, storage_options)
    try:
        for p in files:
            fs.put_file(str(p), f"{root.rstrip('/')}/{p.relative_to(local_dir).as_posix()}")
    except OSError as exc:  # botocore errors surface as OSError/PermissionError through s3fs
        raise StorageError(f"{redact(uri)}: upload failed ({redact(exc)})") from exc


def read_manifest(uri: str, *, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The manifest of an artifact directory (local path or fsspec URI)."""
    src = join(uri, MANIFEST)
    if not is_remote(uri):
        path = Path(strip_file_scheme(src))
        if not path.exists():
            raise ExportError(f"{redact(uri)}: no {MANIFEST}; not an export artifact directory")
        return Manifest.from_json(path.read_text(), source=src)
    fs, path = _fs(src, storage_options)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError as exc:
        raise ExportError(f"{redact(uri)}: no {MANIFEST}; not an export artifact directory") from exc
    except OSError as exc:
        raise StorageError(f"{redact(src)}: cannot read ({redact(exc)})") from exc
    return Manifest.from_json(text, source=src)


def write_manifest(local_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(local_dir) / MANIFEST
    write_text(path, manifest.to_json())
    return path


#: Revision of the patch-encoder graph layout (``care_scale.export.onnx_export``; 2: banded
#: NHWC resize, 3: the entry's resize filter and centre crop), part of
#: the export cache's key: a cache written by an older exporter holds a graph that is
#: correct but slower, and is simply not picked up.
PATCH_GRAPH_REVISION = 3


def export_cache_key(version: str, *, tile_size: int | None = None,
                     variant: str | None = None, int8_weight_bits: int = 7) -> str:
    """The export cache's name for a model version: CARE's is its version; a patch
    encoder's adds tile size, graph revision and variant (``int8``, ``int8w8`` with 8-bit
    weights)."""
    if tile_size is None:
        return version
    if variant == "int8":  # named as its model-version suffix: int8 / int8w8
        variant = INT8_VERSION_SUFFIX[int8_weight_bits].lstrip("+")
    return (f"{version}-t{int(tile_size)}-g{PATCH_GRAPH_REVISION}"
            + ("" if variant is None else f"-{variant}"))


def cached_export_dir(key: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The complete artifact directory the export cache holds under ``key``, else None
    (``care_scale.export.cached_export`` makes them; this only looks, without torch)."""
    target = Path(cache_dir or default_cache_dir()) / "onnx" / key
    return target if (target / MANIFEST).exists() else None


def default_cache_dir() -> Path:
    """Where remote artifacts are staged and on-the-fly exports are kept."""
    root = os.environ.get("CARE_SCALE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "care-scale"
    )
    return Path(root)


def fetch_file(uri: str, rel: str, *, sha256: str | None = None,
               storage_options: dict[str, Any] | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for ``<uri>/<rel>``: the file itself when local, else a verified copy.

    Remote files are cached under ``cache_dir/artifacts/<sha256>``: content-addressed, so a
    changed file at the same URI is downloaded again and an unchanged one never twice.
    """
    src = join(uri, rel)
    if not is_remote(uri):
        path = Path(strip_file_scheme(src))
        if not path.exists():
            raise ExportError(f"{redact(src)}: named in the manifest but missing")
        return path
    if not sha256:
        raise ExportError(f"{redact(src)}: the manifest records no sha256 for it")
    cache = Path(cache_dir or default_cache_dir()) / "artifacts" / sha256
    target = cache / Path(rel).name
    if target.exists() and sha256_file(target) == sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fs, path = _fs(src, storage_options)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    try:
        fs.get_file(path, str(tmp))
    except FileNotFoundError as exc:
        raise ExportError(f"{redact(src)}: named in the manifest but missing") from exc
    except OSError as exc:
        raise StorageError(f"{redact(src)}: download failed ({redact(exc)})") from exc
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{redact(src)}: sha256 {got[:12]}... does not match the manifest "
                          f"({sha256[:12]}...); the artifact was changed after export")
    os.replace(tmp, target)
    return target


def fetch_onnx(uri: str, *, storage_options: dict[str, Any] | None = None,
               cache_dir: str | os.PathLike | None = None,
               variant: str | None = None) -> tuple[Path, Manifest]:
    """Local path of the ONNX file (or of ``variant``, e.g. "int8") of an artifact directory,
    and its manifest."""
    manifest = read_manifest(uri, storage_options=storage_options)
    if variant is None:
        rel, sha = manifest.onnx_file, manifest.onnx_sha256
    elif variant in manifest.variants:
        rel, sha = manifest.variants[variant]["file"], manifest.variants[variant]["sha256"]
    else:
        raise ExportError(f"{redact(uri)}: no {variant} variant in this export (has: "
                          f"{sorted(manifest.variants) or 'none'}); export with --{variant}")
    path = fetch_file(uri, rel, sha256=sha, storage_options=storage_options,
                      cache_dir=cache_dir)
    return path, manifest
