"""Open any whole-slide image, local or remote, behind one interface.

    from care_scale.slides import open_slide
    with open_slide("s3://bucket/a.svs", storage_options=opts, cache=cache) as slide:
        slide.dimensions, slide.mpp_x, slide.backend
        tiles = slide.read_regions(coords, (224, 224), level=0, num_workers=2)

Backends are tried in ``BACKENDS`` order (cuCIM, OpenSlide, tifffile); a backend that cannot
read a format (MRXS, NDPI, DICOM are OpenSlide's; stripped TIFF is tifffile's) hands over to
the next. cuCIM is an optional extra (``pip install 'care-scale[cucim]'``): without it ``auto``
simply leaves it out, and asking for it by name raises BackendUnavailableError. One
exception, measured: decoding on the CPU, tiled SVS, OME-TIFF and generic pyramidal TIFF go
to tifffile first (see ``TIFFFILE_FIRST``). Bad input raises the specific
:mod:`care_scale.exceptions` class, never a backend's own traceback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from care_scale.exceptions import (
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from care_scale.slides.base import (
    BackendCannotRead,
    Slide,
    TiffInfo,
    dicom_reason,
    inspect_tiff,
    is_dicom,
    is_tiff,
)
from care_scale.slides.cache import SlideCache, stat_uri
from care_scale.storage import is_remote, redact, strip_file_scheme

__all__ = ["BACKENDS", "SLIDE_EXTENSIONS", "Slide", "SlideCache", "backend_available",
           "open_slide", "require_backend", "stat_uri"]

BackendName = Literal["auto", "cucim", "openslide", "tifffile"]


def _cucim() -> type[Slide]:
    from care_scale.slides.cucim_backend import CuCIMSlide

    return CuCIMSlide


def _openslide() -> type[Slide]:
    from care_scale.slides.openslide_backend import OpenSlideSlide

    return OpenSlideSlide


def _tifffile() -> type[Slide]:
    from care_scale.slides.tifffile_backend import TiffFileSlide

    return TiffFileSlide


# name -> loader of the backend class, in "auto" order. Loaders keep imports lazy.
BACKENDS: dict[str, Callable[[], type[Slide]]] = {
    "cucim": _cucim,
    "openslide": _openslide,
    "tifffile": _tifffile,
}

# Backends whose library is an optional extra: name -> (module to import, pip extra). Checked
# with importlib.util.find_spec, which does not import the (heavy, CuPy-pulling) module.
OPTIONAL_BACKENDS: dict[str, tuple[str, str]] = {"cucim": ("cucim", "cucim")}


def backend_available(name: str) -> bool:
    """Whether the backend's library is installed (always true for the required ones)."""
    if name not in OPTIONAL_BACKENDS:
        return name in BACKENDS
    return importlib.util.find_spec(OPTIONAL_BACKENDS[name][0]) is not None


def require_backend(name: str) -> None:
    """Raise BackendUnavailableError, with the install command, when ``name`` is missing."""
    if name in OPTIONAL_BACKENDS and not backend_available(name):
        module, extra = OPTIONAL_BACKENDS[name]
        raise BackendUnavailableError(
            f"slide backend {name!r} needs the {module!r} package, which is not installed: "
            f"pip install 'care-scale[{extra}]' (or use slide backend auto, which reads "
            "slides without it)")


# Tiled TIFF flavours whose geometry tifffile reads exactly (no vendor XML, no overlapping or
# JPEG-restart-marker tiles). Decoding on the CPU, ``auto`` opens them with tifffile first: it
# decodes each stored tile a batch needs once, on its own threads, and cuts the regions out;
# on 224 px tiles of 256 px JPEG tiles that is 0.97 CPU-ms per tile against cuCIM's 1.62 and
# OpenSlide's 2.15 (same pixels, benchmarks/bench_decode.py), CPU that the patch encoder gets
# instead when both share a node's cores; and a damaged tile raises where cuCIM's CPU path
# fills it with blank pixels. cuCIM keeps GPU decoding (``device="cuda"``).
TIFFFILE_FIRST = frozenset({"svs", "ome", "generic"})

# Extensions of slide formats: a file with one of these names that no backend can read is a
# damaged slide (CorruptSlideError), anything else is a format we do not read.
# The one list: the embedding job's folder listing uses it too.
SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu",
                              ".bif", ".svslide", ".dcm", ".btf", ".tf2", ".tf8", ".qptiff"})
# Formats that are TIFF containers: such a file must start with a TIFF header.
TIFF_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".btf", ".tf2",
                             ".tf8", ".qptiff"})


