"""Tiling presets and model pairing, decided from the registry before any slide is read."""

from __future__ import annotations

import warnings

import pytest

from care_scale.cli import main
from care_scale.config import load_config
from care_scale.embed import EmbedConfig
from care_scale.embed.pipeline import TilingPresetWarning, resolve_models


def _cfg(*sets: str) -> EmbedConfig:
    return load_config(EmbedConfig, None, list(sets))


def test_care_tiles_as_its_authors_do_unless_told_otherwise():
    cfg = resolve_models(_cfg("slide_encoder.name=care"))
    assert (cfg.patch_encoder.name, cfg.patch_size, cfg.target_mpp) == ("conch_v1_5", 512, 0.5)
    tiny = resolve_models(_cfg("slide_encoder.name=care_tiny"))
    assert (tiny.patch_encoder.name, tiny.patch_size) == ("vit_demo_patch16_112", 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_models(_cfg("slide_encoder.name=care", "patch_size=512"))  # same: silent


def test_a_tiling_against_the_preset_is_kept_with_a_warning_naming_both():
    with pytest.warns(TilingPresetWarning, match=r"patch_size=224 .* preset patch_size=512"):
        cfg = resolve_models(_cfg("slide_encoder.name=care", "patch_size=224"))
    assert cfg.patch_size == 224 and cfg.target_mpp == 0.5


def test_unpaired_feature_sizes_fail_before_any_slide_is_read(tmp_path, capsys):
    src = tmp_path / "slides"
    src.mkdir()
    (src / "a.svs").write_bytes(b"not read: the pairing check comes first")
    rc = main(["embed", str(src), "--warehouse", str(tmp_path / "wh"),
               "--set", "patch_encoder.name=vit_micro_patch16_64"])
    lines = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in lines if not ln.startswith("UntrainedWeightsWarning: ")]
    assert rc != 0 and len(err) == 1, lines
    assert "vit_micro_patch16_64 gives 64-d features" in err[0]
    assert "care_tiny takes 192-d input" in err[0]
    assert "--set patch_encoder.name=" in err[0] and "--set slide_encoder.name=" in err[0]
    assert not (tmp_path / "wh").exists()


def test_conch_sized_feature_files_into_the_default_say_which_encoder_fits(tmp_path, capsys):
    import h5py
    import numpy as np

    src = tmp_path / "feats"
    src.mkdir()
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 512
    with h5py.File(src / "s1.h5", "w") as f:  # a CLAM/TRIDENT file of CONCH-sized features
        f.create_dataset("features", data=rng.normal(size=(30, 768)).astype(np.float32))
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 512
    rc = main(["embed", str(src), "--features", "--warehouse", str(tmp_path / "wh")])
    lines = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in lines if not ln.startswith("UntrainedWeightsWarning: ")]
    assert rc == 2 and len(err) == 1, lines
    assert "768-d features" in err[0] and "care_tiny takes 192-d input" in err[0]
    assert "--set slide_encoder.name=care (takes 768-d)" in err[0]
    assert not (tmp_path / "wh").exists()
