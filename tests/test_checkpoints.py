"""Checkpoints: safetensors directories local and on S3 (moto server), torch files through
weights_only, refusals with named keys, and model versions."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from care_scale.exceptions import CheckpointError, UnsafeCheckpointError
from care_scale.models import (
    UntrainedWeightsWarning,
    create_patch_encoder,
    create_slide_encoder,
    model_version,
    resolve_weights,
    save_checkpoint,
)

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::care_scale.models.UntrainedWeightsWarning")


def trained_like(name: str = "care_tiny", **overrides):
    model = create_slide_encoder(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def load_quietly(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWeightsWarning)  # a loaded model must not warn
        return create_slide_encoder("care_tiny", **kwargs)


class Evil:
    """Runs a shell command when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_local_round_trip(tmp_path):
    model = trained_like()
    uri = str(tmp_path / "ckpt")
    save_checkpoint(model, uri)
    doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert doc["name"] == "care_tiny" and doc["config"]["hidden_dim"] == 64
    assert doc["model_version"] == model_version(model)
    loaded = load_quietly(checkpoint=uri)
    assert loaded.trained and same_weights(model, loaded)
    assert model_version(loaded) == model_version(model)


def test_checkpoint_config_defines_the_architecture(tmp_path):
    model = trained_like(hidden_dim=32, num_heads=4, region_depth=2)
    save_checkpoint(model, str(tmp_path / "c"))
    loaded = load_quietly(checkpoint=str(tmp_path / "c"))
    assert loaded.config.hidden_dim == 32 and loaded.config.region_depth == 2
    assert same_weights(model, loaded)


def test_bare_safetensors_file_carries_its_config(tmp_path):
    model = trained_like(hidden_dim=32, num_heads=4)
    save_checkpoint(model, str(tmp_path / "c"))
    shutil.copy(tmp_path / "c" / "model.safetensors", tmp_path / "weights.safetensors")
    loaded = load_quietly(checkpoint=str(tmp_path / "weights.safetensors"))
    assert loaded.config.hidden_dim == 32 and same_weights(model, loaded)


def test_s3_round_trip(s3_options, s3_bucket):
    model = trained_like()
    uri = f"s3://{s3_bucket}/models/care_tiny/v1"
    save_checkpoint(model, uri, storage_options=s3_options)
    loaded = load_quietly(checkpoint=uri, storage_options=s3_options)
    assert same_weights(model, loaded) and model_version(loaded) == model_version(model)
    enc = create_patch_encoder("vit_micro_patch16_64")
    save_checkpoint(enc, f"s3://{s3_bucket}/models/vit", storage_options=s3_options)
    enc2 = create_patch_encoder("vit_micro_patch16_64", f"s3://{s3_bucket}/models/vit",
                                storage_options=s3_options)
    assert same_weights(enc, enc2)
    with pytest.raises(CheckpointError, match="not found"):
        create_slide_encoder("care_tiny", checkpoint=f"s3://{s3_bucket}/nothing/here",
                             storage_options=s3_options)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = trained_like()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dropped = state.pop("log_tau")
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_quietly(checkpoint=str(tmp_path / "w.safetensors"))
    assert "log_tau" in str(err.value) and "extra.weight" in str(err.value)
    assert "1 missing" in str(err.value) and "1 unexpected" in str(err.value)
    # Non-strict loading goes through, keeping the seeded value for the missing key.
    loose = create_slide_encoder("care_tiny", checkpoint=str(tmp_path / "w.safetensors"),
                                 strict=False)
    assert not torch.equal(loose.log_tau, dropped)
    torch.testing.assert_close(loose.log_sigma, model.log_sigma)


def test_shape_mismatch_is_refused_with_the_key(tmp_path):
    model = trained_like()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["input_proj.weight"] = torch.zeros(64, 100)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'input_proj.weight'.*"
                                              r"\(64, 100\).*\(64, 192\)"):
        load_quietly(checkpoint=str(tmp_path / "w.safetensors"))


def test_torch_files_load_through_weights_only(tmp_path):
    model = trained_like()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 7, "lr": 1e-4}, tmp_path / "trainer.ckpt")
    for path in ("plain.pt", "trainer.ckpt"):
        loaded = load_quietly(checkpoint=str(tmp_path / path))
        assert same_weights(model, loaded)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "payload": Evil(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="evil.pth") as err:
        resolve_weights(str(tmp_path / "evil.pth"))
    assert "weights_only" not in str(err.value) and "safetensors" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        create_slide_encoder("care_tiny", checkpoint=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_unreadable_files_give_checkpoint_errors(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        resolve_weights(str(tmp_path / "broken.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights file in it.*model.safetensors"):
        resolve_weights(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="not found"):
        resolve_weights(str(tmp_path / "absent"))
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="trunc.pt"):
        resolve_weights(str(tmp_path / "trunc.pt"))


def test_model_version_tracks_weights_and_config():
    a = create_slide_encoder("care_tiny")
    b = create_slide_encoder("care_tiny")
    v = model_version(a)
    assert v == model_version(b) and v.startswith("care_tiny-") and len(v) == len("care_tiny-") + 12
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a.log_tau.grad = torch.ones_like(a.log_tau)
    opt.step()  # in-place update must invalidate the cached version
    assert model_version(a) != v
    assert model_version(create_slide_encoder("care_tiny", region_depth=2)) != v
    assert model_version(create_slide_encoder("care_tiny", lambda_spf=0.3)) != v


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    save_checkpoint(create_patch_encoder("vit_micro_patch16_64"), str(tmp_path / "vit"))
    with pytest.raises(CheckpointError, match="not a slide encoder"):
        create_slide_encoder("care_tiny", checkpoint=str(tmp_path / "vit"))
    save_checkpoint(create_slide_encoder("care_tiny"), str(tmp_path / "care"))
    with pytest.raises(CheckpointError, match="not a patch encoder"):
        create_patch_encoder("vit_micro_patch16_64", str(tmp_path / "care"))
