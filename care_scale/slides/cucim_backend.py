"""cuCIM backend: CuImage with batched ``read_region`` (many locations, worker threads).

cuCIM decodes SVS and generic tiled TIFF itself (libjpeg-turbo on CPU, nvJPEG on GPU) and, given
a list of locations, fans the tile decodes out over ``num_workers`` threads in C++ without the
GIL. That batched call is why it comes first in the backend order. cuCIM (with CuPy, ~5 GB) is
the optional extra ``care-scale[cucim]``; it is imported only when a slide is opened with it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from care_scale.slides.base import BackendCannotRead, Slide


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)


# cuCIM's default is no tile cache: a 224 px read overlapping four stored 256 px tiles decodes
# all four, and its neighbour decodes two of them again. A bounded per-process cache makes
# row-major grid reads decode each stored tile about once (OpenSlide caches by default too).
CACHE_MB = int(os.environ.get("CARE_SCALE_CUCIM_CACHE_MB", "256"))
_cache_configured = False


def _configure_cache(cuimage_cls) -> None:
    global _cache_configured
    if _cache_configured:
        return
    _cache_configured = True
    # Respect a cache the application configured itself.
    if CACHE_MB > 0 and cuimage_cls.cache().type.name.lower() == "nocache":
        cuimage_cls.cache("per_process", memory_capacity=CACHE_MB, record_stat=False)


class CuCIMSlide(Slide):
    name = "cucim"

    def _open(self) -> None:
        try:
            from cucim import CuImage
        except ImportError as exc:  # installed, but e.g. its CUDA libraries are missing
            raise BackendCannotRead(f"cucim cannot be imported ({exc})") from None
        _configure_cache(CuImage)
        try:
            self._img = CuImage(self.local_path)
        except (RuntimeError, ValueError, OSError) as exc:
            raise BackendCannotRead(str(exc)) from None
        if not self._img.is_loaded:
            raise BackendCannotRead("CuImage could not load the file")
        res = self._img.resolutions
        self.level_dimensions = [(int(w), int(h)) for w, h in res["level_dimensions"]]
        self.level_downsamples = [float(d) for d in res["level_downsamples"]]
        meta = self._img.metadata
        props: dict[str, str] = {}
        # Vendor blocks ("aperio", "philips", ...) keep their own keys, like OpenSlide does.
        for key, value in meta.items():
            if key not in ("cucim", "tiff"):
                _flatten(key, value, props)
        vendors = [k for k in meta if k not in ("cucim", "tiff")]
        self.vendor = vendors[0] if vendors else "generic-tiff"
        spacing, units = self._img.spacing(), self._img.spacing_units()
        if len(units) >= 2 and units[0] == "micrometer" and spacing[0] > 0:
            props["cucim.mpp-x"], props["cucim.mpp-y"] = str(spacing[1]), str(spacing[0])
        self._props = props
        dtype = self._img.typestr
        if dtype != "|u1":
            raise BackendCannotRead(f"pixel type {dtype}")

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._host(self._img.read_region((x, y), (w, h), level, device=self.device))

    def _host(self, region) -> np.ndarray:
        """A numpy array of a CuImage (GPU-decoded regions are copied back once)."""
        if self.device == "cpu":
            return np.asarray(region)
        import cupy

        return cupy.asnumpy(cupy.asarray(region))

    def _read_many(self, locations: np.ndarray, size: tuple[int, int], level: int,
                   num_workers: int) -> np.ndarray:
        w, h = size
        if len(locations) == 1 or num_workers <= 0:
            return super()._read_many(locations, size, level, 0)
        out = np.empty((len(locations), h, w, 3), np.uint8)
        # One batched call: cuCIM schedules the tile decodes on its own worker threads.
        result = self._img.read_region(
            [(int(x), int(y)) for x, y in locations], (w, h), level,
            num_workers=int(num_workers), batch_size=len(locations), device=self.device,
        )
        start = 0
        for batch in result:
            arr = self._host(batch)
            if arr.ndim == 3:
                arr = arr[None]
            out[start : start + len(arr)] = arr[..., :3]
            start += len(arr)
        if start != len(locations):
            raise RuntimeError(f"cuCIM returned {start} of {len(locations)} regions")
        return out

    def _close(self) -> None:
        img = getattr(self, "_img", None)
        if img is not None:
            img.close()
