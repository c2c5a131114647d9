"""Inference backends: torch vs ONNX Runtime agree, auto chooses as documented, errors are clear."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from care_scale.exceptions import (
    ConfigError,
    ExportError,
    ModelInputError,
    TensorRTUnavailableError,
)
from care_scale.export import create_patch_backend, create_slide_backend, export_patch_encoder
from care_scale.export.parity import random_slide, random_tiles
from care_scale.inference import choose_patch_kind
from care_scale.inference.tensorrt_backend import tensorrt_status
from care_scale.models import create_patch_encoder, create_slide_encoder, model_version

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _quiet_untrained():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*UNTRAINED.*")
        yield


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,size", [("vit_micro_patch16_64", 64),
                                       ("vit_demo_patch16_112", 112)])
def test_torch_and_onnxruntime_give_equal_features(name, size, tmp_path):
    t = create_patch_backend("torch", name)
    o = create_patch_backend("onnxruntime", name, cache_dir=tmp_path)
    assert (t.kind, o.kind) == ("torch", "onnxruntime")
    assert t.model_version == o.model_version == model_version(create_patch_encoder(name))
    assert t.embed_dim == o.embed_dim
    tiles = random_tiles(9, size, seed=4)
    a, b = t(tiles), o(tiles)
    assert a.dtype == b.dtype == np.float32 and a.shape == (9, t.embed_dim)
    assert rel(b, a) < 1e-4
    assert o.describe()["backend"] == "onnxruntime" and o.describe()["model_version"]


def test_auto_picks_onnxruntime_here(tmp_path):
    if tensorrt_status()[0]:
        pytest.skip("TensorRT is usable here; auto may take it when an engine exists")
    kind, reason = choose_patch_kind("auto")
    assert kind == "onnxruntime" and "TensorRT not used" in reason
    backend = create_patch_backend("auto", "vit_micro_patch16_64", cache_dir=tmp_path)
    assert backend.kind == "onnxruntime"
    assert "TensorRT not used" in backend.selection


def test_on_the_fly_export_is_cached_by_model_version(tmp_path):
    b1 = create_patch_backend("onnxruntime", "vit_micro_patch16_64", cache_dir=tmp_path)
    stamp = b1.path.stat().st_mtime_ns
    b2 = create_patch_backend("onnxruntime", "vit_micro_patch16_64", cache_dir=tmp_path)
    assert b2.path == b1.path and b2.path.stat().st_mtime_ns == stamp
    assert b1.model_version in str(b1.path)
    # Another tile size: exported on first use, into its own cache entry.
    tiles = random_tiles(3, 80, seed=1)
    ref = create_patch_backend("torch", "vit_micro_patch16_64")(tiles)
    assert rel(b1(tiles), ref) < 1e-4
    assert len(list((tmp_path / "onnx").iterdir())) == 2


def test_artifacts_fix_the_tile_size_and_the_model(tmp_path):
    export_patch_encoder("vit_micro_patch16_64", out=str(tmp_path / "a"))
    backend = create_patch_backend("onnxruntime", artifacts=str(tmp_path / "a"))
    assert backend.model_name == "vit_micro_patch16_64"
    with pytest.raises(ModelInputError, match="64 px tiles, got 80 px"):
        backend(random_tiles(2, 80))
    with pytest.raises(ConfigError, match="vit_micro_patch16_64"):
        create_patch_backend("onnxruntime", "vit_demo_patch16_112",
                             artifacts=str(tmp_path / "a"))
    other = create_patch_encoder("vit_micro_patch16_64")
    with torch.no_grad():
        other.norm.weight.add_(1.0)  # same architecture, other weights -> other version
    with pytest.raises(ConfigError, match="export it again"):
        create_patch_backend("onnxruntime", other, artifacts=str(tmp_path / "a"))


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_bad_tiles_are_model_input_errors(kind, tmp_path):
    backend = create_patch_backend(kind, "vit_micro_patch16_64", cache_dir=tmp_path)
    with pytest.raises(ModelInputError, match="uint8"):
        backend(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ModelInputError, match="empty"):
        backend(np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ModelInputError):
        backend(np.zeros((2, 64, 64), np.uint8))


def test_unknown_and_unavailable_kinds():
    with pytest.raises(ConfigError, match="unknown backend"):
        create_patch_backend("openvino", "vit_micro_patch16_64")
    if not tensorrt_status()[0]:
        with pytest.raises(TensorRTUnavailableError, match="no CUDA device|tensorrt"):
            create_patch_backend("tensorrt", "vit_micro_patch16_64")
    with pytest.raises(ConfigError, match="TensorRT"):
        create_slide_backend("tensorrt", "care_tiny")


def test_slide_backends_agree_with_care_encode(tmp_path):
    care = create_slide_encoder("care_tiny")
    t = create_slide_backend("torch", care)
    o = create_slide_backend("auto", care, cache_dir=tmp_path)
    assert o.kind == "onnxruntime" and t.model_version == o.model_version
    for n, seed in ((40, 0), (900, 1)):
        feats, grid = random_slide(n, 192, seed=seed)
        coords = grid * 224 + 3000  # level-0 pixels, offset origin
        ref = care.encode(feats, coords)
        for enc in (t.encode(feats, coords), o.encode(feats, coords)):
            assert enc.model_version == ref.model_version
            assert enc.num_regions == ref.num_regions and enc.roi_index == ref.roi_index
            np.testing.assert_array_equal(enc.region_of_patch, ref.region_of_patch)
            assert rel(enc.slide_embedding, ref.slide_embedding) < 1e-4
            assert rel(enc.region_embeddings, ref.region_embeddings) < 1e-4
    with pytest.raises(ModelInputError, match="NaN"):
        o.encode(np.full((5, 192), np.nan, np.float32), np.zeros((5, 2)))


def test_int8_with_8_bit_weights_is_its_own_version_and_runs_only_where_the_cpu_has_vnni(
        tmp_path, monkeypatch):
    """8-bit weights (full range) are exact only with VNNI / AMX-INT8's 32-bit sums: another
    model version, exported and loaded on such CPUs only, with a clear error elsewhere (a CPU
    without them is simulated by its flags where this one has them)."""
    from care_scale.inference import precision
    from care_scale.inference.onnx_backend import _check_int8_weights

    assert precision.int8_weight_bits(frozenset({"avx2", "avx512f"})) == 7
    assert precision.int8_weight_bits(frozenset({"avx2", "avx512_vnni"})) == 8
    assert precision.int8_weight_bits(frozenset({"avx2", "avx_vnni"})) == 8
    meta = {"int8_weight_bits": "8"}
    with pytest.raises(ExportError, match="graph.onnx: .*no VNNI"):
        _check_int8_weights(meta, source="graph.onnx", flags=frozenset({"avx2"}))
    _check_int8_weights(meta, source="graph.onnx", flags=frozenset({"amx_int8"}))
    _check_int8_weights({"int8_weight_bits": "7"}, source="x", flags=frozenset())

    out = tmp_path / "w8"
    avx2_only = frozenset({"avx2", "avx512f"})
    if precision.int8_weight_bits() == 8:
        result = export_patch_encoder("vit_micro_patch16_64", out=str(out), int8=True,
                                      int8_weight_bits=8)
        variant = result.manifest.variants["int8"]
        assert variant["weight_bits"] == 8 and all(r["passed"] for r in variant["parity"])
        q = create_patch_backend("auto", artifacts=str(out), precision="int8")
        assert q.model_version == variant["model_version"] == result.manifest.model_version + \
            "+int8w8"
        tiles = random_tiles(6, 64, seed=2)
        ref = create_patch_backend("torch", "vit_micro_patch16_64")(tiles)
        err = np.linalg.norm(q(tiles) - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert 0 < err.max() < 0.1
        monkeypatch.setattr(precision, "cpu_flags", lambda *a, **k: avx2_only)
        with pytest.raises(ExportError, match="no VNNI"):  # the same graph elsewhere
            create_patch_backend("auto", artifacts=str(out), precision="int8")
    monkeypatch.setattr(precision, "cpu_flags", lambda *a, **k: avx2_only)
    with pytest.raises(ExportError, match="VNNI"):
        export_patch_encoder("vit_micro_patch16_64", out=str(tmp_path / "no"), int8=True,
                             int8_weight_bits=8)


def test_reduced_precision_has_its_own_model_version(tmp_path):
    out = tmp_path / "a"
    result = export_patch_encoder("vit_micro_patch16_64", out=str(out), int8=True)
    int8_reports = [r for r in result.parity if r.name.endswith("int8")]
    assert int8_reports and all(r.passed and r.tol == 0.1 for r in int8_reports)
    fp32 = create_patch_backend("onnxruntime", artifacts=str(out))
    q = create_patch_backend("auto", artifacts=str(out), precision="int8")
    assert q.kind == "onnxruntime" and q.model_version == fp32.model_version + "+int8"
    assert result.manifest.variants["int8"]["model_version"] == q.model_version
    tiles = random_tiles(6, 64, seed=2)
    ref = create_patch_backend("torch", "vit_micro_patch16_64")(tiles)
    err = np.linalg.norm(q(tiles) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert 0 < err.max() < 0.1  # quantised: close, but not equal
    bf16 = create_patch_backend("auto", "vit_micro_patch16_64", precision="bf16")
    assert bf16.kind == "torch" and bf16.model_version == fp32.model_version + "+bf16"
    with pytest.raises(ConfigError, match="precision"):
        create_patch_backend("onnxruntime", "vit_micro_patch16_64", precision="bf16",
                             cache_dir=tmp_path)
    plain = tmp_path / "b"
    export_patch_encoder("vit_micro_patch16_64", out=str(plain))
    with pytest.raises(ExportError, match="no int8 variant"):
        create_patch_backend("onnxruntime", artifacts=str(plain), precision="int8")


def test_artifacts_must_match_checkpoint_and_tile_size(tmp_path):
    from care_scale.models import save_checkpoint

    export_patch_encoder("vit_micro_patch16_64", out=str(tmp_path / "a"))
    tuned = create_patch_encoder("vit_micro_patch16_64")
    with torch.no_grad():
        tuned.norm.bias.add_(0.1)
    ckpt = save_checkpoint(tuned, str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="export it again"):
        create_patch_backend("onnxruntime", "vit_micro_patch16_64", checkpoint=ckpt,
                             artifacts=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="--tile-size 96"):
        create_patch_backend("onnxruntime", "vit_micro_patch16_64",
                             artifacts=str(tmp_path / "a"), tile_size=96)
    ok = create_patch_backend("onnxruntime", "vit_micro_patch16_64",
                              artifacts=str(tmp_path / "a"), tile_size=64)
    assert ok.info.tile_size == 64
