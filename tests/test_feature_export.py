"""``care-scale tables export-features``: the patches table out to CLAM/TRIDENT files, read back
bit-exact by our own feature reader (real Delta tables, no Ray)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from factories import fake_result

from care_scale.cli import main
from care_scale.exceptions import FeatureFileError, TableError
from care_scale.models import read_patch_features
from care_scale.warehouse import Warehouse
from care_scale.warehouse.feature_files import export_features, trident_magnification


@pytest.fixture
def warehouse(tmp_path):
    wh = Warehouse(str(tmp_path / "wh"))
    results = [fake_result(f"s{i}", seed=i) for i in range(3)]
    # Rows in the table in no particular order: the export sorts them (row-major).
    p = results[1].patches
    perm = np.random.default_rng(0).permutation(len(p["x"]))
    results[1].patches = {k: np.asarray(v)[perm] for k, v in p.items()}
    results.append(fake_result("bare", seed=9, patches=False))  # embedded without patches
    wh.write_results(results)
    return wh, {r.slide_id: r for r in results}


def _expected(result):
    p = result.patches
    order = np.lexsort((p["x"], p["y"]))
    coords = np.stack([p["x"], p["y"]], 1)[order].astype(np.int64)
    return np.asarray(p["feature"], np.float32)[order], coords


def test_h5_round_trip_bit_exact_with_trident_attributes(warehouse, tmp_path):
    wh, results = warehouse
    out = tmp_path / "feats"
    report = export_features(wh.uri, str(out), format="h5")
    assert sorted(f.slide_id for f in report.files) == ["s0", "s1", "s2"]
    assert report.without_patches == ["bare"]
    for sid in ("s0", "s1", "s2"):
        feats, coords = _expected(results[sid])
        pf = read_patch_features(str(out / f"{sid}.h5"))
        assert pf.features.dtype == np.float32 and pf.features.tobytes() == feats.tobytes()
        assert pf.coords.dtype == np.int64 and np.array_equal(pf.coords, coords)
        assert pf.patch_size_level0 == 224 and pf.slide_id == sid
        with h5py.File(out / f"{sid}.h5") as f:
            assert f["features"].shape == (30, 8) and f["coords"].dtype == np.int64
            attrs = dict(f["coords"].attrs)
            # What TRIDENT's coords_to_h5 writes; its readers rebuild the patcher from these.
            assert {k: attrs[k] for k in ("patch_size", "patch_size_level0",
                                          "level0_magnification", "target_magnification",
                                          "overlap", "level0_width", "level0_height")} == {
                "patch_size": 224, "patch_size_level0": 224, "level0_magnification": 20,
                "target_magnification": 20, "overlap": 0, "level0_width": 2000,
                "level0_height": 1500}
            assert attrs["name"] == sid and attrs["savetodir"] == str(out)
            assert f["features"].attrs["name"] == sid and "encoder" in f["features"].attrs


def test_pt_round_trip_and_existing_files(warehouse, tmp_path):
    import torch

    wh, results = warehouse
    out = tmp_path / "pt_files"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # the folder is never emptied
    export_features(wh.uri, str(out), format="pt", slides=["s1"])
    t = torch.load(out / "s1.pt", weights_only=True)
    feats, _ = _expected(results["s1"])
    assert t.dtype == torch.float32 and t.numpy().tobytes() == feats.tobytes()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s1.pt"]

    before = (out / "s1.pt").stat().st_mtime_ns
    with pytest.raises(FeatureFileError, match="exist already.*--overwrite"):
        export_features(wh.uri, str(out), format="pt")  # s0, s2 not written either
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s1.pt"]
    assert (out / "s1.pt").stat().st_mtime_ns == before
    export_features(wh.uri, str(out), format="pt", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s0.pt", "s1.pt", "s2.pt"]


def test_errors_name_slides_and_versions(warehouse, tmp_path, capsys):
    wh, _ = warehouse
    with pytest.raises(TableError, match="'nope'"):
        export_features(wh.uri, str(tmp_path / "a"), slides=["s0", "nope"])
    with pytest.raises(TableError, match="bare.*--keep-patches"):
        export_features(wh.uri, str(tmp_path / "a"), slides=["s0", "bare"])
    assert not (tmp_path / "a").exists()  # refused before writing
    wh.write_results([fake_result("s0", seed=5, mv="care-v2")])
    with pytest.raises(TableError, match="care-v2, care_tiny-abc.*--model-version"):
        export_features(wh.uri, str(tmp_path / "a"))
    assert main(["tables", "export-features", "--warehouse", wh.uri, "--out",
                 str(tmp_path / "b"), "--model-version", "care-v2"]) == 0
    assert "1 h5 files (30 patches, model version care-v2)" in capsys.readouterr().out
    assert main(["tables", "export-features", "--warehouse", wh.uri, "--out",
                 str(tmp_path / "b"), "--model-version", "care-v2"]) == 2
    assert "FeatureFileError" in capsys.readouterr().err
    assert main(["tables", "export-features", "--warehouse", str(tmp_path / "none"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "TableError: patches" in capsys.readouterr().err


def test_trident_magnification_table():
    assert [trident_magnification(m) for m in (0.12, 0.25, 0.2527, 0.5, 1.0, 2.0)] == [
        80, 40, 40, 20, 10, 5]
    assert trident_magnification(None) is None and trident_magnification(5.0) is None


def test_export_to_s3_and_read_back(tmp_path, s3_options, s3_bucket):
    """Warehouse and output folder on the loopback S3 server; files read back over S3."""
    wh = Warehouse(f"s3://{s3_bucket}/wh", storage_options=s3_options)
    result = fake_result("s0", seed=3)
    wh.write_results([result])
    out = f"s3://{s3_bucket}/features/h5_files"
    report = export_features(wh.uri, out, storage_options=s3_options)
    assert [f.uri for f in report.files] == [f"{out}/s0.h5"]
    pf = read_patch_features(f"{out}/s0.h5", storage_options=s3_options)
    feats, coords = _expected(result)
    assert pf.features.tobytes() == feats.tobytes() and np.array_equal(pf.coords, coords)
    with pytest.raises(FeatureFileError, match="exist already"):
        export_features(wh.uri, out, storage_options=s3_options)
