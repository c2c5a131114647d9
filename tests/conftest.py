"""Shared fixtures: real components only.

- ``s3_server``: a real S3 protocol server (moto's server mode) on loopback, in its own process.
- ``s3_bucket`` / ``s3_options``: a fresh bucket on it and care-scale storage options for it.
- ``ray_local``: a real local Ray cluster (one per test session).
- ``shared_data``: a folder with the real slides of tests/data (copied) and a generated
  damaged upload, ``broken.svs``; extra local slides from ``CARE_SCALE_TEST_DATA``.
Tests marked ``gpu`` skip with the reason when no CUDA device exists; tests that use
``ray_local`` are marked ``slow``.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real slides kept in the repository (origin and licence: tests/data/README.md).
TEST_DATA = Path(__file__).resolve().parent / "data"

# Keep test processes from fighting over the 2 cores with oversubscribed thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Every Ray server the tests start (local clusters, `ray start` heads, job drivers) listens on
# 127.0.0.1 only; Ray reads this when it is first imported (see care_scale.local_ray).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The local Spark of the query tests: driver and block manager on loopback too.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pytest_addoption(parser):
    parser.addoption("--network", action="store_true", default=False,
                     help="also run the tests marked `network` (they ask the package index)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the slow marks below must be there
def pytest_collection_modifyitems(config, items):
    # Every test that starts the local Ray cluster takes tens of seconds (a Ray Data or Ray
    # Train run): it counts as slow, so `pytest -m "not slow"` is the quick subset.
    for item in items:
        if "ray_local" in item.fixturenames and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
    if not config.getoption("--network"):
        skip_net = pytest.mark.skip(reason="asks the package index; run with --network")
        for item in items:
            if "network" in item.keywords:
                item.add_marker(skip_net)
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def write_broken_svs(path: Path) -> Path:
    """A corrupt upload: 1,001 bytes of base64 text with an .svs name, no TIFF header at all
    (what histolab's broken.svs fixture is). Every backend must reject it as CorruptSlideError."""
    text = base64.b64encode(random.Random(1001).randbytes(750))  # 1,000 characters
    path.write_bytes(text + b"\n")
    return path


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """One folder of slides: copies of tests/data, the generated ``broken.svs``, and links to
    any extra local slides in the folder ``CARE_SCALE_TEST_DATA`` names (optional)."""
    out = tmp_path_factory.mktemp("slides")
    for src in sorted(TEST_DATA.iterdir()):
        if src.is_file() and src.name != "README.md":
            shutil.copyfile(src, out / src.name)
    if not (out / "CMU-1-Small-Region.svs").exists():
        pytest.fail(f"real test slide missing: {TEST_DATA / 'CMU-1-Small-Region.svs'}")
    write_broken_svs(out / "broken.svs")
    extra = os.environ.get("CARE_SCALE_TEST_DATA")
    if extra and Path(extra).is_dir():
        for src in sorted(Path(extra).iterdir()):
            if src.is_file() and not (out / src.name).exists():
                (out / src.name).symlink_to(src.resolve())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start ``moto.server`` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
    )
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_options(s3_server) -> dict:
    """care-scale storage options (object_store spelling) for the loopback S3 server."""
    return {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing-secret",
        "aws_region": "us-east-1",
        "aws_endpoint_url": s3_server,
        "aws_allow_http": "true",
        "aws_conditional_put": "etag",
    }


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id="testing",
        aws_secret_access_key="testing-secret", region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the tests of one session."""
    import ray

    if not ray.is_initialized():
        # address="local" always starts a fresh cluster for this session, never joins a
        # cluster someone started with `ray start` on the same machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()
