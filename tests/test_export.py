"""ONNX export, parity, artifacts on S3, TensorRT: real files, real ONNX Runtime, moto S3 server."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from care_scale.artifacts import EngineRecord, fetch_onnx
from care_scale.exceptions import ConfigError, ExportError, ParityError, TensorRTUnavailableError
from care_scale.export import export_patch_encoder, export_slide_encoder, read_manifest
from care_scale.export.onnx_export import read_metadata
from care_scale.export.parity import (
    check_patch_parity,
    check_slide_parity,
    random_slide,
    random_tiles,
    slide_grid_tiles,
)
from care_scale.inference.tensorrt_backend import GpuTarget, find_engine, tensorrt_status
from care_scale.models import create_patch_encoder, create_slide_encoder, model_version

torch.set_num_threads(2)
SLIDE = "CMU-1-Small-Region.svs"


@pytest.fixture(autouse=True)
def _quiet_untrained():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*UNTRAINED.*")
        yield


@pytest.fixture(scope="module")
def micro():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_patch_encoder("vit_micro_patch16_64")


@pytest.fixture(scope="module")
def care_tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_slide_encoder("care_tiny")


@pytest.fixture(scope="module")
def micro_export(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    return export_patch_encoder(micro, out=str(out)), out


def test_patch_export_is_checker_clean_with_metadata(micro, micro_export):
    result, out = micro_export
    path = out / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = read_metadata(path)
    assert meta["kind"] == "patch_encoder"
    assert meta["model_version"] == model_version(micro) == result.manifest.model_version
    assert int(meta["input_size"]) == micro.spec.input_size == 64
    assert int(meta["embed_dim"]) == 64 and int(meta["patch_size"]) == 64
    assert json.loads(meta["mean"]) == list(micro.spec.mean)
    assert json.loads(meta["std"]) == list(micro.spec.std)
    assert float(meta["mpp"]) == micro.spec.mpp
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 64
    # TensorRT needs the uint8 input to feed a Cast directly.
    first = [n for n in model.graph.node if "tiles" in n.input]
    assert [n.op_type for n in first] == ["Cast"]
    manifest = read_manifest(str(out))
    assert manifest.onnx_sha256 and manifest.parity["reports"][0]["passed"]


def test_patch_parity_random_and_dynamic_batch(micro, micro_export):
    import onnxruntime as ort

    _, out = micro_export
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 3, 17):
        tiles = random_tiles(b, 64, seed=b)
        (got,) = session.run(None, {"tiles": tiles})
        with torch.inference_mode():
            ref = micro(torch.from_numpy(tiles)).numpy()
        assert got.shape == (b, 64)
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    report = check_patch_parity(out / "model.onnx", micro, random_tiles(12, 64, seed=7))
    print(report)
    assert report.passed and report.rel_linf < 1e-4 and report.rel_l2 < 1e-4


def test_patch_parity_on_real_tiles_with_resize(shared_data, tmp_path):
    # vit_demo takes 112 px: 224 px tiles of the real slide exercise the in-graph
    # (antialiased) resize as well as the normalisation on real H&E statistics.
    result = export_patch_encoder("vit_demo_patch16_112", out=str(tmp_path), tile_size=224,
                                  parity_slide=shared_data / SLIDE, parity_tiles=8)
    sources = {r.source: r for r in result.parity}
    assert set(sources) == {"random", SLIDE}
    for r in result.parity:
        print(r)
        assert r.passed and r.rel_l2 < 1e-4 and r.rel_linf < 1e-4
    assert read_metadata(tmp_path / "model.onnx")["tile_size"] == "224"


def test_banded_resize_is_the_dense_product():
    """The graph's row resize reads windows of the input; it must be the same linear map."""
    from care_scale.export.onnx_export import banded_rows, resize_matrix

    for src, dst in ((224, 64), (256, 224), (100, 64), (48, 64), (512, 112)):
        matrix = resize_matrix(src, dst)
        banded = banded_rows(matrix)
        if banded is None:  # no saving: the graph keeps the dense product
            continue
        blocks, index = banded
        x = torch.rand(src, 5, dtype=torch.float64).float()
        got = (blocks @ x[index].view(len(blocks), -1, 5)).reshape(-1, 5)[:dst]
        torch.testing.assert_close(got, matrix @ x, rtol=1e-5, atol=1e-5)
    assert banded_rows(resize_matrix(224, 64)) is not None  # the demo/benchmark case is banded


