"""Published checkpoints: hf: URIs from a local Hugging Face cache, CONCH v1.5's architecture
against its reference code (fixtures in tests/data/reference, made by make_conch_v1_5.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from care_scale.exceptions import CheckpointError
from care_scale.models import create_patch_encoder
from care_scale.models.hub import hub_cache_dir, parse_hf_uri, resolve_hf_snapshot
from care_scale.models.registry import get_patch_encoder_spec

REF = Path(__file__).parent / "data" / "reference"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_snapshot(cache: Path, repo: str, files: dict[str, bytes | None],
                  revision: str = "main", commit: str = COMMIT) -> Path:
    """The layout huggingface_hub writes: files are links into blobs/, refs name commits."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / f"{abs(hash(name)):x}"
        blob.write_bytes(data or b"")
        (snap / name).symlink_to(blob)
    return snap


def torch_bytes(state: dict[str, torch.Tensor], tmp: Path) -> bytes:
    path = tmp / "w.bin"
    torch.save(state, path)
    return path.read_bytes()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_hf_uris_parse_and_resolve_offline(hf_cache, monkeypatch, tmp_path):
    assert parse_hf_uri("hf:MahmoodLab/conchv1_5") == ("MahmoodLab/conchv1_5", "main")
    assert parse_hf_uri("hf:Zipper-1/CARE@v1") == ("Zipper-1/CARE", "v1")
    with pytest.raises(CheckpointError, match="expected hf:ORG/NAME"):
        parse_hf_uri("hf:no-slash")
    snap = fake_snapshot(hf_cache, "org/model", {"a.bin": b"x"})
    assert resolve_hf_snapshot("hf:org/model", files=("a.bin",)) == snap
    assert resolve_hf_snapshot(f"hf:org/model@{COMMIT}") == snap
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set for libraries loaded afterwards
    # HF_HOME is honoured when HF_HUB_CACHE is not set.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"


@pytest.mark.parametrize("case", ["repo", "revision", "file"])
def test_a_missing_snapshot_is_one_line_naming_the_files_and_the_command(hf_cache, case):
    if case != "repo":
        fake_snapshot(hf_cache, "MahmoodLab/conchv1_5", {"config.json": b"{}"})
    uri = "hf:MahmoodLab/conchv1_5" + ("@v9" if case == "revision" else "")
    with pytest.raises(CheckpointError) as err:
        create_patch_encoder("conch_v1_5", uri)
    msg = str(err.value)
    assert "\n" not in msg
    assert "pytorch_model_vision.bin" in msg
    assert "huggingface-cli download MahmoodLab/conchv1_5" in msg
    assert str(hf_cache) in msg


def conch_micro_snapshot(hf_cache: Path, tmp_path: Path, state=None) -> str:
    """The fixture's state dict as a user's snapshot holds CONCH v1.5: a torch file named as
    published, beside a config.json."""
    state = state if state is not None else load_file(str(REF / "conch_v1_5_micro.safetensors"))
    fake_snapshot(hf_cache, "test-org/conch-micro", {
        "pytorch_model_vision.bin": torch_bytes(state, tmp_path),
        "config.json": json.dumps({"architecture": "conch_v1_5"}).encode(),
    })
    return "hf:test-org/conch-micro"


def test_conch_v1_5_matches_its_reference_code(hf_cache, tmp_path, capsys):
    io = load_file(str(REF / "conch_v1_5_micro_io.safetensors"))
    enc = create_patch_encoder("conch_v1_5_micro", conch_micro_snapshot(hf_cache, tmp_path))
    assert enc.trained
    with torch.no_grad():
        # The network itself, on the reference transform's own input: fp32 parity.
        same_input = (enc.forward_normalized(io["normalized"]) - io["expected"]).abs().max()
        # Our preprocessing against torchvision/PIL's Resize + ToTensor + Normalize.
        pre = enc.preprocess(io["tiles"])
        std = torch.tensor(enc.spec.std).view(1, 3, 1, 1)
        gray_levels = ((pre - io["normalized"]).abs() * std * 255).max()
        from_tiles = (enc(io["tiles"]) - io["expected"]).abs().max()
    with capsys.disabled():
        print(f"\nCONCH v1.5 (test size) vs reference: max abs {same_input:.2e} on the same "
              f"input; preprocessing within {gray_levels:.2f} gray levels; from uint8 tiles "
              f"max abs {from_tiles:.2e} (outputs up to {io['expected'].abs().max():.2f})")
    assert same_input <= 1e-5
    # PIL resizes in fixed point and rounds to uint8; we resize in float.
    assert gray_levels <= 1.0 + 1e-3
    assert from_tiles <= 0.02


