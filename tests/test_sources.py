"""Slide sources: folders, globs, S3 prefixes and manifests (real files, real S3 server)."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from care_scale.embed.sources import list_sources, read_manifest, stem
from care_scale.exceptions import ConfigError


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_listing_stable_unique_ids(tmp_path):
    _touch(tmp_path / "a" / "x.svs")
    _touch(tmp_path / "b" / "x.svs")
    _touch(tmp_path / "y.ome.tiff")
    _touch(tmp_path / "notes.txt")
    got = list_sources(str(tmp_path))
    assert [s.slide_id for s in got] == ["a__x", "b__x", "y"]
    assert got[0].uri == str(tmp_path / "a" / "x.svs")
    # Deterministic: listing again gives the same ids.
    assert [s.slide_id for s in list_sources(str(tmp_path))] == ["a__x", "b__x", "y"]


def test_glob_and_feature_extensions(tmp_path):
    _touch(tmp_path / "s1.svs")
    _touch(tmp_path / "s2.tif")
    _touch(tmp_path / "f1.h5")
    _touch(tmp_path / "f2.npy")
    assert [s.slide_id for s in list_sources(str(tmp_path / "*.svs"))] == ["s1"]
    assert [s.slide_id for s in list_sources(str(tmp_path), features=True)] == ["f1", "f2"]
    assert stem("s3://b/p/TCGA-01.svs") == "TCGA-01"


def test_missing_and_empty_source(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list_sources(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no slides"):
        list_sources(str(tmp_path / "empty"))


def test_csv_manifest_columns_and_relative_uris(tmp_path):
    _touch(tmp_path / "slides" / "s1.svs")
    (tmp_path / "m.csv").write_text(
        "slide_id,uri,mpp,cohort,site,age\n"
        "001,slides/s1.svs,,A,oslo,61\n"
        ",/abs/s2.svs,0.25,B,bergen,\n"
    )
    got = read_manifest(str(tmp_path / "m.csv"))
    assert [s.slide_id for s in got] == ["001", "s2"]
    first, second = got
    assert first.uri == str(tmp_path / "slides" / "s1.svs")
    assert first.mpp is None and first.cohort == "A"
    assert first.metadata == {"site": "oslo", "age": "61"}
    assert second.mpp == 0.25 and second.metadata == {"site": "bergen", "age": ""}
    assert list_sources(str(tmp_path / "m.csv")) == got


def test_relative_manifest_stores_absolute_uris_and_colliding_stems_get_folders(
        tmp_path, monkeypatch):
    """A manifest named by a relative path from its own folder: the stored URIs are absolute
    (workers and later readers have other working directories), and two files with one stem
    get their folders in the id (``a__x``, ``b__x``), as in a folder listing."""
    _touch(tmp_path / "a" / "x.tif")
    _touch(tmp_path / "b" / "x.tif")
    (tmp_path / "m.csv").write_text("uri\na/x.tif\nb/x.tif\n")
    monkeypatch.chdir(tmp_path)
    got = read_manifest("m.csv")
    assert [(s.slide_id, s.uri) for s in got] == [("a__x", str(tmp_path / "a" / "x.tif")),
                                                  ("b__x", str(tmp_path / "b" / "x.tif"))]
    assert [s.slide_id for s in list_sources(".")] == ["a__x", "b__x"]


def test_manifest_duplicates_are_named(tmp_path):
    (tmp_path / "m.csv").write_text("slide_id,uri\nA,a.svs\nB,b.svs\nA,c.svs\nB,d.svs\nC,e.svs\n")
    with pytest.raises(ConfigError, match=r"duplicate slide_id\(s\): A, B"):
        read_manifest(str(tmp_path / "m.csv"))


def test_manifest_bad_values(tmp_path):
    (tmp_path / "m.csv").write_text("slide_id,path\nA,a.svs\n")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        read_manifest(str(tmp_path / "m.csv"))
    (tmp_path / "m2.csv").write_text("uri,mpp\na.svs,fast\n")
    with pytest.raises(ConfigError, match="row 2: mpp 'fast' is not a number"):
        read_manifest(str(tmp_path / "m2.csv"))


def test_parquet_manifest(tmp_path):
    pq.write_table(
        pa.table({"uri": ["/d/a.svs", "/d/b.svs"], "mpp": [None, 0.5], "grade": [1, 3]}),
        tmp_path / "m.parquet",
    )
    got = list_sources(str(tmp_path / "m.parquet"))
    assert [(s.slide_id, s.mpp, s.metadata["grade"]) for s in got] == [
        ("a", None, "1"), ("b", 0.5, "3")
    ]


def test_s3_prefix_and_glob(s3_options, s3_bucket, tmp_path):
    import fsspec

    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(s3_options))
    for key in ("c/a.svs", "c/sub/b.svs", "c/readme.md"):
        fs.pipe(f"{s3_bucket}/{key}", b"x")
    got = list_sources(f"s3://{s3_bucket}/c/", storage_options=s3_options)
    assert [(s.slide_id, s.uri) for s in got] == [
        ("a", f"s3://{s3_bucket}/c/a.svs"), ("b", f"s3://{s3_bucket}/c/sub/b.svs")
    ]
    got = list_sources(f"s3://{s3_bucket}/c/*.svs", storage_options=s3_options)
    assert [s.slide_id for s in got] == ["a"]


def test_dicom_series_folder_is_one_slide(tmp_path):
    """A DICOM WSI (a folder of .dcm files, one per level) is listed once, named by its folder;
    MRXS companion data files are not slides."""
    for level in range(3):
        _touch(tmp_path / "case7" / f"1.2.826.0.{level}.dcm")
    _touch(tmp_path / "other" / "level-0.dcm")
    _touch(tmp_path / "m.mrxs")
    _touch(tmp_path / "m" / "Data0000.dat")
    _touch(tmp_path / "m" / "Slidedat.ini")
    got = list_sources(str(tmp_path))
    assert [s.slide_id for s in got] == ["case7", "m", "other"]
    assert got[0].uri == str(tmp_path / "case7" / "1.2.826.0.0.dcm")


def test_every_file_of_a_folder_is_accounted_for(tmp_path):
    """A feature file or a note among slides is reported with the reason; a lone .dcm among
    slides is a slide of its own name; a folder of .dcm files is one series; the files of a
    MRXS slide's data folder belong to it."""
    from care_scale.embed.sources import scan_source

    _touch(tmp_path / "s1.svs")
    _touch(tmp_path / "lone.dcm")
    _touch(tmp_path / "feats.npy")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".DS_Store")
    _touch(tmp_path / "series" / "level-0.dcm")
    _touch(tmp_path / "series" / "level-1.dcm")
    _touch(tmp_path / "m.mrxs")
    _touch(tmp_path / "m" / "Data0000.dat")
    _touch(tmp_path / "m" / "Slidedat.ini")
    listing = scan_source(str(tmp_path))
    assert [s.slide_id for s in listing.sources] == ["lone", "m", "s1", "series"]
    why = {posixpath.basename(u): w for u, w in listing.ignored}
    assert set(why) == {"feats.npy", "notes.txt"}
    assert "--features" in why["feats.npy"] and "not a slide type" in why["notes.txt"]
    # And the other way round: slides among feature files.
    feats = scan_source(str(tmp_path), features=True)
    assert [s.slide_id for s in feats.sources] == ["feats"]
    assert "without --features" in {posixpath.basename(u): w
                                        for u, w in feats.ignored}["s1.svs"]
    from care_scale.embed.progress import RunSummary

    text = RunSummary(run_id="r", warehouse="wh", model_version="v", backend="b",
                      ignored=listing.ignored).format()
    assert "2 file(s) in the source not embedded:" in text and "feats.npy: a feature" in text