@pytest.mark.parametrize("tile", [224, 100, 48, 64])
def test_export_graph_resize_matches_the_encoder(micro, tile):
    """Shrinking, enlarging and no resize: the export view equals the torch encoder."""
    from care_scale.export.onnx_export import PatchEncoderGraph

    graph = PatchEncoderGraph(micro, tile).eval()
    tiles = torch.from_numpy(random_tiles(3, tile, seed=tile))
    with torch.no_grad():
        ref, got = micro(tiles), graph(tiles)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_failed_parity_raises_with_numbers(micro, micro_export, tmp_path):
    _, out = micro_export
    model = onnx.load(str(out / "model.onnx"))
    # Perturb one weight matrix of the exported graph.
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[: w.size // 4] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ParityError, match=r"rel_linf=\d\.\d+e[-+]\d+.*FAILED"):
        check_patch_parity(bad, micro, random_tiles(4, 64))


def test_slide_export_parity_at_two_sizes(care_tiny, tmp_path):
    result = export_slide_encoder(care_tiny, out=str(tmp_path), parity_sizes=(97, 1500))
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    meta = read_metadata(tmp_path / "model.onnx")
    assert meta["kind"] == "slide_encoder" and meta["model_version"] == model_version(care_tiny)
    assert meta["in_dim"] == "192" and meta["patch_encoder"] == "vit_demo_patch16_112"
    assert {"mpp", "patch_size", "mean", "std", "embed_dim", "config"} <= set(meta)
    assert [r.n for r in result.parity] == [97, 1500]
    for r in result.parity:
        print(r)
        assert r.passed and r.rel_l2 < 1e-4
        assert r.extra["assignments_equal"] and r.extra["roi_equal"]
        assert r.extra["regions_ok"] and r.extra["num_regions"] > 1
    # A third size, never seen at export time, through the same file: the axis is dynamic.
    (rep,) = check_slide_parity(tmp_path / "model.onnx", care_tiny,
                                [random_slide(3000, 192, seed=9)])
    assert rep.passed and rep.extra["assignments_equal"]


def test_slide_parity_on_features_of_real_tiles(shared_data, care_tiny, tmp_path):
    from care_scale.models.features import coords_to_grid

    encoder = create_patch_encoder("vit_demo_patch16_112")
    tiles, coords = slide_grid_tiles(shared_data / SLIDE, 112)  # every 112 px tile
    with torch.inference_mode():
        feats = torch.cat([encoder(torch.from_numpy(tiles[i:i + 64]))
                           for i in range(0, len(tiles), 64)]).numpy()
    grid, _ = coords_to_grid(coords, 112)
    result = export_slide_encoder(care_tiny, out=str(tmp_path), parity_sizes=(50, 200),
                                  parity_slides=[(feats, grid)])
    real = [r for r in result.parity if r.source == "given"]
    assert len(real) == 1 and real[0].n == len(tiles) > 400
    print(real[0])
    assert real[0].passed and real[0].extra["assignments_equal"]


def test_artifacts_roundtrip_through_s3(micro, s3_options, s3_bucket, tmp_path):
    from care_scale.export import create_patch_backend

    uri = f"s3://{s3_bucket}/exports/micro"
    result = export_patch_encoder(micro, out=uri, storage_options=s3_options)
    manifest = read_manifest(uri, storage_options=s3_options)
    assert manifest.model_version == result.manifest.model_version
    path, _ = fetch_onnx(uri, storage_options=s3_options, cache_dir=tmp_path)
    assert read_metadata(path)["model_version"] == model_version(micro)
    backend = create_patch_backend("onnxruntime", artifacts=uri, storage_options=s3_options,
                                   cache_dir=tmp_path)
    tiles = random_tiles(5, 64, seed=3)
    with torch.inference_mode():
        ref = micro(torch.from_numpy(tiles)).numpy()
    assert backend.kind == "onnxruntime" and backend.model_version == manifest.model_version
    assert np.abs(backend(tiles) - ref).max() / np.abs(ref).max() < 1e-4

    # An object changed after export is caught by its checksum.
    import fsspec

    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(s3_options, uri))
    fs.pipe(f"{s3_bucket}/exports/micro/model.onnx", b"not an onnx file")
    with pytest.raises(ExportError, match="sha256"):
        fetch_onnx(uri, storage_options=s3_options, cache_dir=tmp_path / "fresh")


def test_bad_requests_are_specific_errors(micro, tmp_path):
    with pytest.raises(ExportError, match="manifest"):
        read_manifest(str(tmp_path))
    with pytest.raises(ExportError, match="opset"):
        export_patch_encoder(micro, out=str(tmp_path / "x"), opset=13)
    with pytest.raises(ConfigError, match="two different"):
        export_slide_encoder("care_tiny", out=str(tmp_path / "y"), parity_sizes=(50, 50))
    assert not (tmp_path / "x").exists()  # a failed export leaves nothing at `out`


