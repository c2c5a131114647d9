"""TRIDENT-compatible tiling: coordinates equal TRIDENT's own, and its rules one by one.

The references (tests/data/reference/trident_*.json, made by make_trident_coords.py beside
them) are TRIDENT's code run on CMU-1-Small-Region.svs (one level) and a two-level synthetic
pyramid: Otsu segmentation, then patching.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile

from care_scale import trident
from care_scale.exceptions import ConfigError, MissingMPPError, UnsupportedResolutionError
from care_scale.slides import BACKENDS, backend_available, open_slide
from care_scale.synthetic import write_synthetic_slide
from care_scale.tiling import TILING_MODES, iter_tile_batches, tile_grid

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
REFERENCES = {"trident_cmu1_small": CMU,
              "trident_synthetic_pyramid": DATA / "reference" / "synthetic_pyramid_20x.tif"}
REF = json.loads((DATA / "reference" / "trident_cmu1_small.json").read_text())
READERS = [b for b in BACKENDS if backend_available(b)]


@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("reference", sorted(REFERENCES))
def test_coordinates_equal_tridents(reference, backend):
    ref = json.loads((DATA / "reference" / f"{reference}.json").read_text())
    masks = np.load(DATA / "reference" / f"{reference}_masks.npz")
    assert ref["trident_commit"] == trident.TRIDENT_COMMIT
    edges = False
    with open_slide(REFERENCES[reference], backend=backend) as s:
        for name, case in ref["cases"].items():
            grid = tile_grid(s, mode="trident", target_mpp=10 / case["target_mag"],
                             patch_size=case["patch_size"],
                             stride=case["patch_size"] - case["overlap"],
                             min_tissue_fraction=case["min_tissue_proportion"],
                             mpp_override=case["mpp"])
            # Same patches, same order (TRIDENT's row-major scan).
            assert grid.coords.tolist() == case["coords"], name
            assert grid.patch_size_level0 == case["attrs"]["patch_size_level0"], name
            assert grid.magnification == case["attrs"]["level0_magnification"] == case[
                "slide_mag"], name
            assert grid.mpp == case["slide_mpp"], name
            mask = masks["mask_file" if case["mpp"] is None else f"mask_mpp{case['mpp']}"]
            np.testing.assert_array_equal(grid.tissue.mask, mask.astype(bool), err_msg=name)
            assert len(grid.tissue_fraction) == len(grid.coords)
            share = grid.tissue_fraction
            assert ((share >= case["min_tissue_proportion"]) & (share <= 1)).all(), name
            # The same pixels as TRIDENT's feature extraction: black past the slide's edge,
            # PIL's bicubic where the level read is not the target.
            tiles = np.concatenate([b.tiles for b in iter_tile_batches(s, grid)])
            digests = [hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()[:16]
                       for t in tiles]
            assert digests == case["tile_sha256_16"], name
            edge = grid.coords.max(axis=0) + grid.patch_size_level0 > s.dimensions
            edges = edges or bool(edge.any())
    # CMU-1-Small-Region's tiles run past its edge (2220 x 2967 px); the pyramid's fit exactly.
    assert edges == (reference == "trident_cmu1_small")


def test_the_native_grid_is_the_one_that_differs():
    """The remaining difference is the native mode's, by design: no coordinate in common."""
    care = REF["cases"]["care_20x_512"]
    with open_slide(CMU) as s:
        native = tile_grid(s, target_mpp=0.5, patch_size=512)
    assert (len(native), len(care["coords"])) == (6, 18)
    assert native.patch_size_level0 == 513  # 512 * 0.5 / 0.499
    assert not set(map(tuple, native.coords.tolist())) & set(map(tuple, care["coords"]))


@pytest.mark.parametrize("mpp,mag", [(0.1, 80), (0.159, 80), (0.16, 60), (0.2, 40), (0.25, 40),
                                     (0.2527, 40), (0.3, 20), (0.499, 20), (0.5, 20), (0.6, 10),
                                     (1.0, 10), (1.2, 5), (2.0, 5)])
def test_magnification_buckets(mpp, mag):
    assert trident.magnification_of(mpp) == mag


def test_coarser_than_5x_is_a_specific_error():
    with pytest.raises(UnsupportedResolutionError, match=r"x\.tif: mpp=2\.4 .*tiling=native"):
        trident.magnification_of(2.4, "x.tif")


