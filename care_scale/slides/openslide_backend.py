"""OpenSlide backend: every vendor format OpenSlide knows (SVS, NDPI, MRXS, SCN, DICOM, ...)."""

from __future__ import annotations

import numpy as np

from care_scale.slides.base import BackendCannotRead, Slide


def _errors() -> tuple[type[BaseException], ...]:
    try:
        from openslide import OpenSlideError
    except ImportError:
        return (RuntimeError, OSError, ValueError)
    return (OpenSlideError, RuntimeError, OSError, ValueError)


class OpenSlideSlide(Slide):
    name = "openslide"
    decode_errors = _errors()

    def _open(self) -> None:
        try:
            import openslide
        except ImportError as exc:
            raise BackendCannotRead(f"openslide not installed ({exc})") from None
        try:
            self._osr = openslide.OpenSlide(self.local_path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise BackendCannotRead("format not supported by OpenSlide") from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise BackendCannotRead(f"OpenSlide: {exc}") from None
        self.level_dimensions = [(int(w), int(h)) for w, h in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self._props = dict(self._osr.properties)
        self.vendor = self._props.get("openslide.vendor")

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # RGBA with premultiplied alpha; the base class composites it on white.
        return np.asarray(self._osr.read_region((x, y), level, (w, h)))

    def _close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