def test_engine_lookup_is_keyed_by_gpu_arch_and_tensorrt_version():
    rec = EngineRecord(file="tensorrt/m-sm86-trt10.3.0-fp16-b1_64_256.engine",
                       key="m-sm86-trt10.3.0-fp16-b1_64_256", compute_capability="8.6",
                       tensorrt_version="10.3.0", precision="fp16", min_batch=1,
                       opt_batch=64, max_batch=256)
    assert find_engine([rec], GpuTarget("8.6", "10.3.0", "A10")) is rec
    assert find_engine([rec], GpuTarget("8.0", "10.3.0", "A100")) is None  # other arch
    assert find_engine([rec], GpuTarget("8.6", "10.5.0", "A10")) is None  # other TensorRT
    assert find_engine([], GpuTarget("8.6", "10.3.0", "A10")) is None


@pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is usable on this machine")
def test_tensorrt_request_without_gpu_is_one_line_cli_error(tmp_path, capsys):
    from care_scale.cli import main

    code = main(["export", "patch-encoder", "--model", "vit_micro_patch16_64",
                 "--out", str(tmp_path / "trt"), "--tensorrt"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("TensorRTUnavailableError: ") and "\n" not in err
    assert "CUDA" in err or "tensorrt" in err
    assert not (tmp_path / "trt").exists()
    with pytest.raises(TensorRTUnavailableError):
        export_patch_encoder("vit_micro_patch16_64", out=str(tmp_path / "t2"), tensorrt=True)


def test_cli_exports_print_parity_figures(tmp_path, capsys):
    from care_scale.cli import main

    assert main(["export", "slide-encoder", "--model", "care_tiny", "--out",
                 str(tmp_path / "care"), "--parity-sizes", "60,300"]) == 0
    out = capsys.readouterr().out
    assert "N=60" in out and "N=300" in out and "assignments_equal=True" in out
    assert read_manifest(str(tmp_path / "care")).kind == "slide_encoder"


@pytest.mark.gpu
def test_tensorrt_engine_build_and_run(tmp_path):
    from care_scale.export import create_patch_backend
    from care_scale.export.tensorrt import EngineOptions
    from care_scale.inference.tensorrt_backend import current_target

    result = export_patch_encoder(
        "vit_micro_patch16_64", out=str(tmp_path), tensorrt=True,
        tensorrt_options=EngineOptions(precision="fp16", min_batch=1, opt_batch=8,
                                       max_batch=16),
    )
    (rec,) = result.manifest.engines
    target = current_target()
    assert rec.compute_capability == target.compute_capability
    assert rec.tensorrt_version == target.tensorrt_version
    assert (tmp_path / rec.file).exists() and (tmp_path / rec.timing_cache).exists()
    backend = create_patch_backend("auto", artifacts=str(tmp_path))
    assert backend.kind == "tensorrt"
    tiles = random_tiles(40, 64, seed=1)  # > max_batch: split into profile-sized chunks
    ref = create_patch_backend("torch", "vit_micro_patch16_64", device="cpu")(tiles)
    got = backend(tiles)
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 2e-2  # FP16 engine


@pytest.mark.gpu
def test_tensorrt_int8_engine_with_calibration(tmp_path):
    from care_scale.export.tensorrt import EngineOptions

    calib = random_tiles(64, 64, seed=2)
    result = export_patch_encoder(
        "vit_micro_patch16_64", out=str(tmp_path), tensorrt=True,
        tensorrt_options=EngineOptions(precision="int8", calibration_tiles=calib,
                                       calibration_batch=16, opt_batch=16, max_batch=32),
    )
    assert result.manifest.engines[0].precision == "int8"


def test_cli_patch_export_from_checkpoint(micro, tmp_path, capsys):
    from care_scale.cli import main
    from care_scale.models import save_checkpoint

    tuned = create_patch_encoder("vit_micro_patch16_64")
    with torch.no_grad():
        tuned.norm.bias.add_(0.1)  # "fine-tuned" weights: another model version
    ckpt = save_checkpoint(tuned, str(tmp_path / "ckpt"))
    out = tmp_path / "exp"
    assert main(["export", "patch-encoder", "--model", "vit_micro_patch16_64",
                 "--checkpoint", ckpt, "--out", str(out), "--opset", "18"]) == 0
    printed = capsys.readouterr().out
    assert "rel_linf=" in printed and "-> ok" in printed
    manifest = read_manifest(str(out))
    assert manifest.model_version == model_version(tuned) != model_version(micro)
    assert manifest.trained and manifest.opset == 18


def test_paper_size_care_exports_with_parity(tmp_path):
    # The paper configuration (768 -> 512, 8 heads, k = 8), not just the tiny one.
    result = export_slide_encoder("care", out=str(tmp_path), parity_sizes=(300, 2500))
    for r in result.parity:
        print(r)
        assert r.passed and r.extra["assignments_equal"] and r.extra["num_regions"] > 1
    assert read_metadata(tmp_path / "model.onnx")["in_dim"] == "768"
