"""ViT patch encoders and the model registries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from care_scale.exceptions import ModelInputError
from care_scale.models import (
    create_patch_encoder,
)
from care_scale.models.checkpoints import convert_timm_vit, load_into

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::care_scale.models.UntrainedWeightsWarning")


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
