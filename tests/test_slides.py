"""The slide layer on real files: the CMU Aperio slide, generated TIFFs, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from care_scale.cli import main as cli_main
from care_scale.exceptions import (
    BackendUnavailableError,
    CareScaleError,
    CorruptSlideError,
    MissingMPPError,
    NotBrightfieldError,
    SlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from care_scale.slides import BACKENDS, backend_available, open_slide
from care_scale.synthetic import write_synthetic_slide
from care_scale.tiling import iter_tile_batches, tile_grid
from care_scale.tissue import saturation

NO_CUCIM = "cuCIM is not installed (optional extra: pip install 'care-scale[cucim]')"
# Loops run over the installed backends; parametrized tests skip cuCIM, with the reason, without it.
ALL_BACKENDS = [name for name in BACKENDS if backend_available(name)]
BACKEND_PARAMS = [pytest.param(name, marks=pytest.mark.skipif(
    not backend_available(name), reason=NO_CUCIM)) for name in BACKENDS]


def _need_cucim() -> None:
    pytest.importorskip("cucim", reason=NO_CUCIM)


@pytest.fixture(scope="module")
def cmu(shared_data) -> Path:
    return shared_data / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    """A 2-level synthetic JPEG pyramid (3072 x 2304 at 0.5 um/px)."""
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tif"
    write_synthetic_slide(path, width=3072, height=2304, mpp=0.5, seed=3)
    return path


# ---- the real Aperio slide ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_cmu_metadata_exact(cmu, backend):
    with open_slide(cmu, backend=backend) as s:
        assert s.backend == backend
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.level_dimensions == [(2220, 2967)]
        assert s.level_downsamples == [1.0]
        assert s.mpp_x == pytest.approx(0.499, abs=1e-6)
        assert s.mpp_y == pytest.approx(0.499, abs=1e-6)
        assert s.objective_power == 20
        assert s.vendor == "aperio"
        assert s.properties["aperio.AppMag"] == "20"


def test_auto_backend_order(cmu):
    """Decoding on the CPU, tiled SVS / OME / generic TIFF open with tifffile first (fewer
    CPU-ms per tile, same pixels); other TIFF flavours and GPU decoding keep cuCIM first."""
    from care_scale.slides import _auto_order
    from care_scale.slides.base import TiffInfo

    with open_slide(cmu) as s:
        assert s.backend == "tifffile" and s.vendor == "aperio"
        assert s.local_path == str(cmu)

    def info(layout, tiled=True):
        return TiffInfo(dtype="uint8", channels=3, axes="YXS", shape=(8, 8, 3),
                        layout=layout, tiled=tiled)

    assert _auto_order(info("svs"), "cpu") == ["tifffile", "cucim", "openslide"]
    assert _auto_order(info("generic"), "cpu")[0] == "tifffile"
    assert _auto_order(info("svs"), "cuda") == ["cucim", "openslide", "tifffile"]
    for other in (info("ndpi"), info("bif"), info("philips"), info("generic", tiled=False), None):
        assert _auto_order(other, "cpu") == ["cucim", "openslide", "tifffile"]


def test_cmu_pixels_equal_between_backends(cmu):
    # Regions crossing 240 px tile borders, plus one hanging over the bottom-right corner.
    regions = [(0, 0, 64, 48), (230, 470, 300, 200), (1000, 1200, 256, 256), (2100, 2900, 200, 100)]
    reads = {}
    for backend in ALL_BACKENDS:
        with open_slide(cmu, backend=backend) as s:
            reads[backend] = [s.read_region(0, x, y, w, h) for x, y, w, h in regions]
            batched = s.read_regions([(x, y) for x, y, _, _ in regions[1:3]], (300, 200),
                                     num_workers=2)
            for i, (x, y, _, _) in enumerate(regions[1:3]):
                np.testing.assert_array_equal(batched[i], s.read_region(0, x, y, 300, 200))
    for backend in ALL_BACKENDS:
        for a, b, (_, _, w, h) in zip(reads[backend], reads["openslide"], regions):
            assert a.shape == (h, w, 3) and a.dtype == np.uint8
            np.testing.assert_array_equal(a, b, err_msg=backend)
    # Outside the image is white for every backend (OpenSlide gives transparent, cuCIM black).
    for backend in ALL_BACKENDS:
        corner = reads[backend][3]
        assert (corner[67:, :] == 255).all() and (corner[:, 120:] == 255).all(), backend
        assert corner[:60, :100].std() > 0


def test_cmu_tile_grid_at_half_micron(cmu):
    with open_slide(cmu) as s:
        grid = tile_grid(s, target_mpp=0.5, patch_size=224, min_tissue_fraction=0.5)
        assert grid.mpp == pytest.approx(0.499)
        assert grid.level == 0 and grid.read_size == 224 and grid.patch_size_level0 == 224
        assert grid.step_level0 == 224
        n_cells = (2220 // 224) * (2967 // 224)
        assert 20 < len(grid) < n_cells
        c = grid.coords
        assert c.dtype == np.int64 and c.shape == (len(grid), 2)
        assert (c % 224 == 0).all()
        assert (c[:, 0] + 224 <= 2220).all() and (c[:, 1] + 224 <= 2967).all()
        order = np.lexsort((c[:, 0], c[:, 1]))  # row-major: y, then x
        np.testing.assert_array_equal(order, np.arange(len(c)))
        assert (grid.tissue_fraction >= 0.5).all()
        again = tile_grid(s, target_mpp=0.5, patch_size=224)
        np.testing.assert_array_equal(again.coords, grid.coords)
        tiles = np.concatenate([b.tiles for b in iter_tile_batches(s, grid, batch_size=16)])
        # Kept tiles are stained tissue: clearly saturated, unlike the white glass around it.
        sat = np.array([saturation(t).mean() for t in tiles])
        assert np.median(sat) > 40
        white = s.read_regions([(0, 0), (1900, 0)], (224, 224))
        assert max(saturation(t).mean() for t in white) < 20
    # The same grid whatever backend decodes the thumbnail.
    for backend in ("openslide", "tifffile"):
        with open_slide(cmu, backend=backend) as s:
            np.testing.assert_array_equal(tile_grid(s).coords, grid.coords)


@pytest.mark.gpu
def test_cucim_gpu_decode_matches_cpu(cmu):
    _need_cucim()
    coords = [(0, 0), (700, 900), (1500, 2000)]
    with open_slide(cmu, device="cuda") as gpu, open_slide(cmu, backend="cucim") as cpu:
        assert gpu.backend == "cucim" and gpu.device == "cuda"
        a = gpu.read_regions(coords, (224, 224), num_workers=2)
        b = cpu.read_regions(coords, (224, 224), num_workers=2)
    # nvJPEG and libjpeg-turbo may round differently (IDCT); the images must agree closely.
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 2.0


def test_cuda_device_without_gpu_is_a_config_error(cmu):
    from care_scale.exceptions import ConfigError
    from care_scale.slides import _cuda_available

    _need_cucim()  # without it the refusal names the missing extra (tested below)
    if _cuda_available():
        pytest.skip("a CUDA device is present; the refusal path does not apply")
    with pytest.raises(ConfigError, match="no CUDA device"):
        open_slide(cmu, device="cuda")


# ---- generated TIFFs ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_synthetic_pyramid_metadata_every_backend(pyramid, backend):
    with open_slide(pyramid, backend=backend) as s:
        assert s.dimensions == (3072, 2304)
        assert s.level_count == 2
        assert s.level_dimensions == [(3072, 2304), (768, 576)]
        assert s.level_downsamples == pytest.approx([1.0, 4.0])
        assert s.mpp_x == pytest.approx(0.5) and s.mpp_y == pytest.approx(0.5)
        assert s.objective_power is None


def test_synthetic_pyramid_pixels_equal_every_level(pyramid):
    reads = {}
    for backend in ALL_BACKENDS:
        with open_slide(pyramid, backend=backend) as s:
            reads[backend] = [s.read_region(lvl, 1000, 700, 150, 130) for lvl in range(2)]
    for backend in ALL_BACKENDS:
        for lvl in range(2):
            np.testing.assert_array_equal(reads[backend][lvl], reads["openslide"][lvl])


@pytest.mark.parametrize("level", [0, 1])
def test_batched_reads_equal_between_backends(pyramid, level):
    """Many locations (more than one decode group), including ones hanging off the edges."""
    rng = np.random.default_rng(level)
    locs = np.stack([rng.integers(-100, 3072, 100), rng.integers(-100, 2304, 100)], axis=1)
    # Above level 0, OpenSlide shifts by fractions of a level pixel (interpolates) where the
    # others take the level pixel below; aligned locations are exact in every backend.
    locs -= locs % (4**level)
    reads = {}
    for backend in ALL_BACKENDS:
        with open_slide(pyramid, backend=backend) as s:
            reads[backend] = s.read_regions(locs, (96, 80), level=level, num_workers=2)
            assert reads[backend].shape == (100, 80, 96, 3)
            for i in (0, 77, 99):
                np.testing.assert_array_equal(
                    reads[backend][i], s.read_region(level, *locs[i], 96, 80))
    for backend in ALL_BACKENDS:
        np.testing.assert_array_equal(reads[backend], reads["openslide"], err_msg=backend)


def test_plain_stripped_rgb_tiff_reads_exact(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=64, compression="zlib",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.dimensions == (900, 700)
        assert s.mpp_x == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region(0, 100, 50, 300, 200), img[50:250, 100:400])
        got = s.read_regions([(0, 0), (850, 650)], (100, 100))
        np.testing.assert_array_equal(got[0], img[:100, :100])
        np.testing.assert_array_equal(got[1][:50, :50], img[650:, 850:])
        assert (got[1][50:] == 255).all()
    with open_slide(path, backend="tifffile") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 60, 900, 10), img[60:70])


def test_ome_tiff_pyramid_reads_exact(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
        tw.write(img, subifds=1, metadata={"axes": "YXS", "PhysicalSizeX": 0.25,
                                            "PhysicalSizeY": 0.25}, **opts)
        tw.write(img[::2, ::2], subfiletype=1, **opts)
    with open_slide(path, backend="tifffile") as s:
        assert s.level_dimensions == [(1536, 1024), (768, 512)]
        assert s.mpp_x == pytest.approx(0.25)
        assert s.vendor == "ome-tiff"
        np.testing.assert_array_equal(s.read_region(0, 250, 250, 300, 300), img[250:550, 250:550])
        np.testing.assert_array_equal(s.read_region(1, 500, 500, 100, 100),
                                      img[::2, ::2][250:350, 250:350])
    with open_slide(path) as s:  # whichever backend auto picks reads the same pixels
        np.testing.assert_array_equal(s.read_region(0, 250, 250, 300, 300), img[250:550, 250:550])
        assert s.mpp_x == pytest.approx(0.25)


def _he_like(size: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(2)
    img = np.full((size, size, 3), 232, np.uint8)
    img[200:800, 300:900] = (150, 70, 160)
    return (img + rng.integers(0, 8, img.shape)).astype(np.uint8)


def test_aperio_jpeg2000_svs_equal_between_backends(tmp_path):
    """Aperio SVS with JPEG 2000 tiles (compression 33005, RGB), as older scanners write."""
    img = _he_like()
    path = tmp_path / "j2k.svs"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression=33005,
                     metadata=None, description="Aperio Image Library v10.0.51\r\n1024x1024 "
                     "[0,0 1024x1024] (256x256) J2K/KDU Q=70|AppMag = 20|MPP = 0.4990")
    for backend in ALL_BACKENDS:
        with open_slide(path, backend=backend) as s:
            assert (s.vendor, s.mpp_x, s.objective_power) == ("aperio", 0.499, 20)
            np.testing.assert_array_equal(s.read_region(0, 250, 150, 300, 200),
                                          img[150:350, 250:550], err_msg=backend)


def test_falls_through_to_a_backend_that_decodes(tmp_path):
    """Generic JPEG 2000 TIFF (34712): cuCIM and OpenSlide cannot decode it, tifffile can."""
    img = _he_like(512)
    path = tmp_path / "j2k.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg2000",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    with open_slide(path) as s:
        assert s.backend == "tifffile" and s.mpp_x == 0.5
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 512, 512), img)
    with pytest.raises(UnsupportedFormatError) as info:
        open_slide(path, backend="openslide")
    assert "34712" in str(info.value)


# ---- cuCIM is an optional extra ------------------------------------------------------------


def test_without_cucim_auto_reads_and_asking_for_it_says_how_to_install(
        monkeypatch, tmp_path, cmu, capsys):
    monkeypatch.setitem(sys.modules, "cucim", None)  # import fails, as without the extra
    assert not backend_available("cucim")
    # A strip (untiled) TIFF: auto would try cuCIM first; without it the next backend reads it.
    img = _he_like(512)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, img, photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", metadata=None)
    for slide in (path, cmu):
        with open_slide(slide) as s:
            assert s.backend != "cucim"
            assert s.read_region(0, 0, 0, 64, 64).shape == (64, 64, 3)
    for kw in ({"backend": "cucim"}, {"device": "cuda"}):
        with pytest.raises(BackendUnavailableError) as info:
            open_slide(cmu, **kw)
        assert isinstance(info.value, CareScaleError)
        assert "pip install 'care-scale[cucim]'" in str(info.value)
    assert cli_main(["inspect", str(cmu), "--slide-backend", "cucim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("BackendUnavailableError:"), err
    assert "care-scale[cucim]" in err[0]


def test_no_module_imports_cucim_at_import_time():
    code = (
        "import importlib, pkgutil, sys, care_scale\n"
        "for m in pkgutil.walk_packages(care_scale.__path__, 'care_scale.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'cucim', 'cupy'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ---- bad input: each gets its own exception naming the file --------------------------------


def _raises(exc_type, path, **kw) -> SlideError:
    with pytest.raises(exc_type) as info:
        open_slide(path, **kw)
    assert Path(str(path)).name in str(info.value)
    assert info.value.reason
    return info.value


def test_missing_file(tmp_path):
    _raises(SlideNotFoundError, tmp_path / "nope.svs")


def test_broken_svs_is_corrupt(shared_data):
    err = _raises(CorruptSlideError, shared_data / "broken.svs")
    assert "not a TIFF" in err.reason


def test_truncated_slide_is_corrupt(tmp_path, pyramid):
    data = pyramid.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    err = _raises(CorruptSlideError, cut)
    assert "truncated" in err.reason


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_damaged_tile_data_is_corrupt(tmp_path, pyramid, backend):
    # Level-0 JPEG tiles overwritten with zeros (header intact, sizes right, not truncated).
    # cuCIM's CPU decoder only logs such errors and returns filler pixels, so it is not
    # parametrized here; OpenSlide and tifffile (what "auto" opens a tiled TIFF with on the
    # CPU) raise, and we turn that into the slide error.
    with tifffile.TiffFile(pyramid) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    data = bytearray(pyramid.read_bytes())
    for off, cnt in spans:
        data[off + 2 : off + cnt - 2] = bytes(cnt - 4)
    bad = tmp_path / "damaged.tif"
    bad.write_bytes(bytes(data))
    with open_slide(bad, backend=backend) as s, pytest.raises(CorruptSlideError) as info:
        s.read_region(0, 500, 500, 64, 64)
    assert "damaged.tif" in str(info.value) and "cannot decode" in info.value.reason


def test_sixteen_bit_is_not_brightfield(tmp_path):
    path = tmp_path / "sixteen.tif"
    tifffile.imwrite(path, np.zeros((512, 512, 3), np.uint16), tile=(256, 256),
                     photometric="rgb")
    err = _raises(NotBrightfieldError, path)
    assert "16-bit" in err.reason


def test_one_channel_is_not_brightfield(tmp_path):
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, np.zeros((512, 512), np.uint8), tile=(256, 256),
                     photometric="minisblack")
    err = _raises(NotBrightfieldError, path)
    assert "one channel" in err.reason


def test_multiplex_fluorescence_is_not_brightfield(tmp_path):
    path = tmp_path / "mif.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 512, 512), np.uint8), tile=(256, 256),
                     photometric="minisblack", metadata={"axes": "CYX"})
    err = _raises(NotBrightfieldError, path)
    assert "5 channels" in err.reason


def test_multiplex_qptiff_is_not_brightfield(tmp_path):
    """A PerkinElmer/Akoya multiplex .qptiff: one page per channel, 8 or 16 bits."""
    desc = ("<?xml version=\"1.0\"?><PerkinElmer-QPI-ImageDescription><ImageType>"
            "FullResolution</ImageType><Name>Ch{}</Name></PerkinElmer-QPI-ImageDescription>")
    for dtype, want in ((np.uint8, "6 channels"), (np.uint16, "16-bit")):
        path = tmp_path / f"mif-{np.dtype(dtype).name}.qptiff"
        with tifffile.TiffWriter(path) as tw:
            for c in range(6):
                tw.write(np.full((512, 512), 10 * c, dtype), tile=(256, 256),
                         photometric="minisblack", description=desc.format(c), metadata=None)
        err = _raises(NotBrightfieldError, path)
        assert want in err.reason and "brightfield slides are 8-bit RGB" in err.reason


@pytest.mark.skipif(not backend_available("openslide"), reason="needs OpenSlide (DICOM)")
def test_dicom_without_image_type_names_the_missing_attribute(tmp_path):
    from factories import write_dicom_wsm

    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()  # OpenSlide reads a folder's .dcm files as one series
    write_dicom_wsm(tmp_path / "ok" / "a.dcm")
    with open_slide(tmp_path / "ok" / "a.dcm") as slide:  # the same file with ImageType reads
        assert slide.dimensions == (16, 16)
    write_dicom_wsm(tmp_path / "bad" / "a.dcm", image_type=False)
    err = _raises(UnsupportedFormatError, tmp_path / "bad" / "a.dcm")
    assert "without (0008,0008) ImageType" in err.reason
    assert "damaged" not in err.reason


@pytest.mark.parametrize("name", ["picture.png", "notes.txt"])
def test_unsupported_formats(tmp_path, name):
    import cv2

    path = tmp_path / name
    if name.endswith(".png"):
        cv2.imwrite(str(path), np.full((64, 64, 3), 200, np.uint8))
    else:
        path.write_text("not an image\n")
    _raises(UnsupportedFormatError, path)


def test_no_mpp_no_objective_power(tmp_path):
    path = tmp_path / "nompp.tif"
    write_synthetic_slide(path, width=1024, height=768, mpp=None, seed=4)
    for backend in ALL_BACKENDS:
        with open_slide(path, backend=backend) as s:
            assert s.mpp_x is None and s.mpp_y is None and s.objective_power is None
            with pytest.raises(MissingMPPError) as info:
                tile_grid(s)
            assert "nompp.tif" in str(info.value)
    with open_slide(path, mpp_override=0.5) as s:
        assert s.mpp_x == 0.5
        assert tile_grid(s).mpp_source == "override"
    with open_slide(path) as s:
        assert tile_grid(s, mpp_override=0.25).patch_size_level0 == 448


def test_objective_power_fallback(tmp_path):
    # An Aperio-style description with AppMag but no MPP: 20x means 0.5 um/px.
    path = tmp_path / "mag.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 240, np.uint8), tile=(256, 256),
                     photometric="rgb", metadata=None,
                     description="Aperio Image Library v12.0\r\n512x512|AppMag = 20")
    for backend in ALL_BACKENDS:
        with open_slide(path, backend=backend) as s:
            assert s.mpp_x is None
            assert s.objective_power == 20
            grid = tile_grid(s, min_tissue_fraction=0.0)
            assert grid.mpp == 0.5 and grid.mpp_source == "objective_power"


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_inspect_json(cmu, tmp_path, capsys):
    png = tmp_path / "thumb.png"
    assert cli_main(["inspect", str(cmu), "--json", "--thumbnail", str(png)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["width"], info["height"], info["level_count"]) == (2220, 2967, 1)
    assert info["mpp_x"] == pytest.approx(0.499) and info["mpp_y"] == pytest.approx(0.499)
    assert info["objective_power"] == 20 and info["vendor"] == "aperio"
    assert info["backend"] == "tifffile" and info["tile_count"] > 20
    import cv2

    thumb = cv2.imread(str(png))
    assert thumb is not None and max(thumb.shape[:2]) == 1024
    green = (thumb[..., 1] > 150) & (thumb[..., 0] < 60) & (thumb[..., 2] < 60)
    assert green.sum() > 500  # the tissue contour is drawn


def test_cli_inspect_unknown_mpp_json_null(tmp_path, capsys):
    path = tmp_path / "nompp.tif"
    write_synthetic_slide(path, width=1024, height=768, mpp=None, seed=5)
    assert cli_main(["inspect", str(path), "--json", "--mpp-override", "1.0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp_x"] == 1.0 and info["mpp_source"] == "override"
    assert cli_main(["inspect", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("MissingMPPError:") and "nompp.tif" in err[0]


def test_cli_bad_input_exit_code_and_one_line(shared_data):
    proc = subprocess.run(
        [sys.executable, "-m", "care_scale", "inspect", str(shared_data / "broken.svs")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("CorruptSlideError:") and "broken.svs" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_one_line_even_when_decoders_print(tmp_path):
    # cuCIM prints its own complaints about JPEG 2000 TIFF tiles to the stderr descriptor.
    _need_cucim()
    path = tmp_path / "j2k.tif"
    tifffile.imwrite(path, _he_like(512), tile=(256, 256), photometric="rgb",
                     compression="jpeg2000", metadata=None)
    proc = subprocess.run(
        [sys.executable, "-m", "care_scale", "inspect", str(path), "--slide-backend", "cucim"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("UnsupportedFormatError:") and "j2k.tif" in lines[0]
