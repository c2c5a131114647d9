"""Remote slides through a real S3 protocol server (moto, loopback) and the staging cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import boto3
import numpy as np
import pytest

from care_scale.exceptions import CareScaleError, SlideNotFoundError, StorageError
from care_scale.slides import open_slide, stat_uri
from care_scale.slides.cache import SlideCache
from care_scale.synthetic import write_synthetic_slide

SECRET = "testing-secret"


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory, shared_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote")
    files = {"cmu.svs": shared_data / "CMU-1-Small-Region.svs"}
    for i in range(3):
        syn = write_synthetic_slide(root / f"syn{i}.tif", width=1536, height=1024, seed=i)
        files[f"syn{i}.tif"] = syn.path
    return files


@pytest.fixture
def bucket(s3_server, s3_bucket, slide_files) -> str:
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    for name, path in slide_files.items():
        client.upload_file(str(path), s3_bucket, f"slides/{name}")
    return s3_bucket


def _client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                        aws_secret_access_key=SECRET, region_name="us-east-1")


def test_read_s3_slide_same_as_local(bucket, s3_options, slide_files, tmp_path):
    cache = SlideCache(tmp_path / "cache", max_bytes=50 << 20, num_threads=3,
                       chunk_bytes=256 << 10)
    uri = f"s3://{bucket}/slides/cmu.svs"
    size, etag = stat_uri(uri, storage_options=s3_options)
    assert size == slide_files["cmu.svs"].stat().st_size and etag
    with open_slide(uri, storage_options=s3_options, cache=cache) as remote, \
            open_slide(slide_files["cmu.svs"]) as local:
        assert remote.uri == uri
        assert Path(remote.local_path).parent.parent == cache.root
        assert remote.dimensions == (2220, 2967) and remote.mpp_x == pytest.approx(0.499)
        assert remote.backend == local.backend == "tifffile"
        np.testing.assert_array_equal(remote.read_region(0, 700, 900, 300, 300),
                                      local.read_region(0, 700, 900, 300, 300))
    # Ranged parallel download reassembled the exact bytes.
    staged = cache.entries()[0]
    assert staged.read_bytes() == slide_files["cmu.svs"].read_bytes()


def test_cache_is_bounded_with_lru_eviction(bucket, s3_options, slide_files, tmp_path):
    sizes = {n: p.stat().st_size for n, p in slide_files.items() if n.startswith("syn")}
    # Room for exactly two of the three synthetic slides.
    limit = max(sizes.values()) + sorted(sizes.values())[-2] + 1000
    cache = SlideCache(tmp_path / "c", max_bytes=limit)
    uri = {n: f"s3://{bucket}/slides/{n}" for n in sizes}
    for name in ("syn0.tif", "syn1.tif", "syn0.tif"):  # syn0 used last -> syn1 is LRU
        with open_slide(uri[name], storage_options=s3_options, cache=cache) as s:
            assert s.mpp_x == 0.5
        assert cache.total_bytes() <= limit
    with open_slide(uri["syn2.tif"], storage_options=s3_options, cache=cache):
        pass
    names = sorted(p.name for p in cache.entries())
    assert names == ["syn0.tif", "syn2.tif"]
    assert cache.total_bytes() <= limit
    on_disk = sum(f.stat().st_size for f in cache.root.rglob("*.tif"))
    assert on_disk <= limit


def test_open_slides_are_not_evicted(bucket, s3_options, tmp_path):
    uris = [f"s3://{bucket}/slides/syn{i}.tif" for i in range(2)]
    one = max(stat_uri(u, storage_options=s3_options)[0] for u in uris)
    cache = SlideCache(tmp_path / "c", max_bytes=one + 100)
    with open_slide(uris[0], storage_options=s3_options, cache=cache):
        with pytest.raises(StorageError) as info:
            open_slide(uris[1], storage_options=s3_options, cache=cache)
        assert "full" in str(info.value)
    # Once closed, it can be evicted for the next slide.
    with open_slide(uris[1], storage_options=s3_options, cache=cache) as s:
        assert s.dimensions == (1536, 1024)


def test_slides_open_in_other_processes_are_not_evicted(bucket, s3_options, tmp_path):
    """Ray workers share one cache folder: another live process's pin protects an entry."""
    import subprocess
    import sys

    uris = [f"s3://{bucket}/slides/syn{i}.tif" for i in range(2)]
    one = max(stat_uri(u, storage_options=s3_options)[0] for u in uris)
    cache = SlideCache(tmp_path / "c", max_bytes=one + 100)
    entry = cache.fetch(uris[0], storage_options=s3_options)
    cache.release(entry.path)
    (entry.path.parent / f".pin-{os.getppid()}").touch()  # a live process holds it open
    with pytest.raises(StorageError, match="full"):
        cache.fetch(uris[1], storage_options=s3_options)
    # The same pin from a process that has exited is stale and ignored.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (entry.path.parent / f".pin-{os.getppid()}").rename(entry.path.parent / f".pin-{dead}")
    again = cache.fetch(uris[1], storage_options=s3_options)
    assert [p.name for p in cache.entries()] == ["syn1.tif"]
    cache.release(again.path)


def test_too_large_for_cache(bucket, s3_options, tmp_path):
    cache = SlideCache(tmp_path / "c", max_bytes=1000)
    with pytest.raises(StorageError) as info:
        open_slide(f"s3://{bucket}/slides/cmu.svs", storage_options=s3_options, cache=cache)
    assert "does not fit" in str(info.value)
    assert not cache.entries()