def test_conch_v1_5_refuses_a_renamed_or_missing_key(hf_cache, tmp_path):
    state = load_file(str(REF / "conch_v1_5_micro.safetensors"))
    state["attn_pool_contrast.to_query.weight"] = state.pop("attn_pool_contrast.to_q.weight")
    with pytest.raises(CheckpointError) as err:
        create_patch_encoder("conch_v1_5_micro", conch_micro_snapshot(hf_cache, tmp_path, state))
    assert "attn_pool.to_q.weight" in str(err.value)  # missing, in our names
    assert "attn_pool_contrast.to_query.weight" in str(err.value)  # unexpected, as given
    # Non-strict: it loads, but a random head is not a trained model.
    with pytest.warns(UserWarning, match="UNTRAINED"):
        loose = create_patch_encoder("conch_v1_5_micro", "hf:test-org/conch-micro",
                                     strict=False)
    assert not loose.trained


def test_the_conch_v1_5_entry_carries_the_published_facts():
    spec = get_patch_encoder_spec("conch_v1_5")
    assert (spec.embed_dim, spec.input_size, spec.width, spec.depth) == (768, 448, 1024, 24)
    assert spec.pool == "attn_pool" and spec.pool_heads == 8 and spec.grid == 14
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert (spec.tile_size, spec.mpp) == (512, 0.5)
    assert spec.hf_repo == "MahmoodLab/conchv1_5"
    assert spec.weight_files == ("pytorch_model_vision.bin",)
    with torch.device("meta"):
        from care_scale.models.registry import patch_encoder_entry

        model = patch_encoder_entry("conch_v1_5").build(spec)
    keys = set(model.state_dict())
    # The ten keys of the published head, in our names; no CLS projection head.
    head = {k for k in keys if k.startswith(("attn_pool.", "pool_norm."))}
    assert len(head) == 10 and not any(k.startswith("head.") for k in keys)
    assert tuple(model.state_dict()["pos_embed"].shape) == (1, 14 * 14 + 1, 1024)


def test_a_plain_folder_with_the_published_file_name_loads(tmp_path):
    state = load_file(str(REF / "conch_v1_5_micro.safetensors"))
    (tmp_path / "conch").mkdir()
    torch.save(state, tmp_path / "conch" / "pytorch_model_vision.bin")
    enc = create_patch_encoder("conch_v1_5_micro", str(tmp_path / "conch"))
    assert enc.trained


