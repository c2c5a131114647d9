"""Shards: one slide's patch features, staged between the patch-encoder and CARE stages.

The decode task that tiles a slide gets the slide's features back from the encoder actors
and writes them under the run's staging folder in the warehouse (``<wh>/_staging/<run_id>/``,
reachable from every node, local or ``s3://``) as Arrow IPC files of up to
:data:`SHARD_BYTES` each, usually one per slide. The slide-encoder actor reads them, runs CARE
and removes them. What travels through the driver is only their URIs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from care_scale.storage import is_remote, join, url_to_fs

# Features buffered per slide before a shard is written: one PUT per slide for all but the
# largest (10,000 tiles x 768 float32 = 31 MB), while a decode task's memory stays bounded.
SHARD_BYTES = 64 * 2**20


def shard_uri(staging: str, slide_id: str, start: int) -> str:
    """Where the features of ``slide_id`` from tile ``start`` on are staged (ids hashed: a
    slide id may hold characters a path must not)."""
    key = hashlib.sha1(slide_id.encode()).hexdigest()[:16]
    return join(staging, key, f"{start:09d}-{os.urandom(4).hex()}.arrow")


def write_shard(uri: str, index: np.ndarray, coords: np.ndarray, tissue: np.ndarray,
                features: np.ndarray, storage_options: dict[str, Any] | None) -> None:
    import pyarrow as pa

    feats = np.ascontiguousarray(features, np.float32)
    table = pa.table({
        "tile_index": pa.array(np.asarray(index, np.int64)),
        "x": pa.array(np.asarray(coords[:, 0], np.int64)),
        "y": pa.array(np.asarray(coords[:, 1], np.int64)),
        "tissue_fraction": pa.array(np.asarray(tissue, np.float32)),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), feats.shape[1]),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    fs, path = url_to_fs(uri, storage_options)
    if not is_remote(uri):  # object stores have no folders to make
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, sink.getvalue().to_pybytes())  # one PUT; local: one write


def read_shards(uris: list[str], storage_options: dict[str, Any] | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates, tissue fractions and features of one slide, in tile order."""
    import pyarrow as pa

    parts = []
    for uri in uris:
        fs, path = url_to_fs(uri, storage_options)
        parts.append(pa.ipc.open_file(pa.py_buffer(fs.cat_file(path))).read_all())
    t = pa.concat_tables(parts)
    order = np.argsort(t.column("tile_index").to_numpy(), kind="stable")
    coords = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], 1)[order]
    tissue = t.column("tissue_fraction").to_numpy()[order]
    feat = t.column("feature").combine_chunks()
    feats = feat.values.to_numpy().reshape(len(feat), -1)[order]
    return coords, tissue, np.ascontiguousarray(feats, np.float32)


def remove_uris(uris: list[str], storage_options: dict[str, Any] | None) -> None:
    if not uris:
        return
    fs, _ = url_to_fs(uris[0], storage_options)
    fs.rm([url_to_fs(u, storage_options)[1] for u in uris])


class ShardBuffer:
    """One slide's features as they come back from the encoders (in any order), written as
    shards of up to ``max_bytes``; :meth:`close` returns the URIs of all of them."""

    def __init__(self, staging: str, slide_id: str, storage_options: dict[str, Any] | None,
                 *, max_bytes: int = SHARD_BYTES):
        self.staging, self.slide_id, self.opts = staging, slide_id, storage_options
        self.max_bytes = max_bytes
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.nbytes = 0
        self.count = 0
        self.uris: list[str] = []

    def add(self, start: int, coords: np.ndarray, tissue: np.ndarray,
            features: np.ndarray) -> None:
        index = np.arange(start, start + len(coords), dtype=np.int64)
        self.parts.append((index, coords, tissue, features))
        self.nbytes += features.nbytes
        self.count += len(coords)
        if self.nbytes >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        index, coords, tissue, feats = (np.concatenate(c) for c in zip(*self.parts))
        uri = shard_uri(self.staging, self.slide_id, int(index.min()))
        self.uris.append(uri)  # before the write: a failed write is still cleaned up
        write_shard(uri, index, coords, tissue, feats, self.opts)
        self.parts, self.nbytes = [], 0

    def close(self) -> list[str]:
        self._flush()
        return list(self.uris)

    def discard(self) -> None:
        """Remove what was written (the slide failed); best effort, staging is removed at the
        end of the run anyway."""
        self.parts = []
        try:
            remove_uris(self.uris, self.opts)
        except OSError:
            pass


__all__ = ["SHARD_BYTES", "ShardBuffer", "read_shards", "remove_uris", "shard_uri",
           "write_shard"]