def test_changed_object_is_downloaded_again(bucket, s3_options, s3_server, slide_files,
                                            tmp_path):
    cache = SlideCache(tmp_path / "c", max_bytes=50 << 20)
    uri = f"s3://{bucket}/slides/syn0.tif"
    with open_slide(uri, storage_options=s3_options, cache=cache) as s:
        first = s.read_region(0, 600, 400, 64, 64)
    # Same key, new content (other slide): new ETag and size -> the stale copy is replaced.
    _client(s3_server).upload_file(str(slide_files["syn1.tif"]), bucket, "slides/syn0.tif")
    with open_slide(uri, storage_options=s3_options, cache=cache) as s:
        second = s.read_region(0, 600, 400, 64, 64)
        assert Path(s.local_path).read_bytes() == slide_files["syn1.tif"].read_bytes()
    assert not np.array_equal(first, second)
    assert len(cache.entries()) == 1


def test_damaged_local_copy_is_detected_and_refetched(bucket, s3_options, slide_files,
                                                      tmp_path):
    cache = SlideCache(tmp_path / "c", max_bytes=50 << 20)
    uri = f"s3://{bucket}/slides/syn2.tif"
    entry = cache.fetch(uri, storage_options=s3_options)
    cache.release(entry.path)
    data = entry.path.read_bytes()
    entry.path.write_bytes(data[: len(data) // 3])  # a partial copy left by a crash
    again = cache.fetch(uri, storage_options=s3_options)
    cache.release(again.path)
    assert again.path.read_bytes() == slide_files["syn2.tif"].read_bytes()


def test_checksum_mismatch_is_refused(bucket, s3_options, tmp_path, monkeypatch):
    cache = SlideCache(tmp_path / "c", max_bytes=50 << 20)
    uri = f"s3://{bucket}/slides/syn1.tif"
    size, _ = stat_uri(uri, storage_options=s3_options)
    # A wrong expected MD5 (as when the object changes mid-download) must not be cached.
    with pytest.raises(StorageError) as info:
        cache._download(uri, s3_options, cache.root / "x.tif", size, "0" * 32)
    assert "checksum mismatch" in str(info.value)
    assert not (cache.root / "x.tif").exists()
    assert not list(cache.root.glob(".part-*"))


def test_remove_after_use(bucket, s3_options, tmp_path):
    cache = SlideCache(tmp_path / "c", max_bytes=50 << 20, remove_after_use=True)
    with open_slide(f"s3://{bucket}/slides/syn0.tif", storage_options=s3_options,
                    cache=cache) as s:
        staged = Path(s.local_path)
        assert staged.exists()
    assert not staged.exists() and cache.total_bytes() == 0


def test_default_private_cache_is_cleaned_up(bucket, s3_options):
    with open_slide(f"s3://{bucket}/slides/syn1.tif", storage_options=s3_options) as s:
        staged = Path(s.local_path)
        assert staged.exists()
    assert not staged.exists() and not staged.parent.parent.exists()


def test_missing_object_and_no_secret_in_errors(bucket, s3_options, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache = SlideCache(tmp_path / "c", max_bytes=50 << 20)
    with pytest.raises(SlideNotFoundError) as info:
        open_slide(f"s3://{bucket}/slides/nope.svs", storage_options=s3_options, cache=cache)
    assert "nope.svs" in str(info.value) and SECRET not in str(info.value)
    # Credentials inside the URI itself are redacted too.
    with pytest.raises(CareScaleError) as info:
        open_slide(f"s3://user:{SECRET}@{bucket}/slides/nope.svs", storage_options=s3_options,
                   cache=cache)
    assert SECRET not in str(info.value)
    # An unreachable endpoint: a StorageError, still without the secret.
    dead = dict(s3_options, aws_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(CareScaleError) as info:
        stat_uri(f"s3://{bucket}/slides/cmu.svs", storage_options=dead)
    text = str(info.value) + repr(info.value.__cause__) + repr(info.value.__context__)
    assert SECRET not in text
    assert SECRET not in caplog.text


def test_multi_file_formats_are_staged_with_companions(s3_server, s3_bucket, s3_options,
                                                       tmp_path):
    """MRXS needs its data folder next to it; all files land in one cache entry."""
    client = _client(s3_server)
    parts = {"case/slide.mrxs": b"[GENERAL]\n", "case/slide/Slidedat.ini": b"[GENERAL]\nx=1\n",
             "case/slide/Data0000.dat": bytes(range(256)) * 40, "case/other.txt": b"no"}
    for key, body in parts.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    cache = SlideCache(tmp_path / "c", max_bytes=1 << 20)
    entry = cache.fetch(f"s3://{s3_bucket}/case/slide.mrxs", storage_options=s3_options)
    assert entry.path.name == "slide.mrxs"
    staged = sorted(str(p.relative_to(entry.path.parent))
                    for p in entry.path.parent.rglob("*") if p.is_file() and
                    not p.name.startswith("."))
    assert staged == ["slide.mrxs", "slide/Data0000.dat", "slide/Slidedat.ini"]
    assert (entry.path.parent / "slide/Data0000.dat").read_bytes() == parts["case/slide/Data0000.dat"]
    assert cache.total_bytes() == sum(len(v) for k, v in parts.items() if "other" not in k)
    cache.release(entry.path)
    # Not a real MRXS: opening it names the slide and says what is wrong.
    with pytest.raises(CareScaleError) as info:
        open_slide(f"s3://{s3_bucket}/case/slide.mrxs", storage_options=s3_options, cache=cache)
    assert "slide.mrxs" in str(info.value)
