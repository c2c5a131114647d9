"""Tissue detection and tiling against synthetic slides whose ground truth is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from care_scale.slides import open_slide
from care_scale.synthetic import TISSUE_TYPES, make_demo_cohort, write_synthetic_slide
from care_scale.tiling import iter_tile_batches, tile_grid
from care_scale.tissue import TissueParams, detect_tissue


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return {
        mpp: write_synthetic_slide(root / f"s_{mpp}.tif", width=2560, height=2048, mpp=mpp,
                                   seed=11, n_types=4)
        for mpp in (0.25, 0.5, 1.0)
    }


def _gt_fraction(slide, coords, size0):
    """Ground-truth tissue share of each square, from the type map."""
    ds = slide.type_map_downsample
    tissue = slide.tissue_mask
    out = []
    for x, y in coords:
        win = tissue[y // ds : -(-(y + size0) // ds), x // ds : -(-(x + size0) // ds)]
        out.append(win.mean())
    return np.array(out)


@pytest.mark.parametrize("seed,n_types", [(1, 3), (7, 5), (21, 2)])
def test_tissue_mask_iou(tmp_path, seed, n_types):
    syn = write_synthetic_slide(tmp_path / "s.tif", width=2048, height=1536, seed=seed,
                                n_types=n_types)
    with open_slide(syn.path) as s:
        tm = detect_tissue(s, TissueParams(thumbnail_max_side=512))
    gt = syn.tissue_mask
    pred = cv2.resize(tm.mask.astype(np.uint8), (gt.shape[1], gt.shape[0]),
                      interpolation=cv2.INTER_NEAREST) > 0
    iou = (gt & pred).sum() / (gt | pred).sum()
    assert iou >= 0.9, iou
    assert tm.contours and all(c.shape[1] == 2 for c in tm.contours)
    # Contours are level-0 pixels: they span the tissue's extent on the full-size slide.
    pts = np.concatenate(tm.contours)
    _ys, xs = np.nonzero(gt)
    ds = syn.type_map_downsample
    assert abs(pts[:, 0].min() - xs.min() * ds) < 3 * ds
    assert abs(pts[:, 0].max() - (xs.max() + 1) * ds) < 3 * ds


def test_tiles_only_where_tissue_is(slides):
    syn = slides[0.5]
    with open_slide(syn.path) as s:
        grid = tile_grid(s, target_mpp=0.5, patch_size=224, min_tissue_fraction=0.5)
        everything = tile_grid(s, target_mpp=0.5, patch_size=224, min_tissue_fraction=0.0)
    assert 0 < len(grid) < len(everything)
    kept = _gt_fraction(syn, grid.coords, grid.patch_size_level0)
    assert kept.min() >= 0.35 and kept.mean() > 0.85
    # Recall: squares that are all tissue in the ground truth are kept.
    all_gt = _gt_fraction(syn, everything.coords, everything.patch_size_level0)
    full = {tuple(c) for c in everything.coords[all_gt >= 0.99]}
    got = {tuple(c) for c in grid.coords}
    assert len(full & got) / len(full) > 0.97
    # Background squares are never kept.
    empty = {tuple(c) for c in everything.coords[all_gt == 0]}
    assert not (empty & got)


def test_tile_colours_follow_ground_truth_types(slides):
    syn = slides[0.5]
    palette = np.array([t["rgb"] for t in TISSUE_TYPES[: syn.n_types]], np.float64)
    with open_slide(syn.path) as s:
        grid = tile_grid(s, patch_size=96, min_tissue_fraction=0.9)
        tiles = np.concatenate([b.tiles for b in iter_tile_batches(s, grid, batch_size=32)])
    ds = syn.type_map_downsample
    right = total = 0
    for (x, y), tile in zip(grid.coords, tiles):
        window = syn.type_map[y // ds : (y + 96) // ds, x // ds : (x + 96) // ds]
        types, counts = np.unique(window[window >= 0], return_counts=True)
        if len(types) == 0 or counts.max() < 0.95 * window.size:
            continue  # mixed tile
        # Nuclei darken each type by density x darkness on average.
        spec = [TISSUE_TYPES[k] for k in range(syn.n_types)]
        expected = palette * (1 - np.array([[t["nuclei"] * t["dark"]] for t in spec]))
        guess = np.argmin(((expected - tile.reshape(-1, 3).mean(0)) ** 2).sum(1))
        right += int(guess == types[np.argmax(counts)])
        total += 1
    assert total >= 10 and right / total > 0.95


@pytest.mark.parametrize(
    "slide_mpp,target_mpp,level,read_size,size0",
    [
        (1.0, 0.5, 0, 112, 112),  # coarser slide, finer target: read 112 px, enlarge
        (0.25, 0.5, 0, 448, 448),  # finer slide: read 448 px at level 0, shrink
        (0.5, 1.0, 0, 448, 448),  # the reverse: 2x coarser target, no level at 2x
        (0.25, 1.0, 1, 224, 896),  # 4x: the 4x pyramid level matches exactly, no resize
        (0.5, 0.25, 0, 112, 112),  # finer than the slide: upsample level 0
    ],
)
def test_tiling_across_mpp(slides, slide_mpp, target_mpp, level, read_size, size0):
    syn = slides[slide_mpp]
    with open_slide(syn.path) as s:
        grid = tile_grid(s, target_mpp=target_mpp, patch_size=224, min_tissue_fraction=0.5)
        assert (grid.level, grid.read_size, grid.patch_size_level0) == (level, read_size, size0)
        assert grid.step_level0 == size0 and grid.mpp == slide_mpp
        assert len(grid) > 0
        # Level-0 coordinates fall on whole pixels of the level read.
        assert (grid.coords % round(s.level_downsamples[level]) == 0).all()
        batches = list(iter_tile_batches(s, grid, batch_size=16))
    assert all(b.tiles.shape[1:] == (224, 224, 3) and b.tiles.dtype == np.uint8 for b in batches)
    assert sum(len(b.coords) for b in batches) == len(grid)
    np.testing.assert_array_equal(np.concatenate([b.coords for b in batches]), grid.coords)
    assert all(len(b.coords) == 16 for b in batches[:-1])
    tiles = np.concatenate([b.tiles for b in batches])
    assert tiles.reshape(len(tiles), -1).mean(1).max() < 220  # tissue, not white background


def test_grid_is_deterministic_and_empty_slide_has_no_tiles(tmp_path, slides):
    with open_slide(slides[0.5].path) as s:
        a = tile_grid(s, patch_size=256, stride=128)
    with open_slide(slides[0.5].path, backend="openslide") as s:
        b = tile_grid(s, patch_size=256, stride=128)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert a.step_level0 == 128 and a.patch_size_level0 == 256
    empty = write_synthetic_slide(tmp_path / "empty.tif", width=1024, height=1024,
                                  tissue_fraction=0.0, seed=3)
    with open_slide(empty.path) as s:
        assert not detect_tissue(s).mask.any()
        assert len(tile_grid(s)) == 0


def test_demo_cohort(tmp_path):
    cohort = make_demo_cohort(tmp_path, n_slides=3, width=1024, height=768, seed=2)
    assert [c.path.name for c in cohort] == ["slide_000.tif", "slide_001.tif", "slide_002.tif"]
    assert [c.dominant_type for c in cohort] == [0, 1, 2]
    for c in cohort:
        assert c.composition.sum() == pytest.approx(1.0)
        with open_slide(c.path) as s:
            assert s.mpp_x == 0.5 and s.dimensions == (1024, 768)


def test_synthetic_writer_memory_does_not_grow_with_slide_size(tmp_path):
    """Tile-by-tile writing: peak Python/numpy memory stays far below the raw image size."""
    import tracemalloc

    write_synthetic_slide(tmp_path / "warm.tif", width=512, height=512, seed=0)  # imports
    peaks = {}
    for side in (1024, 6144):
        tracemalloc.start()
        syn = write_synthetic_slide(tmp_path / f"big{side}.tif", width=side, height=side,
                                    seed=0)
        peaks[side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    raw = 6144 * 6144 * 3
    assert peaks[6144] < raw / 8, (peaks, raw)
    assert peaks[6144] < 3 * peaks[1024] + (8 << 20)
    with open_slide(syn.path) as s:
        assert s.dimensions == (6144, 6144) and s.level_count == 3


def test_mask_morphology_equals_scipy():
    """The OpenCV hole filling and small-component removal give scipy.ndimage's results (4-
    connected background and components), and the summed-area tissue fractions are exact."""
    from scipy import ndimage

    from care_scale.tissue import TissueMask, fill_holes, mask_from_rgb

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 60, 2)
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        np.testing.assert_array_equal(fill_holes(m), ndimage.binary_fill_holes(m))
    # min_area_fraction: a ring with a hole, a big blob and specks on a white thumbnail.
    rgb = np.full((120, 160, 3), 240, np.uint8)
    pink = (200, 80, 160)
    cv2.circle(rgb, (40, 60), 30, pink, -1)
    cv2.circle(rgb, (40, 60), 8, (240, 240, 240), -1)  # a hole: filled
    cv2.rectangle(rgb, (100, 20), (150, 100), pink, -1)
    for x, y in ((90, 110), (5, 5), (150, 5)):
        rgb[y : y + 2, x : x + 2] = pink  # specks below min_area_fraction: dropped
    params = TissueParams(median_kernel=0, close_radius=0)
    mask, _ = mask_from_rgb(rgb, params)
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 50
    ref = ndimage.binary_fill_holes(sat)
    labels, n = ndimage.label(ref)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= params.min_area_fraction * ref.size
    keep[0] = False
    np.testing.assert_array_equal(mask, keep[labels])
    assert mask[60, 40] and not mask[111, 91]
    # Tissue fraction per square: exact counts.
    tm = TissueMask(mask=mask, contours=[], downsample=(8.0, 8.0), threshold=0.0)
    frac = tm.fraction_in(np.array([[0, 0], [800, 160], [320 - 112, 480 - 112]]), 224)
    squares = [mask[0:28, 0:28], mask[20:48, 100:128], mask[46:74, 26:54]]
    np.testing.assert_allclose(frac, [s.mean() for s in squares], rtol=1e-6)