def test_models_command_lists_the_registry_and_finds_local_snapshots(hf_cache, tmp_path,
                                                                     capsys):
    from care_scale.cli import main

    snap = fake_snapshot(hf_cache, "MahmoodLab/conchv1_5",
                         {"pytorch_model_vision.bin": b"x", "config.json": b"{}"})
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["conch_v1_5"]["weights"] == str(snap)
    assert rows["conch_v1_5"]["tiling"] == "512 px @ 0.5 um/px"
    assert rows["care"]["weights"] == "not in the HF cache"
    assert rows["care"]["in"].startswith("768-d (conch_v1_5)")
    assert main(["models"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["name", "kind", "in"]


def export_and_run(fixture: str, weights_name: str, tmp_path: Path):
    """Load ``fixture`` (a micro entry's state dict) from a folder under the published file
    name, export it to ONNX with its parity check, run the file on the fixture's tiles.
    Returns (ONNX output, torch output, the reference's output)."""
    import onnxruntime as ort

    from care_scale.export import export_patch_encoder

    (tmp_path / "w").mkdir()
    torch.save(load_file(str(REF / f"{fixture}.safetensors")), tmp_path / "w" / weights_name)
    enc = create_patch_encoder(fixture, str(tmp_path / "w"))
    io = load_file(str(REF / f"{fixture}_io.safetensors"))
    result = export_patch_encoder(enc, out=str(tmp_path / "onnx"), tile_size=enc.spec.tile_size)
    assert result.manifest.parity["reports"][0]["passed"]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tiles": io["tiles"].numpy()})
    with torch.no_grad():
        ours = enc(io["tiles"]).numpy()
    return got, ours, io["expected"].numpy()


def test_conch_v1_5_exports_to_onnx_with_parity(tmp_path):
    got, ours, expected = export_and_run("conch_v1_5_micro", "pytorch_model_vision.bin",
                                         tmp_path)
    assert abs(got - ours).max() <= 1e-4 * abs(ours).max()
    assert abs(got - expected).max() <= 0.02


# ------------------------------------------ the published patch encoders (make_patch_encoders.py)

ZOO = json.loads((REF / "patch_encoders_micro.json").read_text())["models"]


def published_config(name: str) -> dict:
    """The config.json beside the weights: transformers' own (Phikon-v2), else timm's hub
    layout with the literal arguments the fixture's model was created with."""
    config = REF / f"{name}_micro.config.json"
    if config.exists():
        return json.loads(config.read_text())
    import ast

    args = {}
    for key, text in ZOO[name]["timm_kwargs"].items():
        try:
            args[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):  # a class such as mlp_layer: not a JSON value
            continue
    return {"architecture": ZOO[name]["timm_model"], "model_args": args}


def zoo_snapshot(hf_cache: Path, tmp_path: Path, name: str, state=None) -> str:
    """A user's snapshot of ``name``'s repository, at test size: the published file names
    (timm's ``pytorch_model.bin``; Phikon-v2's ``model.safetensors`` + ``config.json``)."""
    spec = get_patch_encoder_spec(name)
    weights = REF / f"{name}_micro.safetensors"
    state = state if state is not None else load_file(str(weights))
    (file,) = spec.weight_files
    files = {file: save(state) if file.endswith(".safetensors") else torch_bytes(state, tmp_path)}
    files["config.json"] = json.dumps(published_config(name)).encode()
    repo = f"test-org/{name}-micro"
    fake_snapshot(hf_cache, repo, files)
    return f"hf:{repo}"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_published_encoder_matches_its_reference(name, hf_cache, tmp_path, capsys):
    io = load_file(str(REF / f"{name}_micro_io.safetensors"))
    enc = create_patch_encoder(f"{name}_micro", zoo_snapshot(hf_cache, tmp_path, name))
    assert enc.trained and enc.spec.weight_files == get_patch_encoder_spec(name).weight_files
    with torch.no_grad():
        same_input = (enc.forward_normalized(io["normalized"]) - io["expected"]).abs().max()
        pre = enc.preprocess(io["tiles"])
        std = torch.tensor(enc.spec.std).view(1, 3, 1, 1)
        levels = (pre - io["normalized"]).abs() * std * 255
        from_tiles = (enc(io["tiles"]) - io["expected"]).abs().max()
    with capsys.disabled():
        print(f"\n{name} (test size) vs {ZOO[name]['trident_class']}: max abs {same_input:.2e} "
              f"on the same input; preprocessing {enc.spec.resize_interpolation} within "
              f"{levels.max():.2f} gray levels (mean {levels.mean():.2f}); from uint8 tiles "
              f"{from_tiles:.2e} (outputs up to {io['expected'].abs().max():.2f})")
    assert tuple(io["expected"].shape) == (2, enc.spec.embed_dim)
    assert same_input <= 1e-5
    # PIL resizes uint8 in fixed point and rounds to uint8 (bicubic: also between its two
    # passes, and clips the overshoot); we resize floats. Same filter: half a level on average.
    assert levels.mean() <= 0.35
    assert levels.max() <= (1.0 + 1e-3 if enc.spec.resize_interpolation == "bilinear" else 5.0)
    assert from_tiles <= 0.05 * io["expected"].abs().max()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_published_encoder_refuses_a_renamed_key(name, hf_cache, tmp_path):
    state = load_file(str(REF / f"{name}_micro.safetensors"))
    (old,) = [k for k in state if k.endswith("0.mlp.fc1.weight")]
    state[old.replace("fc1", "w12")] = state.pop(old)
    with pytest.raises(CheckpointError) as err:
        create_patch_encoder(f"{name}_micro", zoo_snapshot(hf_cache, tmp_path, name, state))
    msg = str(err.value)
    assert "1 missing keys ['blocks.0.mlp.fc1.weight']" in msg  # in our names
    assert old.replace("fc1", "w12") in msg  # unexpected, as the file names it
    assert f"test-org/{name}-micro" in msg


@pytest.mark.parametrize(("name", "field"), [("phikon_v2", "num_attention_heads"),
                                           ("uni2_h", "num_heads"), ("virchow2", "reg_tokens")])
def test_a_config_that_contradicts_the_entry_is_refused(name, field, hf_cache, tmp_path):
    """Heads cannot be seen in a state dict's shapes: the snapshot's config.json is checked."""
    cfg = published_config(name)
    args = cfg.get("model_args", cfg)
    args[field] = args.get(field, 2) * 2
    uri = zoo_snapshot(hf_cache, tmp_path, name)
    snap = resolve_hf_snapshot(uri)
    (snap / "config.json").unlink()
    (snap / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"contradicts the registry entry: {field}="):
        create_patch_encoder(f"{name}_micro", uri)


def test_phikon_v2_with_an_attention_projection_missing_names_the_rest(hf_cache, tmp_path):
    """q/k/v are stacked only when all three are there; the others keep the file's names."""
    state = load_file(str(REF / "phikon_v2_micro.safetensors"))
    del state["encoder.layer.1.attention.attention.query.bias"]
    with pytest.raises(CheckpointError) as err:
        create_patch_encoder("phikon_v2_micro", zoo_snapshot(hf_cache, tmp_path, "phikon_v2",
                                                             state))
    assert "blocks.1.attn.qkv.bias" in str(err.value)
    assert "encoder.layer.1.attention.attention.key.bias" in str(err.value)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_published_size_keys_and_shapes_are_the_reference_ones(name):
    """The full-size entry, built on the meta device, against the key names and shapes timm /
    transformers give the same construction (recorded by make_patch_encoders.py)."""
    from care_scale.models.registry import patch_encoder_entry

    entry = patch_encoder_entry(name)
    with torch.device("meta"):
        model = entry.build(entry.spec)
    ref = ZOO[name]["published_shapes"]
    ref_state = {k: torch.empty(v, device="meta") for k, v in ref["keys"].items()}
    ours = {k: list(v.shape) for k, v in entry.convert(ref_state, model).items()}
    own = {k: list(v.shape) for k, v in model.state_dict().items()
           if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    assert ours == own
    assert entry.spec.depth == ref["depth"] == len(model.blocks)
    out = model.forward_normalized(torch.zeros(1, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (1, entry.spec.embed_dim)


def test_the_published_entries_carry_their_facts():
    facts = {  # name: (embed_dim, patch, tile px at 0.5 um/px, HF repo, weight file)
        "uni": (1024, 16, 256, "MahmoodLab/UNI", "pytorch_model.bin"),
        "uni2_h": (1536, 14, 256, "MahmoodLab/UNI2-h", "pytorch_model.bin"),
        "virchow2": (2560, 14, 224, "paige-ai/Virchow2", "pytorch_model.bin"),
        "h_optimus_0": (1536, 14, 224, "bioptimus/H-optimus-0", "pytorch_model.bin"),
        "gigapath": (1536, 16, 256, "prov-gigapath/prov-gigapath", "pytorch_model.bin"),
        "phikon_v2": (1024, 16, 224, "owkin/phikon-v2", "model.safetensors"),
    }
    assert set(facts) == set(ZOO)
    for name, (dim, patch, tile, repo, file) in facts.items():
        spec = get_patch_encoder_spec(name)
        assert (spec.embed_dim, spec.patch_size, spec.input_size) == (dim, patch, 224), name
        assert (spec.tile_size, spec.mpp, spec.hf_repo, spec.weight_files) == (
            tile, 0.5, repo, (file,)), name
    assert get_patch_encoder_spec("h_optimus_0").mean == (0.707223, 0.578729, 0.703617)
    assert get_patch_encoder_spec("virchow2").pool == "token+mean_patch"
    assert get_patch_encoder_spec("gigapath").resize_size == 256


@pytest.mark.parametrize("name", ["virchow2", "gigapath", "uni2_h"])
def test_published_encoder_exports_to_onnx_with_parity(name, tmp_path):
    """Registers + class/mean pooling, bicubic resize + centre crop, no_embed_class: the ONNX
    graph (its resize built from the entry's transform) matches the torch encoder."""
    got, ours, expected = export_and_run(f"{name}_micro", "pytorch_model.bin", tmp_path)
    assert abs(got - ours).max() <= 1e-4 * abs(ours).max()
    assert abs(got - expected).max() <= 0.05 * abs(expected).max()
