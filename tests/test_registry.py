"""The model registries' contract, looped over every entry (timm's way): specs consistent
with the modules they build (meta device for the full-size ones), and for every small entry a
real build: uint8 tiles in, finite float32 features of the stated size out, seeded builds
identical, and ONNX export within parity. The slide encoders likewise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from care_scale.exceptions import ConfigError
from care_scale.models import (
    create_patch_encoder,
    create_slide_encoder,
    get_patch_encoder_spec,
    get_slide_encoder_spec,
    list_patch_encoders,
    list_slide_encoders,
    model_version,
)
from care_scale.models.registry import patch_encoder_entry, slide_encoder_entry

pytestmark = pytest.mark.filterwarnings("ignore::care_scale.models.UntrainedWeightsWarning")


def _small(name: str) -> bool:
    """Entries cheap enough to build for real in a test (the micro twins and demo ViTs)."""
    spec = get_patch_encoder_spec(name)
    return spec.width <= 192 and spec.depth <= 4


SMALL = [n for n in list_patch_encoders() if _small(n)]

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


def test_the_small_entries_cover_every_architecture_option():
    """Each option a full-size entry uses is exercised by some small entry built for real."""
    fields = ("pool", "mlp", "no_embed_class", "resize_interpolation")
    big = {tuple(getattr(get_patch_encoder_spec(n), f) for f in fields)
           for n in list_patch_encoders() if not _small(n)}
    small = {tuple(getattr(get_patch_encoder_spec(n), f) for f in fields) for n in SMALL}
    assert big <= small, big - small
    assert any(get_patch_encoder_spec(n).reg_tokens for n in SMALL)


@pytest.mark.parametrize("name", SMALL)
def test_small_patch_encoder_contract(name, tmp_path):
    from care_scale.export import export_patch_encoder

    spec = get_patch_encoder_spec(name)
    a, b = create_patch_encoder(name), create_patch_encoder(name)
    assert model_version(a) == model_version(b)  # seeded: the same untrained weights
    side = spec.tile_size or spec.input_size
    tiles = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    with torch.inference_mode():
        out, again = a(tiles), b(tiles)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, spec.embed_dim)
    assert torch.isfinite(out).all() and torch.equal(out, again)
    result = export_patch_encoder(a, out=str(tmp_path / "onnx"), parity_tiles=4)
    assert result.parity and all(r.passed for r in result.parity), result.summary()


@pytest.mark.parametrize("name", list_slide_encoders())
def test_slide_encoder_contract(name):
    spec = get_slide_encoder_spec(name)
    a, b = create_slide_encoder(name), create_slide_encoder(name)
    assert model_version(a) == model_version(b)
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(12), np.arange(9))
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 512
    feats = rng.normal(size=(len(coords), spec.in_dim)).astype(np.float32)
    enc, again = a.encode(feats, coords), b.encode(feats, coords)
    assert enc.slide_embedding.shape == (spec.embed_dim,)
    assert enc.region_embeddings.shape == (enc.num_regions, spec.embed_dim)
    assert enc.region_of_patch.shape == (len(coords),)
    assert set(np.unique(enc.region_of_patch)) == set(range(enc.num_regions))
    assert np.isfinite(enc.slide_embedding).all()
    np.testing.assert_array_equal(enc.slide_embedding, again.slide_embedding)