def _aperio(path: Path, description: str, size=(1536, 1024)) -> Path:
    tifffile.imwrite(path, np.full((size[1], size[0], 3), 240, np.uint8), tile=(256, 256),
                     photometric="rgb", metadata=None,
                     description="Aperio Image Library v12.0\r\n" + description)
    return path


def test_resolution_from_mpp_objective_power_or_override(tmp_path):
    # MPP only: rounded to 4 places, bucketed; the grid steps by the bucket, not the MPP.
    mpp_only = _aperio(tmp_path / "mpp.tif", "1536x1024|MPP = 0.25271")
    power_only = _aperio(tmp_path / "mag.tif", "1536x1024|AppMag = 40")
    neither = _aperio(tmp_path / "none.tif", "1536x1024")
    for backend in READERS:
        with open_slide(mpp_only, backend=backend) as s:
            res = trident.resolution(s)
            assert (res.mpp, res.magnification, res.source) == (0.2527, 40, "metadata")
            geo = trident.patch_geometry(s, 512, 10 / 40, 0.5)
            assert (geo.size0, geo.step0) == (1024, 1024)
            assert trident.resolution(s, 0.5) == trident.Resolution(0.5, 20, "override")
        # Objective power only (TRIDENT itself refuses the slide): 40x means 0.25 um/px.
        with open_slide(power_only, backend=backend) as s:
            assert s.mpp_x is None
            assert trident.resolution(s) == trident.Resolution(0.25, 40, "objective_power")
            grid = tile_grid(s, mode="trident", patch_size=256)
            assert (grid.magnification, grid.mpp_source, grid.patch_size_level0) == (
                40, "objective_power", 512)
        with open_slide(neither, backend=backend) as s, pytest.raises(MissingMPPError,
                                                                      match="none.tif"):
            tile_grid(s, mode="trident")


def test_grid_starts_at_zero_and_runs_past_the_edge(tmp_path):
    path = write_synthetic_slide(tmp_path / "s.tif", width=1536, height=1280, mpp=0.25,
                                 seed=3).path  # 40x, levels at downsample 1, 4
    with open_slide(path) as s:
        assert s.level_downsamples[:2] == [1.0, 4.0]
        # 256 px at 20x on a 40x slide: 512 level-0 px, read at level 0 (no level at 2).
        geo = trident.patch_geometry(s, 256, 10 / 40, 0.5)
        assert (geo.size0, geo.step0, geo.level, geo.read_size) == (512, 512, 0, 512)
        assert (geo.cols, geo.rows) == (3, 3)  # ceil(1536 / 512), ceil(1280 / 512)
        xy = geo.coords()
        assert xy[0].tolist() == [0, 0] and xy[1].tolist() == [512, 0]  # row-major
        assert xy[:, 1].max() + geo.size0 > 1280  # the last row runs past the slide
        # 256 px at 10x: downsample 4 is a level (tolerance 0.1): level 1, 256 px read.
        geo = trident.patch_geometry(s, 256, 10 / 40, 1.0)
        assert (geo.size0, geo.level, geo.read_size) == (1024, 1, 256)
        # overlap: step = size - overlap, both at level 0.
        geo = trident.patch_geometry(s, 256, 10 / 40, 0.5, overlap=64)
        assert (geo.size0, geo.step0) == (512, 384)


def test_level_rule():
    ds = [1.0, 4.0, 16.0, 32.0]
    assert trident.best_level(ds, 4.05) == 1  # within the 0.1 tolerance: exact
    assert trident.best_level(ds, 3.95) == 1
    assert trident.best_level(ds, 3.8) == 0  # else the coarsest level not coarser than asked
    assert trident.best_level(ds, 20.0) == 2
    assert trident.best_level(ds, 100.0) == 3
    assert trident.best_level([1.0, 2.0], 0.5) == 0  # upsampling: the first level >= asked


