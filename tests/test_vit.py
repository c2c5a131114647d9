"""ViT patch encoders and the model registries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from care_scale.exceptions import ConfigError, ModelInputError
from care_scale.models import (
    create_patch_encoder,
    create_slide_encoder,
    get_patch_encoder_spec,
    get_slide_encoder_spec,
    list_patch_encoders,
    list_slide_encoders,
)
from care_scale.models.checkpoints import convert_timm_vit, load_into
from care_scale.models.registry import patch_encoder_entry, slide_encoder_entry

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::care_scale.models.UntrainedWeightsWarning")


def timm_vit_keys(depth: int, layer_scale: bool = False) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                 "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    if layer_scale:
        per_block += ["ls1.gamma", "ls2.gamma"]
    for i in range(depth):
        keys |= {f"blocks.{i}.{k}" for k in per_block}
    return keys


def test_registry_lists_the_expected_shapes():
    names = list_patch_encoders()
    for name in ("vit_micro_patch16_64", "vit_demo_patch16_112", "vit_tiny_patch16_224",
                 "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
                 "vit_large_patch16_448", "uni", "conch_v1_5"):
        assert name in names
    assert {"care", "care_tiny"} <= set(list_slide_encoders())
    with pytest.raises(ConfigError, match="unknown patch encoder"):
        create_patch_encoder("vit_gigantic")
    with pytest.raises(ConfigError, match="unknown slide encoder"):
        create_slide_encoder("care_xxl")


@pytest.mark.parametrize("name", list_patch_encoders())
def test_every_patch_encoder_builds_with_a_consistent_spec(name):
    entry = patch_encoder_entry(name)
    spec = entry.spec
    assert spec.name == name
    assert spec.input_size % spec.patch_size == 0 and spec.width % spec.num_heads == 0
    assert len(spec.mean) == 3 and len(spec.std) == 3 and spec.mpp > 0
    with torch.device("meta"):  # big trunks: shapes only, no 300M-parameter init
        model = entry.build(spec)
    state = model.state_dict()
    expected = timm_vit_keys(spec.depth, spec.layer_scale_init is not None)
    if spec.pool == "attn_pool":  # CONCH v1.5: pooler + LayerNorm instead of a head
        expected |= {f"attn_pool.{k}" for k in (
            "query", "ln_k.weight", "ln_k.bias", "ln_q.weight", "ln_q.bias", "to_q.weight",
            "to_kv.weight", "to_out.weight")} | {"pool_norm.weight", "pool_norm.bias"}
    elif spec.pool == "token" and spec.embed_dim != spec.width:
        expected |= {"head.weight", "head.bias"}
    if spec.reg_tokens:
        expected.add("reg_token")
        assert tuple(state["reg_token"].shape) == (1, spec.reg_tokens, spec.width)
    assert set(state) == expected
    prefix = 0 if spec.no_embed_class else 1 + spec.reg_tokens  # timm's embed_len
    assert tuple(state["pos_embed"].shape) == (1, spec.grid ** 2 + prefix, spec.width)
    assert tuple(state["patch_embed.proj.weight"].shape) == (spec.width, 3, spec.patch_size,
                                                             spec.patch_size)
    out = model.forward_normalized(torch.zeros(2, 3, spec.input_size, spec.input_size,
                                               device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)


@pytest.mark.parametrize("name", list_slide_encoders())
def test_every_slide_encoder_builds_and_pairs(name):
    entry = slide_encoder_entry(name)
    patch = get_patch_encoder_spec(entry.spec.patch_encoder)
    assert entry.spec.in_dim == patch.embed_dim
    with torch.device("meta"):
        model = entry.build(dict(entry.spec.config))
    assert model.input_proj.in_features == patch.embed_dim


def test_uint8_tiles_in_float_embeddings_out():
    enc = create_patch_encoder("vit_micro_patch16_64")
    assert enc.spec.embed_dim == 64 and enc.name == "vit_micro_patch16_64"
    tiles = np.random.default_rng(0).integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        a = enc(tiles)
        b = enc(torch.from_numpy(tiles))
    assert a.dtype == torch.float32 and tuple(a.shape) == (5, 64)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()
    # batched == one by one (no cross-talk between tiles in a batch)
    with torch.no_grad():
        c = torch.cat([enc(tiles[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_resize_and_normalisation_happen_inside():
    enc = create_patch_encoder("vit_demo_patch16_112")
    spec = enc.spec
    # A tile whose colour is the normalisation mean becomes an all-zero input.
    mean_rgb = np.rint(np.array(spec.mean) * 255).astype(np.uint8)
    tile = np.broadcast_to(mean_rgb, (1, 300, 300, 3)).copy()
    x = enc.preprocess(torch.from_numpy(tile))
    assert tuple(x.shape) == (1, 3, 112, 112)
    assert x.abs().max() < 0.01
    # Full-size tiles are resized on the device (224 -> 112), not required to match.
    tiles = np.random.default_rng(1).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        assert tuple(enc(tiles).shape) == (2, 192)


@pytest.mark.parametrize("bad", [
    np.zeros((2, 64, 64, 3), np.float32),
    np.zeros((2, 64, 64), np.uint8),
    np.zeros((2, 3, 64, 64), np.uint8),
    np.zeros((0, 64, 64, 3), np.uint8),
])
def test_bad_tiles_are_refused(bad):
    enc = create_patch_encoder("vit_micro_patch16_64")
    with pytest.raises(ModelInputError):
        enc(bad)


def test_seeded_untrained_encoders_are_reproducible():
    a = create_patch_encoder("vit_micro_patch16_64")
    torch.manual_seed(123)  # the caller's RNG state must not matter (and is not consumed)
    b = create_patch_encoder("vit_micro_patch16_64")
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_timm_style_state_dict_loads():
    src = create_patch_encoder("vit_micro_patch16_64")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    # What a timm checkpoint with a classifier, saved from a DDP wrapper, looks like.
    state = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    state["module.head.weight"] = torch.randn(1000, 64)
    state["module.head.bias"] = torch.randn(1000)
    dst = create_patch_encoder("vit_micro_patch16_64")
    report = load_into(dst, convert_timm_vit(state, dst), source="timm.pth")
    assert report.missing == [] and report.unexpected == []
    tiles = np.random.default_rng(2).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        torch.testing.assert_close(dst(tiles), src(tiles))


def test_matches_timm_when_installed():
    timm = pytest.importorskip("timm")
    ours = create_patch_encoder("vit_tiny_patch16_224")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    ref.load_state_dict(ours.state_dict())
    tiles = np.random.default_rng(3).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        torch.testing.assert_close(ours(tiles), ref(ours.preprocess(tiles)), atol=1e-4,
                                   rtol=1e-4)


def test_slide_spec_names_its_patch_encoder_facts():
    spec = get_slide_encoder_spec("care_tiny")
    patch = get_patch_encoder_spec(spec.patch_encoder)
    assert patch.name == "vit_demo_patch16_112" and spec.in_dim == 192 and patch.mpp == 0.5


def test_registry_imports_no_family_the_package_imports_them():
    """timm's layout: the families register themselves when ``care_scale.models`` imports
    them; the registry module names none of them (not even inside a function)."""
    import ast
    import inspect

    import care_scale.models
    from care_scale.models import registry

    families = {"care_scale.models.care", "care_scale.models.vit"}
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(registry))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    assert not names & families
    package = ast.parse(inspect.getsource(care_scale.models))
    imported = {f"{n.module}.{a.name}" if n.module == "care_scale.models" else n.module
                for n in ast.walk(package) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert families <= imported
    assert {"vit_micro_patch16_64", "conch_v1_5"} <= set(list_patch_encoders())
    assert "care_tiny" in list_slide_encoders()
