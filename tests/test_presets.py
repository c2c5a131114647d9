"""Tiling presets and model pairing, decided from the registry before any slide is read."""

from __future__ import annotations

import warnings

import pytest

from care_scale.cli import main
from care_scale.config import load_config
from care_scale.embed import EmbedConfig
from care_scale.embed.job_models import TilingPresetWarning, resolve_models
from care_scale.exceptions import ConfigError


def _cfg(*sets: str) -> EmbedConfig:
    return load_config(EmbedConfig, None, list(sets))


def test_care_tiles_as_its_authors_do_unless_told_otherwise():
    cfg = resolve_models(_cfg("slide_encoder.name=care"))
    assert (cfg.patch_encoder.name, cfg.patch_size, cfg.target_mpp, cfg.tiling) == (
        "conch_v1_5", 512, 0.5, "trident")
    tiny = resolve_models(_cfg("slide_encoder.name=care_tiny"))
    assert (tiny.patch_encoder.name, tiny.patch_size) == ("vit_demo_patch16_112", 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_models(_cfg("slide_encoder.name=care", "patch_size=512"))  # same: silent


def test_care_tiles_as_trident_does_and_the_mode_is_part_of_the_version():
    from care_scale.embed.pipeline import job_model_version

    care = resolve_models(_cfg("slide_encoder.name=care"))
    assert (care.tiling, care.min_tissue_fraction) == ("trident", 0.0)  # TRIDENT's defaults
    tiny = resolve_models(_cfg("slide_encoder.name=care_tiny"))
    assert (tiny.tiling, tiny.min_tissue_fraction) == ("native", 0.5)
    with pytest.warns(TilingPresetWarning, match=r"tiling=native .* preset tiling=trident"):
        native = resolve_models(_cfg("slide_encoder.name=care", "tiling=native"))
    assert (native.tiling, native.min_tissue_fraction) == ("native", 0.5)
    # Another tiling mode, other embeddings: another model version.
    assert job_model_version(care, "c", "p") != job_model_version(native, "c", "p")
    # The native mode keeps the versions it had before modes existed (no re-embedding).
    explicit = resolve_models(_cfg("slide_encoder.name=care_tiny", "tiling=native"))
    assert job_model_version(explicit, "c", "p") == job_model_version(tiny, "c", "p")
    kept = resolve_models(_cfg("slide_encoder.name=care", "min_tissue_fraction=0.25"))
    assert (kept.tiling, kept.min_tissue_fraction) == ("trident", 0.25)
    assert job_model_version(kept, "c", "p") != job_model_version(care, "c", "p")
    with pytest.raises(ConfigError, match=r"tiling: 'clam' fits none of .*'native', 'trident'"):
        _cfg("tiling=clam")


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


def test_a_missing_or_foreign_artifacts_folder_is_one_line_before_any_slide(tmp_path, capsys):
    from care_scale.export import export_patch_encoder

    src = tmp_path / "slides"
    src.mkdir()
    (src / "a.svs").write_bytes(b"not read: the artifacts check comes first")
    rc = main(["embed", str(src), "--warehouse", str(tmp_path / "wh"),
               "--set", f"artifacts={tmp_path / 'missing'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if not ln.startswith("UntrainedWeightsWarning: ")]
    assert rc == 2 and len(err) == 1 and "no manifest.json" in err[0], err
    other = tmp_path / "other"
    export_patch_encoder("vit_micro_patch16_64", out=str(other), parity_tiles=2)
    rc = main(["embed", str(src), "--warehouse", str(tmp_path / "wh"),
               "--set", f"artifacts={other}"])
    err = [ln for ln in capsys.readouterr().err.splitlines()
           if not ln.startswith("UntrainedWeightsWarning: ")]
    assert rc == 2 and "'vit_micro_patch16_64'" in err[0] and "vit_demo_patch16_112" in err[0]
    assert not (tmp_path / "wh").exists()
