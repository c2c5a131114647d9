"""The one slide interface every backend implements, and the checks they share.

A backend (one per file: cuCIM, OpenSlide, tifffile) only knows how to open a local file, list
its pyramid levels, collect its vendor properties and decode a region. Everything that must be
the same whatever the backend lives here: MPP / objective-power resolution, the brightfield and
truncation checks done on the TIFF header before any backend touches the pixels, white fill
outside the image, turning decoder errors into :class:`CorruptSlideError`, thumbnails.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from typing_extensions import Self

from care_scale.exceptions import CorruptSlideError, NotBrightfieldError, SlideError
from care_scale.storage import redact

# MPP values outside this range come from placeholder resolution tags (72 dpi, 1 px/cm), not
# from a scanner; we treat them as unknown rather than tile at 350 um/px.
_PLAUSIBLE_MPP = (0.01, 50.0)
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class BackendCannotRead(Exception):
    """Internal: this backend cannot read the file; ``open_slide`` tries the next one."""


def is_tiff(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGICS


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


#: The VL Whole Slide Microscopy attributes a reader needs, by the tag OpenSlide's libdicom
#: names when one is missing (DICOM PS3.3 C.8.12).
DICOM_WSM_TAGS = {
    "00080008": "ImageType (which image of the slide this is: VOLUME, LABEL, OVERVIEW...)",
    "00080016": "SOPClassUID",
    "00280002": "SamplesPerPixel",
    "00280008": "NumberOfFrames",
    "00280010": "Rows",
    "00280011": "Columns",
    "00480006": "TotalPixelMatrixColumns",
    "00480007": "TotalPixelMatrixRows",
    "00209311": "DimensionOrganizationType",
}


def dicom_reason(reasons: list[str]) -> str:
    """Why the backends could not read a DICOM file, in DICOM's own terms where the reader
    said which attribute was missing."""
    import re

    text = "; ".join(reasons)
    tags = [t.upper() for t in re.findall(r"data element '([0-9A-Fa-f]{8})'", text)]
    if "image flavor" in text:  # OpenSlide's words for an instance without ImageType
        tags.insert(0, "00080008")
    missing = [f"({t[:4]},{t[4:]}) {DICOM_WSM_TAGS.get(t, 'an attribute')}"
               for t in dict.fromkeys(tags)]
    if missing:
        return (f"a DICOM file without {', '.join(missing)}, which a VL Whole Slide "
                "Microscopy instance must have; export the slide again from the scanner or "
                f"PACS as a conformant WSM series ({text})")
    return f"a DICOM file that is not a whole-slide image the backends can read ({text})"


@dataclass
class TiffInfo:
    """What the TIFF header says, read once with tifffile before any backend opens the file."""

    dtype: str
    channels: int
    axes: str
    shape: tuple[int, ...]
    properties: dict[str, str] = field(default_factory=dict)
    # tifffile's reading of the container: "svs", "ome", "ndpi", "scn", "bif", "philips",
    # "qpi" or "generic"; and whether the full-resolution level is stored in tiles.
    layout: str = "generic"
    tiled: bool = False


# TIFF flavours tifffile recognises (``TiffFile.is_<name>``), in the order they are tested.
_VENDOR_LAYOUTS = ("svs", "ome", "ndpi", "scn", "bif", "philips", "qpi")


def inspect_tiff(uri: str, path: str) -> TiffInfo:
    """Read the TIFF header; raise for truncated files and for what is not 8-bit RGB.

    Done on the header only (no pixel decode): it costs milliseconds and catches the inputs that
    would otherwise make a C decoder fail deep inside a batched read.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = series.keyframe
            props: dict[str, str] = {}
            for tag in page.tags.values():
                if tag.name in ("ImageDescription", "XResolution", "YResolution",
                                "ResolutionUnit", "Make", "Model", "Software"):
                    value = tag.value
                    if tag.name in ("XResolution", "YResolution") and isinstance(value, tuple):
                        value = value[0] / value[1] if value[1] else 0.0
                    if hasattr(value, "name"):  # enums such as RESUNIT.CENTIMETER
                        value = value.name.lower()
                    props[f"tiff.{tag.name}"] = str(value)
            # tifffile may write its own JSON description first; the vendor's can be second.
            for desc in (page.description, getattr(page, "description1", "")):
                props.update(aperio_properties(desc or ""))
            if tif.is_ome and tif.ome_metadata:
                props.update(_ome_properties(tif.ome_metadata))
            layout = next((name for name in _VENDOR_LAYOUTS if getattr(tif, f"is_{name}", False)),
                          "generic")
            tiled = bool(page.is_tiled)
            axes = series.axes
            shape = tuple(int(s) for s in series.shape)
            dtype = str(series.dtype)
            # Truncation: every level's tile/strip data must lie inside the file.
            size = os.path.getsize(path)
            for level in series.levels:
                for pg in level.pages:
                    if pg is None:
                        continue
                    offsets = np.asarray(getattr(pg, "dataoffsets", ()), np.int64)
                    counts = np.asarray(getattr(pg, "databytecounts", ()), np.int64)
                    if len(offsets) and int((offsets + counts).max()) > size:
                        need = int((offsets + counts).max())
                        raise CorruptSlideError(
                            redact(uri),
                            f"truncated: image data extends to byte {need} but the file has "
                            f"{size} bytes",
                        )
    except SlideError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise CorruptSlideError(redact(uri), f"unreadable TIFF header ({exc})") from None
    # Channel-like axes: C (channel), S (sample), Q/I (unknown / page sequence). Z and T are
    # focal planes and time points of the same image, not channels.
    channels = int(np.prod([s for a, s in zip(axes, shape) if a in "CSQI"] or [1]))
    info = TiffInfo(dtype=dtype, channels=channels, axes=axes, shape=shape, properties=props,
                    layout=layout, tiled=tiled)
    check_brightfield(uri, dtype=info.dtype, channels=info.channels, axes=info.axes)
    return info


