"""tifffile backend: tiled pyramidal TIFF, OME-TIFF and plain (stripped) RGB TIFF.

A region read decodes only the tiles (or strips) it overlaps: byte ranges come from the page's
offsets, are read with ``os.pread`` (thread-safe, no shared file position) and decoded one by
one with the page's own codec. Nothing ever decodes a whole level for one region.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from care_scale.slides.base import BackendCannotRead, Slide, aperio_properties


class TiffFileSlide(Slide):
    name = "tifffile"
    group = 64  # locations whose stored tiles are decoded together in one batched read

    def _open(self) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.local_path)
            series = self._tif.series[0]
            pages = [level.keyframe for level in series.levels]
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            raise BackendCannotRead(f"tifffile: {exc}") from None
        self._fd = os.open(self.local_path, os.O_RDONLY)
        self._previous: dict[int, np.ndarray] = {}  # stored tiles decoded by the last batch
        self._previous_level = -1
        self._pages = []
        for page in pages:
            if page.planarconfig != 1 and page.samplesperpixel > 1:  # 1 = CONTIG
                raise BackendCannotRead("planar (separate) RGB layout is not supported")
            if page.shape[-1] not in (3, 4) or page.ndim != 3:
                raise BackendCannotRead(f"page shape {page.shape} is not RGB")
            self._pages.append(page)
        h0, w0 = self._pages[0].shape[:2]
        self.level_dimensions = [(int(p.shape[1]), int(p.shape[0])) for p in self._pages]
        self.level_downsamples = [float(np.mean((w0 / w, h0 / h)))
                                  for w, h in self.level_dimensions]
        desc = self._pages[0].description or ""
        self._props = aperio_properties(desc)
        if self._props:
            self.vendor = "aperio"
        elif self._tif.is_ome:
            self.vendor = "ome-tiff"
        else:
            self.vendor = "generic-tiff"

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        return self._assemble(level, x, y, w, h, lambda i: self._segment(page, i))

    def _chunks_of(self, level: int, x: int, y: int, w: int, h: int) -> list[int]:
        """Indices of the stored tiles/strips a region overlaps."""
        page = self._pages[level]
        ds = self.level_downsamples[level]
        lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
        H, W = page.shape[:2]
        ch, cw = int(page.chunks[0]), int(page.chunks[1])
        ncols = int(page.chunked[1])
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        if x1 <= x0 or y1 <= y0:
            return []
        return [ty * ncols + tx for ty in range(y0 // ch, (y1 - 1) // ch + 1)
                for tx in range(x0 // cw, (x1 - 1) // cw + 1)]

    def _assemble(self, level: int, x: int, y: int, w: int, h: int,
                  segment: Callable[[int], np.ndarray],
                  out: np.ndarray | None = None) -> np.ndarray:
        """The region cut out of its stored chunks, into ``out`` ((h, w, >=3) uint8) when
        given. Pixels outside the level are white."""
        page = self._pages[level]
        ds = self.level_downsamples[level]
        lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
        H, W, S = page.shape
        if out is None:
            out = np.empty((h, w, S), np.uint8)
        if lx < 0 or ly < 0 or lx + w > W or ly + h > H:
            out[...] = 255  # only then: inside the level, the chunks cover every pixel
        ch, cw = int(page.chunks[0]), int(page.chunks[1])  # tile or strip size
        ncols = int(page.chunked[1])
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        for index in self._chunks_of(level, x, y, w, h):
            seg = segment(index)
            sh, sw = seg.shape[:2]
            # Intersection of this chunk with the requested region, in level pixels.
            cx0, cy0 = (index % ncols) * cw, (index // ncols) * ch
            ix0, iy0 = max(x0, cx0), max(y0, cy0)
            ix1, iy1 = min(x1, cx0 + sw, W), min(y1, cy0 + sh, H)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx] = \
                seg[iy0 - cy0 : iy1 - cy0, ix0 - cx0 : ix1 - cx0, : out.shape[2]]
        return out

    def _read_many(self, locations: np.ndarray, size: tuple[int, int], level: int,
                   num_workers: int) -> np.ndarray:
        """Decode every stored tile the batch needs exactly once (neighbouring grid tiles
        share stored tiles), on ``num_workers`` threads, then cut the regions out."""
        w, h = size
        if len(locations) > self.group:
            # Bound the decoded-tile memory: groups of consecutive (neighbouring) locations.
            return np.concatenate([
                self._read_many(locations[i : i + self.group], size, level, num_workers)
                for i in range(0, len(locations), self.group)])
        page = self._pages[level]
        needed = sorted({i for x, y in locations for i in self._chunks_of(level, x, y, w, h)})
        # Grid batches come in row-major order, so a batch shares its first rows of stored
        # tiles with the previous batch's last: those are kept from the previous call (one
        # batch's worth of decoded tiles) instead of decoded again (~1/3 of the decodes).
        previous = self._previous if self._previous_level == level else {}
        decoded = {i: previous[i] for i in needed if i in previous}
        todo = [i for i in needed if i not in decoded]
        if num_workers > 1 and len(todo) > 1:
            pool = self._thread_pool(num_workers)
            decoded.update(zip(todo, pool.map(lambda i: self._segment(page, i), todo)))
        else:
            decoded.update((i, self._segment(page, i)) for i in todo)
        self._previous, self._previous_level = decoded, level
        out = np.empty((len(locations), h, w, 3), np.uint8)
        for k, (x, y) in enumerate(locations):
            self._assemble(level, int(x), int(y), w, h, decoded.__getitem__, out=out[k])
        return out

    def _thread_pool(self, num_workers: int) -> ThreadPoolExecutor:
        """One decode pool per open slide (starting threads per batch cost ~5% of decode)."""
        pool = getattr(self, "_pool", None)
        if pool is None or self._pool_size != num_workers:
            if pool is not None:
                pool.shutdown()
            self._pool = pool = ThreadPoolExecutor(num_workers,
                                                   thread_name_prefix="care-scale-tiff")
            self._pool_size = num_workers
        return pool

    def _segment(self, page, index: int) -> np.ndarray:
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:  # sparse tile: never written, background
            return np.full((*page.chunks[:2], page.shape[2]), 255, np.uint8)
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise OSError(f"short read at byte {offset} (file truncated?)")
        seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        if seg is None:
            raise ValueError(f"tile {index} could not be decoded")
        return seg.reshape(seg.shape[-3:])

    def _close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        self._previous = {}
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_tif", None) is not None:
            self._tif.close()
