"""Patch-feature readers (CLAM/TRIDENT .h5, Parquet, CARE .npy) and coordinate grids."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from care_scale.exceptions import FeatureFileError, ModelInputError
from care_scale.models import (
    coords_to_grid,
    create_slide_encoder,
    detect_step,
    read_patch_features,
)

pytestmark = pytest.mark.filterwarnings("ignore::care_scale.models.UntrainedWeightsWarning")


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def sample(n=40, d=192, step=512, seed=0):
    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(8), np.arange(5)), -1).reshape(-1, 2)[:n]
    return rng.normal(size=(n, d)).astype(np.float32), (1000 + xy * step).astype(np.int64)


def write_trident_h5(path, feats, coords, **coord_attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        ds = f.create_dataset("coords", data=coords)
        for k, v in coord_attrs.items():
            ds.attrs[k] = v


def test_trident_h5(tmp_path):
    feats, coords = sample()
    write_trident_h5(tmp_path / "slide-01.h5", feats, coords, patch_size=256,
                     patch_size_level0=512)
    pf = read_patch_features(str(tmp_path / "slide-01.h5"))
    assert pf.slide_id == "slide-01" and len(pf) == 40
    assert pf.features.dtype == np.float32 and pf.coords.dtype == np.int64
    np.testing.assert_array_equal(pf.features, feats)
    np.testing.assert_array_equal(pf.coords, coords)
    assert pf.patch_size_level0 == 512


def test_clam_h5_with_level_and_downsample(tmp_path):
    feats, coords = sample()
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f.create_dataset("features", data=feats[None].astype(np.float16))  # batch axis
        ds = f.create_dataset("coords", data=coords)
        ds.attrs["patch_level"] = 1
        ds.attrs["patch_size"] = 256
        ds.attrs["downsample"] = np.array([4.0, 4.0])
    pf = read_patch_features(str(tmp_path / "clam.h5"))
    assert pf.features.shape == (40, 192) and pf.features.dtype == np.float32
    assert pf.patch_size_level0 == 1024


def test_h5_without_coords_names_file_and_dataset(tmp_path):
    with h5py.File(tmp_path / "nocoords.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((3, 4), np.float32))
    with pytest.raises(FeatureFileError, match=r"nocoords\.h5.*'coords'"):
        read_patch_features(str(tmp_path / "nocoords.h5"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(FeatureFileError, match="junk.h5"):
        read_patch_features(str(tmp_path / "junk.h5"))


def test_h5_on_s3(tmp_path, s3_options, s3_bucket):
    import boto3

    feats, coords = sample()
    write_trident_h5(tmp_path / "s.h5", feats, coords, patch_size_level0=512)
    boto3.client("s3", endpoint_url=s3_options["aws_endpoint_url"],
                 aws_access_key_id="testing", aws_secret_access_key="testing-secret",
                 region_name="us-east-1").upload_file(str(tmp_path / "s.h5"), s3_bucket,
                                                      "feats/s.h5")
    pf = read_patch_features(f"s3://{s3_bucket}/feats/s.h5", storage_options=s3_options)
    np.testing.assert_array_equal(pf.features, feats)
    with pytest.raises(FeatureFileError, match="no such feature file"):
        read_patch_features(f"s3://{s3_bucket}/feats/absent.h5", storage_options=s3_options)


def test_parquet(tmp_path):
    feats, coords = sample()
    table = pa.table({"x": coords[:, 0], "y": coords[:, 1],
                      "features": pa.array(list(feats), type=pa.list_(pa.float32())),
                      "patch_size_level0": np.full(40, 512)})
    pq.write_table(table, tmp_path / "p.parquet")
    pf = read_patch_features(str(tmp_path / "p.parquet"))
    np.testing.assert_allclose(pf.features, feats)
    np.testing.assert_array_equal(pf.coords, coords)
    assert pf.patch_size_level0 == 512 and pf.slide_id == "p"
    pq.write_table(pa.table({"x": [1], "feature": [[1.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(FeatureFileError, match=r"bad\.parquet.*columns x, y"):
        read_patch_features(str(tmp_path / "bad.parquet"))


def care_dict(feats, coords, size=512):
    return {"feature": feats, "index": [f"{x}_{y}_{size}.png" for x, y in coords],
            "inst_label": np.zeros(len(feats), np.int64)}


def test_care_npy_written_with_np_save(tmp_path):
    feats, coords = sample(d=768)
    np.save(tmp_path / "TCGA-XX.npy", care_dict(feats, coords))  # np.save pickles dicts
    pf = read_patch_features(str(tmp_path / "TCGA-XX.npy"))
    np.testing.assert_array_equal(pf.features, feats)
    np.testing.assert_array_equal(pf.coords, coords)
    assert pf.patch_size_level0 == 512 and pf.slide_id == "TCGA-XX"


def test_care_npy_written_with_pickle_dump(tmp_path):
    feats, coords = sample(d=768)
    with open(tmp_path / "raw.npy", "wb") as f:
        pickle.dump(care_dict(feats, coords, size=448), f, protocol=2)
    pf = read_patch_features(str(tmp_path / "raw.npy"))
    np.testing.assert_array_equal(pf.features, feats)
    assert pf.patch_size_level0 == 448


@pytest.mark.parametrize("writer", ["np_save", "pickle"])
def test_malicious_care_npy_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    feats, coords = sample(d=8)
    payload = care_dict(feats, coords)
    payload["inst_label"] = Evil(str(marker))
    path = tmp_path / "evil.npy"
    if writer == "np_save":
        np.save(path, payload)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(FeatureFileError, match=r"evil\.npy: refused to unpickle .*system"):
        read_patch_features(str(path))
    assert not marker.exists()


def test_npy_without_the_care_dict(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(FeatureFileError, match="without coordinates"):
        read_patch_features(str(tmp_path / "plain.npy"))
    np.save(tmp_path / "wrong.npy", {"feats": np.zeros((2, 2))})
    with pytest.raises(FeatureFileError, match="'feature' and 'index'"):
        read_patch_features(str(tmp_path / "wrong.npy"))
    feats, coords = sample(d=8)
    d = care_dict(feats, coords)
    d["index"][3] = "tile_three.png"
    np.save(tmp_path / "badindex.npy", d)
    with pytest.raises(FeatureFileError, match="tile_three"):
        read_patch_features(str(tmp_path / "badindex.npy"))


def test_nan_features_and_unknown_types(tmp_path):
    feats, coords = sample()
    feats[2, 2] = np.nan
    write_trident_h5(tmp_path / "nan.h5", feats, coords)
    with pytest.raises(FeatureFileError, match=r"nan\.h5.*NaN"):
        read_patch_features(str(tmp_path / "nan.h5"))
    with pytest.raises(FeatureFileError, match="unknown feature file type"):
        read_patch_features(str(tmp_path / "x.csv"))
    with pytest.raises(FeatureFileError, match="no such feature file"):
        read_patch_features(str(tmp_path / "absent.h5"))


def test_patch_features_feed_care_encode(tmp_path):
    feats, coords = sample()
    write_trident_h5(tmp_path / "s.h5", feats, coords, patch_size_level0=512)
    care = create_slide_encoder("care_tiny")
    enc = care.encode(read_patch_features(str(tmp_path / "s.h5")))
    assert enc.patch_step == 512 and enc.region_of_patch.shape == (40,)
    same = care.encode(feats, coords, patch_step=512)
    np.testing.assert_array_equal(enc.slide_embedding, same.slide_embedding)


def test_coords_to_grid_and_step_detection():
    xy = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2)
    holes = xy[(xy[:, 0] % 3 != 1)]  # every third column missing: gaps of 2 steps
    grid, step = coords_to_grid(77 + holes * 224)
    assert step == 224
    np.testing.assert_array_equal(grid, holes - holes.min(0))
    assert detect_step(np.array([[5, 9]])) == 1
    grid, step = coords_to_grid(np.array([[5, 9]]))
    assert grid.tolist() == [[0, 0]]
    grid, step = coords_to_grid(holes * 224 + 3, step=112)  # explicit step wins
    np.testing.assert_array_equal(grid, (holes - holes.min(0)) * 2)
    with pytest.raises(ModelInputError):
        coords_to_grid(np.zeros((0, 2)))
    with pytest.raises(ModelInputError):
        coords_to_grid(np.array([[np.nan, 1.0]]))


def test_the_step_follows_the_coordinates_not_the_size_attribute(tmp_path):
    """As on the CARE authors' own file: TRIDENT scan order, patches 512 apart, size 1024."""
    xy = np.stack(np.meshgrid(np.arange(7), np.arange(5)), -1).reshape(-1, 2)  # row-major
    coords = 1000 + xy * 512
    feats = np.random.default_rng(0).normal(size=(len(xy), 192)).astype(np.float32)
    write_trident_h5(tmp_path / "s.h5", feats, coords, patch_size_level0=1024)
    pf = read_patch_features(str(tmp_path / "s.h5"))
    assert pf.patch_size_level0 == 1024 and detect_step(pf.coords) == 512
    enc = create_slide_encoder("care_tiny").encode(pf)
    assert enc.patch_step == 512
    # The authors' rule only counts spacings they use; another scan spacing falls through to
    # the gaps within rows and columns.
    assert detect_step(77 + xy * 224) == 224


def test_tissue_pieces_on_differently_offset_lattices():
    """Two pieces whose lattices are 81 and 300 px apart, in shuffled order: the step is the
    spacing, not the offset between origins, and no two patches share a grid cell."""
    rng = np.random.default_rng(1)
    a = np.stack(np.meshgrid(np.arange(6), np.arange(4)), -1).reshape(-1, 2) * 512
    b = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2) * 512
    b = b + np.array([6 * 512 + 81, 4 * 512 + 300])  # beside and below piece a, off-lattice
    coords = np.concatenate([a, b])[rng.permutation(len(a) + len(b))]
    assert detect_step(coords) == 512
    grid, step = coords_to_grid(coords)
    assert step == 512
    assert len(np.unique(grid, axis=0)) == len(coords)
    # Neighbours within a piece stay neighbours on the grid.
    for piece in (a, b):
        idx = [int(np.flatnonzero((coords == p).all(1))[0]) for p in piece]
        g = grid[idx]
        np.testing.assert_array_equal(g - g.min(0), (piece - piece.min(0)) // 512)