def check_brightfield(uri: str, *, dtype: str, channels: int, axes: str = "") -> None:
    """8-bit RGB(A) or nothing: the tissue detector and patch encoders assume brightfield."""
    if dtype != "uint8":
        bits = np.dtype(dtype).itemsize * 8
        kind = "float" if np.dtype(dtype).kind == "f" else "integer"
        raise NotBrightfieldError(
            redact(uri),
            f"{bits}-bit {kind} pixels ({dtype}); brightfield slides are 8-bit RGB "
            "(fluorescence or raw scanner data is not supported)",
        )
    if channels == 1:
        raise NotBrightfieldError(
            redact(uri), "one channel (grayscale or single fluorescence channel); "
            "brightfield slides are 8-bit RGB")
    if channels not in (3, 4):
        raise NotBrightfieldError(
            redact(uri), f"{channels} channels (axes {axes or '?'}): looks like multiplex "
            "fluorescence; brightfield slides are 8-bit RGB")


def aperio_properties(description: str) -> dict[str, str]:
    """``Aperio Image Library ...|AppMag = 20|MPP = 0.4990`` -> ``aperio.AppMag``, ..."""
    out: dict[str, str] = {}
    if description.startswith("Aperio"):
        for part in description.split("|")[1:]:
            if "=" in part:
                k, v = part.split("=", 1)
                out[f"aperio.{k.strip()}"] = v.strip()
    return out


def _ome_properties(xml: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeXUnit", "PhysicalSizeYUnit",
                "NominalMagnification", "SizeC"):
        m = re.search(rf'\b{key}="([^"]+)"', xml)
        if m:
            out[f"ome.{key}"] = m.group(1)
    return out


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def resolve_mpp(props: dict[str, str]) -> tuple[float | None, float | None]:
    """MPP (x, y) in micrometres per pixel from whichever metadata the file has.

    Order: OpenSlide's normalised value, Aperio's ``MPP``, OME ``PhysicalSize``, TIFF
    resolution tags (centimetre or inch units only; ``none`` means "aspect ratio only").
    """
    x, y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    if x is None:
        x = y = _float(props.get("aperio.MPP"))
    if x is None:  # cuCIM's spacing, when it reports micrometres
        x, y = _float(props.get("cucim.mpp-x")), _float(props.get("cucim.mpp-y"))
    if x is None and props.get("ome.PhysicalSizeX"):
        unit = props.get("ome.PhysicalSizeXUnit", "µm")
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit)
        if scale is not None:
            x = (_float(props.get("ome.PhysicalSizeX")) or 0) * scale or None
            y = (_float(props.get("ome.PhysicalSizeY")) or 0) * scale or x
    if x is None:
        unit = str(props.get("tiff.ResolutionUnit", "")).lower()
        per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        xres, yres = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
        if per_unit and xres:
            x = per_unit / xres
            y = per_unit / yres if yres else x
    lo, hi = _PLAUSIBLE_MPP
    if x is None or not lo <= x <= hi:
        return None, None
    if y is None or not lo <= y <= hi:
        y = x
    return float(x), float(y)