def open_slide(uri: str | os.PathLike, *, storage_options: dict[str, Any] | None = None,
               cache: SlideCache | None = None, backend: BackendName = "auto",
               mpp_override: float | None = None,
               device: Literal["cpu", "cuda"] = "cpu") -> Slide:
    """Open a slide (local path or fsspec URI) with the first backend that can read it.

    Remote slides are staged through ``cache`` (a private temporary cache, removed on close,
    when none is given). ``device="cuda"`` decodes with cuCIM on the GPU (nvJPEG) and returns
    host arrays; it needs a CUDA device and the cuCIM backend. Raises SlideNotFoundError,
    CorruptSlideError, UnsupportedFormatError, NotBrightfieldError or StorageError, each naming
    the slide (credentials redacted); ConfigError for invalid arguments, its subclass
    BackendUnavailableError when the backend asked for (or ``device="cuda"``) needs cuCIM and
    cuCIM is not installed.
    """
    uri = str(uri)
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}; choose auto or one of "
                          f"{sorted(BACKENDS)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if backend not in ("auto", "cucim"):
            raise ConfigError(f"GPU decoding is cuCIM's; backend={backend!r} decodes on the CPU")
        require_backend("cucim")
        if not _cuda_available():
            raise ConfigError("device='cuda' asked for, but no CUDA device is present")
        backend = "cucim"
    elif backend != "auto":
        require_backend(backend)
    if mpp_override is not None and not mpp_override > 0:
        raise ConfigError(f"mpp_override must be > 0, got {mpp_override}")
    on_close: Callable[[], None] | None = None
    if is_remote(uri):
        own_cache = cache is None
        if own_cache:
            cache = SlideCache(tempfile.mkdtemp(prefix="care-scale-slide-"),
                               max_bytes=1 << 50, remove_after_use=True)
        try:
            entry = cache.fetch(uri, storage_options=storage_options)
        except BaseException:
            if own_cache:
                shutil.rmtree(cache.root, ignore_errors=True)
            raise
        local = entry.path

        def on_close(cache: SlideCache = cache, path: Path = local) -> None:
            cache.release(path)
            if own_cache:
                shutil.rmtree(cache.root, ignore_errors=True)
    else:
        local = Path(strip_file_scheme(uri)).expanduser()
    try:
        return _open_local(uri, str(local), backend=backend, mpp_override=mpp_override,
                           on_close=on_close, device=device)
    except BaseException:
        if on_close is not None:
            on_close()
        raise


def _open_local(uri: str, path: str, *, backend: BackendName, mpp_override: float | None,
                on_close: Callable[[], None] | None, device: str = "cpu") -> Slide:
    if not os.path.exists(path):
        raise SlideNotFoundError(redact(uri))
    if os.path.isdir(path):
        raise UnsupportedFormatError(redact(uri), "is a directory, not a slide file")
    if os.path.getsize(path) == 0:
        raise CorruptSlideError(redact(uri), "empty file (0 bytes)")
    tiff_info: TiffInfo | None = None
    ext = Path(path).suffix.lower()
    if ext in TIFF_EXTENSIONS and not is_tiff(path):
        # Checked before any backend: C libraries print their own complaints on stderr.
        with open(path, "rb") as fh:
            head = fh.read(4)
        raise CorruptSlideError(
            redact(uri), f"has a {ext} name but is not a TIFF file (starts with {head!r}): "
            "damaged, truncated at the start, or not a slide at all")
    if is_tiff(path):
        # Header checks first: truncation and non-brightfield data are reported as such, not
        # as whatever a C decoder happens to say about them.
        tiff_info = inspect_tiff(uri, path)
    if backend == "auto":
        names = [n for n in _auto_order(tiff_info, device) if backend_available(n)]
    else:
        names = [backend]
    reasons: list[str] = []
    decode_failed = False
    for name in names:
        cls = BACKENDS[name]()
        try:
            slide = cls(uri, path, mpp_override=mpp_override, tiff_info=tiff_info,
                        on_close=on_close, device=device)
        except BackendCannotRead as exc:
            reasons.append(f"{name}: {redact(exc)}")
            continue
        try:
            _probe(slide)
        except CorruptSlideError as exc:
            # Another backend may decode what this one cannot (e.g. an unusual codec).
            slide._on_close = None
            slide.close()
            # "codec not supported" is the backend's limit, not damage to the file.
            decode_failed |= "support" not in exc.reason.lower()
            reasons.append(f"{name}: {exc.reason}")
            continue
        return slide
    why = "; ".join(reasons)
    if tiff_info is None and is_dicom(path):
        # Its header parsed as DICOM: not damage, but an instance that is not a WSM one.
        raise UnsupportedFormatError(redact(uri), dicom_reason(reasons))
    if decode_failed:
        # A backend understood the structure but its pixel data does not decode.
        raise CorruptSlideError(redact(uri), f"pixel data cannot be decoded ({why})")
    if tiff_info is None and ext in SLIDE_EXTENSIONS:
        raise CorruptSlideError(
            redact(uri), f"has a {ext} name but is damaged or not a slide at all ({why})")
    what = "TIFF layout" if tiff_info is not None else "format"
    raise UnsupportedFormatError(redact(uri), f"not a slide {what} the "
                                 f"{'backends' if backend == 'auto' else backend + ' backend'} "
                                 f"can read ({why})")


def _auto_order(info: TiffInfo | None, device: str) -> list[str]:
    """Backends ``auto`` tries, in order (see ``TIFFFILE_FIRST``)."""
    if device == "cpu" and info is not None and info.tiled and info.layout in TIFFFILE_FIRST:
        return ["tifffile", *(name for name in BACKENDS if name != "tifffile")]
    return list(BACKENDS)


def _cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except (ImportError, RuntimeError):  # CUDARuntimeError without a driver is a RuntimeError
        return False


def _probe(slide: Slide) -> None:
    """Decode one small region so damaged pixel data fails here, once, with a clear reason."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    x, y = (w // 2, h // 2)
    slide.read_region(level, int(x * ds), int(y * ds), min(16, w), min(16, h))