def test_keep_rule_touching_counts_and_threshold_is_area():
    tissue = shapely.box(1000, 1000, 1600, 1400)
    coords = np.array([[0, 0], [512, 512], [1024, 1024], [1536, 1024], [1600, 1400]])
    keep, share = trident.keep_patches(coords, 512, [tissue], 512, 0.0)
    # (1600, 1400) touches the tissue at one corner only: TRIDENT keeps it (intersects).
    assert keep.tolist() == [False, True, True, True, True]
    assert share.tolist() == pytest.approx([(24 * 24) / 512**2, (512 * 376) / 512**2,
                                            (64 * 376) / 512**2, 0.0])
    keep, _ = trident.keep_patches(coords, 512, [tissue], 512, 0.5)
    assert keep.tolist() == [False, False, True, False, False]
    # Simplification (tolerance patch_size / 4, level-0 px) happens before the test: a bump
    # shallower than it is gone, so a square that only the bump reached is dropped.
    bump = shapely.Polygon([(0, 0), (1000, 0), (1000, 2250), (1100, 2500), (1000, 2750),
                            (1000, 3000), (0, 3000)])
    square = np.array([[1024, 2304]])
    assert trident.keep_patches(square, 512, [bump], 512, 0.0)[0].tolist() == [False]
    assert trident.keep_patches(square, 512, [bump], 16, 0.0)[0].tolist() == [True]
    assert trident.keep_patches(coords, 512, [], 512, 0.0)[0].sum() == 0


def test_polygons_fill_holes_and_drop_specks():
    mask = np.zeros((200, 150), np.uint8)
    mask[20:120, 20:120] = 1
    mask[50:90, 50:90] = 0  # a hole: TRIDENT (holes_are_tissue) keeps it as tissue
    mask[150:152, 100:102] = 1  # a speck: under 1000 px of the 2000-high contour mask
    polygons = trident.tissue_polygons(mask, 0.5)
    assert len(polygons) == 1 and not polygons[0].interiors
    hole_centre = shapely.Point(70 * 16 + 8, 70 * 16 + 8)  # mask px -> level 0 at 1.25x
    assert polygons[0].contains(hole_centre)


def test_otsu_matches_scikit_image_on_real_tiles():
    """Our Otsu segmenter re-implements TRIDENT's scikit-image calls; same masks."""
    skimage_color = pytest.importorskip("skimage.color")
    from skimage import filters, morphology

    def reference(tile):  # trident/segmentation_models/model_zoo/otsu.py, inverted
        import cv2

        tile = tile.copy()
        tile[np.all(tile == [0, 0, 0], axis=-1)] = [255, 255, 255]
        hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
        bg = tile.copy()
        bg[(cv2.inRange(hsv, (0, 0, 70), (180, 10, 255))
            | cv2.inRange(hsv, (0, 0, 0), (180, 255, 85))) > 0] = 255
        g = 255 * skimage_color.rgb2gray(bg)
        m = morphology.remove_small_objects(g < filters.threshold_otsu(g), min_size=60)
        pos = np.where(m[..., None], tile, 0)
        neg = np.where((~m[..., None]) & (tile > 0), 255, 0)
        tile = np.clip(pos + neg, 0, 255).astype(np.uint8)
        g = 255 * skimage_color.rgb2gray(tile)
        m = morphology.remove_small_holes(g < filters.threshold_otsu(g), area_threshold=5000)
        return m.astype(np.uint8)

    import warnings

    with open_slide(CMU) as s, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # min_size / area_threshold renamed
        for x, y in [(0, 0), (700, 900), (1400, 2200), (1900, 2600)]:
            tile = trident._read_padded(s, 0, x, y, 512)
            np.testing.assert_array_equal(trident.otsu_tissue(tile), reference(tile))


def test_modes_are_one_table():
    assert set(TILING_MODES) == {"native", "trident"}
    assert TILING_MODES["trident"].min_tissue_fraction == 0.0
    with open_slide(CMU) as s, pytest.raises(ConfigError, match="unknown tiling mode 'clam'"):
        tile_grid(s, mode="clam")


def test_inspect_tiles_in_either_mode(capsys):
    from care_scale.cli import main

    assert main(["inspect", str(CMU), "--tiling", "trident", "--patch-size", "512", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["tiling"], info["tile_count"], info["patch_size_level0"]) == ("trident", 18, 512)
    assert main(["inspect", str(CMU), "--patch-size", "512", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["tiling"], info["tile_count"], info["patch_size_level0"]) == ("native", 6, 513)
