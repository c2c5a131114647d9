"""Staged feature shards (care_scale.embed.shards): what a decode task writes, the slide
encoder reads back in tile order, bit for bit."""

from __future__ import annotations

import numpy as np

from care_scale.embed.shards import ShardBuffer, read_shards


def test_shards_round_trip_in_tile_order(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 50, 7
    coords = rng.integers(0, 10**9, (n, 2))
    tissue = rng.random(n).astype(np.float32)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    # Batches come back in any order; a small shard size makes several shards of them.
    buf = ShardBuffer(str(tmp_path / "staging"), "slide/with:odd id", None,
                      max_bytes=dim * 4 * 12)
    for start in (30, 0, 10, 40, 20):
        buf.add(start, coords[start:start + 10], tissue[start:start + 10],
                feats[start:start + 10])
    uris = buf.close()
    assert len(uris) >= 3
    c, t, f = read_shards(uris[::-1], None)
    np.testing.assert_array_equal(c, coords)
    np.testing.assert_array_equal(t, tissue)
    np.testing.assert_array_equal(f, feats)
    assert f.dtype == np.float32