def resolve_objective_power(props: dict[str, str]) -> float | None:
    for key in ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens",
                "ome.NominalMagnification"):
        if (v := _float(props.get(key))) is not None:
            return v
    return None


class Slide:
    """One opened whole-slide image, whatever decodes it.

    Coordinates passed to :meth:`read_region` / :meth:`read_regions` are level-0 pixels (top
    left); sizes are in pixels of the level read. Pixels outside the image come back white
    (background), the same for every backend. Above level 0, a location that is not a multiple
    of the level's downsample starts at the level pixel below it (OpenSlide instead
    interpolates a sub-pixel shift). Use as a context manager, or call :meth:`close`.
    """

    name: ClassVar[str] = "base"
    # Exceptions the backend's decoder raises on damaged data (mapped to CorruptSlideError).
    decode_errors: ClassVar[tuple[type[BaseException], ...]] = (RuntimeError, OSError, ValueError)

    def __init__(self, uri: str, local_path: str, *, mpp_override: float | None = None,
                 tiff_info: TiffInfo | None = None, on_close: Callable[[], None] | None = None,
                 device: str = "cpu"):
        self.uri = redact(uri)
        self.device = device  # where decoding happens; only cuCIM decodes on "cuda"
        self.local_path = str(local_path)
        self._mpp_override = mpp_override
        self._tiff_info = tiff_info
        self._on_close = on_close
        self._closed = False
        self._thumbs: dict[int, np.ndarray] = {}
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self._props: dict[str, str] = {}
        self.vendor: str | None = None
        try:
            self._open()
        except BackendCannotRead:
            raise
        except SlideError:
            raise
        except self.decode_errors as exc:
            raise BackendCannotRead(f"{type(exc).__name__}: {exc}") from None
        if tiff_info is not None:
            for k, v in tiff_info.properties.items():
                self._props.setdefault(k, v)
        if not self.level_dimensions:
            raise BackendCannotRead("no pyramid levels")

    # ---- what a backend implements ---------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Decode one region; (x, y) level-0, (w, h) at ``level``; may return RGBA."""
        raise NotImplementedError

    def _read_many(self, locations: np.ndarray, size: tuple[int, int], level: int,
                   num_workers: int) -> np.ndarray:
        """Many same-size regions; default: a thread pool over :meth:`_read`."""
        w, h = size
        out = np.empty((len(locations), h, w, 3), np.uint8)

        def one(i: int) -> None:
            out[i] = _rgb(self._read(level, int(locations[i, 0]), int(locations[i, 1]), w, h))

        if num_workers <= 1 or len(locations) <= 1:
            for i in range(len(locations)):
                one(i)
        else:
            with ThreadPoolExecutor(num_workers) as pool:
                list(pool.map(one, range(len(locations))))
        return out

    def _close(self) -> None:
        pass

    # ---- metadata --------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.name

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._props)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def mpp_override(self) -> float | None:
        """The MPP the caller imposed at open time (None: the metadata's, if any)."""
        return float(self._mpp_override) if self._mpp_override else None

    @property
    def mpp_x(self) -> float | None:
        return float(self._mpp_override) if self._mpp_override else resolve_mpp(self._props)[0]

    @property
    def mpp_y(self) -> float | None:
        return float(self._mpp_override) if self._mpp_override else resolve_mpp(self._props)[1]

    @property
    def objective_power(self) -> float | None:
        return resolve_objective_power(self._props)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The lowest-resolution level that is still at least as sharp as ``downsample``."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = i
        return best

    # ---- pixels ----------------------------------------------------------------------------
    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3): the region at ``level`` whose top-left is level-0 (x, y)."""
        self._check_level(level)
        try:
            out = _rgb(self._read(level, int(x), int(y), int(w), int(h)))
        except self.decode_errors as exc:
            raise CorruptSlideError(
                self.uri, f"cannot decode region level={level} x={x} y={y} w={w} h={h} "
                f"with {self.name}: {redact(exc)}") from None
        return self._whiten_outside(out[None], np.array([[x, y]]), (w, h), level)[0]

    def read_regions(self, locations: Sequence[Sequence[int]] | np.ndarray,
                     size: tuple[int, int], *, level: int = 0,
                     num_workers: int = 2, fill: int = 255) -> np.ndarray:
        """uint8 (N, h, w, 3): many same-size regions (level-0 top-left ``locations``); pixels
        past the image are ``fill`` (255 white; 0 black, as OpenSlide's transparent reads as
        RGB in TRIDENT)."""
        self._check_level(level)
        locs = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
        w, h = int(size[0]), int(size[1])
        if len(locs) == 0:
            return np.empty((0, h, w, 3), np.uint8)
        try:
            out = self._read_many(locs, (w, h), level, int(num_workers))
        except self.decode_errors as exc:
            raise CorruptSlideError(
                self.uri, f"cannot decode {len(locs)} regions at level {level} with "
                f"{self.name}: {redact(exc)}") from None
        return self._whiten_outside(out, locs, (w, h), level, fill)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """uint8 (H, W, 3) whose longer side is ``max_side`` (or the lowest level if smaller)."""
        if max_side in self._thumbs:
            return self._thumbs[max_side]
        import cv2

        W, H = self.dimensions
        scale = max_side / max(W, H)
        tw, th = max(1, round(W * scale)), max(1, round(H * scale))
        level = self.best_level_for_downsample(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        # Read the level in horizontal stripes so a single-level 100k px TIFF never has to be
        # decoded whole; each stripe is area-resized to its share of the thumbnail rows.
        stripe = max(256, math.ceil(4096 * 4096 / max(lw, 1)))
        rows: list[np.ndarray] = []
        done = 0
        for y0 in range(0, lh, stripe):
            sh = min(stripe, lh - y0)
            end = round((y0 + sh) / lh * th)
            if end <= done:
                continue
            region = self.read_region(level, 0, round(y0 * ds), lw, sh)
            rows.append(cv2.resize(region, (tw, end - done), interpolation=cv2.INTER_AREA))
            done = end
        thumb = np.ascontiguousarray(np.concatenate(rows, axis=0))
        self._thumbs[max_side] = thumb
        return thumb

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.uri}: level {level} out of range 0..{self.level_count - 1}")

    def _whiten_outside(self, out: np.ndarray, locs: np.ndarray, size: tuple[int, int],
                        level: int, fill: int = 255) -> np.ndarray:
        """Backends disagree outside the image (black, transparent); make it ``fill``."""
        W, H = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        w, h = size
        x0 = np.floor(locs[:, 0] / ds).astype(np.int64)
        y0 = np.floor(locs[:, 1] / ds).astype(np.int64)
        outside = (x0 < 0) | (y0 < 0) | (x0 + w > W) | (y0 + h > H)
        for i in np.nonzero(outside)[0]:
            xs, ys = x0[i], y0[i]
            if ys < 0:
                out[i, : min(h, -ys)] = fill
            if ys + h > H:
                out[i, max(0, H - ys):] = fill
            if xs < 0:
                out[i, :, : min(w, -xs)] = fill
            if xs + w > W:
                out[i, :, max(0, W - xs):] = fill
        return out

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"<{type(self).__name__} {self.uri} {w}x{h} levels={self.level_count} "
                f"mpp={self.mpp_x} backend={self.backend}>")


def _rgb(region: np.ndarray) -> np.ndarray:
    """RGBA -> RGB composited on white (OpenSlide returns premultiplied alpha)."""
    region = np.asarray(region)
    if region.ndim == 3 and region.shape[2] == 4:
        alpha = region[..., 3:4].astype(np.uint16)
        rgb = region[..., :3].astype(np.uint16) + (255 - alpha)
        return np.minimum(rgb, 255).astype(np.uint8)
    return region

