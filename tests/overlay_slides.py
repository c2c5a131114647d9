"""One slide embedded the way the job's workers do it, without Ray, for the overlay tests.

Not a test module: the decode task's steps (open, tissue, grid, decode), the real tiny patch
encoder and CARE, ``build_result`` and ``Warehouse.write_results`` in one process, so a test
has real ``slides`` / ``regions`` / ``patches`` rows of a slide whose tissue map it knows.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from care_scale.embed.pipeline import _slide_meta
from care_scale.embed.results import RowContext, build_result
from care_scale.embed.sources import SlideSource
from care_scale.models import create_patch_encoder, create_slide_encoder
from care_scale.slides import open_slide
from care_scale.tiling import iter_tile_batches, tile_grid
from care_scale.warehouse import Warehouse


@lru_cache(maxsize=1)
def _models():
    """The tiny patch encoder and CARE on their seeded weights, built once per process."""
    return (create_patch_encoder("vit_demo_patch16_112").eval(),
            create_slide_encoder("care_tiny").eval())


def embed_one(uri: str, warehouse: str, slide_id: str, *, patch_size: int = 224,
              keep_patches: bool = True, mode: str = "native") -> dict:
    """Embed ``uri`` into ``warehouse``; returns the slide's meta (as the job's stream row)."""
    import torch

    patch, care = _models()
    with open_slide(uri) as slide:
        grid = tile_grid(slide, target_mpp=0.5, patch_size=patch_size, mode=mode,
                         min_tissue_fraction=0.5 if mode == "native" else None)
        meta = json.loads(_slide_meta({"uri": uri}, slide, grid, None, None))
        feats, coords, tissue = [], [], []
        with torch.inference_mode():
            for tb in iter_tile_batches(slide, grid, batch_size=64):
                feats.append(np.asarray(patch(torch.from_numpy(tb.tiles)), np.float32))
                coords.append(tb.coords)
                tissue.append(tb.tissue_fraction)
    ctx = RowContext(run_id="run-test", version="care_tiny-test+vit-test+t0",
                     care_version="care_tiny-test", patch_version="vit-test",
                     keep_patches=keep_patches)
    src = SlideSource(slide_id=slide_id, uri=uri)
    result = build_result(care, ctx, src, meta, np.concatenate(coords),
                          np.concatenate(tissue), np.concatenate(feats), backend="torch")
    Warehouse(warehouse).write_results([result])
    return meta
