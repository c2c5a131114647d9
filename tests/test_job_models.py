"""The driver's model facts (care_scale.embed.job_models): built once, then read from the
cache without importing torch, under a key that changes with whatever changes the models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from care_scale.embed import EmbedConfig
from care_scale.embed.config import ModelRef
from care_scale.embed.job_models import facts_key, job_models

ROOT = Path(__file__).resolve().parents[1]

# What a driver does with the facts, in a fresh interpreter: the facts, whether they came
# from the cache, CARE's and the patch encoder's exports, and whether torch got imported.
_DRIVER = r"""
import json, sys, warnings
from care_scale.embed import EmbedConfig
from care_scale.embed.job_models import job_models
from care_scale.embed.pipeline import resolve_models
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cfg = EmbedConfig()
    m = job_models(cfg)
    cfg = resolve_models(cfg, preset=m.preset)
    exports = [str(m.care_export()), str(m.patch_export(tile_size=cfg.patch_size))]
import weakref
built = [weakref.ref(x) for x in m._built.values()]
m.release()  # what the job does once its exports are made
print(json.dumps({"built": len(built), "freed": all(r() is None for r in built),
                  "cached": m.cached, "torch": "torch" in sys.modules, "care": m.care.__dict__,
                  "patch": m.patch.__dict__, "preset": m.preset, "exports": exports,
                  "warned": sorted(str(w.message) for w in caught
                                   if type(w.message).__name__ == "UntrainedWeightsWarning")}))
"""


def _driver(cache: Path) -> dict:
    env = {**os.environ, "CARE_SCALE_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_second_driver_reads_the_facts_and_exports_without_torch(tmp_path):
    first = _driver(tmp_path / "cache")
    assert first["cached"] is False and first["torch"] is True
    second = _driver(tmp_path / "cache")
    assert second["cached"] is True and second["torch"] is False
    # The first driver built both models and let them go once exported; the second none.
    assert (first["built"], first["freed"], second["built"]) == (2, True, 0)
    for key in ("care", "patch", "preset", "exports", "warned"):
        assert second[key] == first[key], key
    # Untrained weights are said either way, once per model.
    assert [w.split(":")[0] for w in second["warned"]] == sorted(
        [first["care"]["name"], first["patch"]["name"]])
    assert first["care"]["trained"] is False and first["care"]["name"] == "care_tiny"
    assert all(Path(e, "manifest.json").exists() for e in second["exports"])
    # The facts equal what building the models gives in this process.
    from care_scale.models import create_patch_encoder, create_slide_encoder, model_version

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        care = create_slide_encoder("care_tiny")
        patch = create_patch_encoder(first["patch"]["name"])
    assert first["care"]["version"] == model_version(care)
    assert first["patch"]["version"] == model_version(patch)
    assert first["care"]["dim"] == care.config.in_dim == first["patch"]["dim"]


@pytest.mark.filterwarnings("ignore::care_scale.exceptions.UntrainedWeightsWarning")
def test_the_key_follows_checkpoints_overrides_and_refuses_what_it_cannot_identify(tmp_path):
    from care_scale.models import create_slide_encoder, save_checkpoint

    ckpt = tmp_path / "care"
    save_checkpoint(create_slide_encoder("care_tiny"), str(ckpt))

    def cfg(**slide) -> EmbedConfig:
        return EmbedConfig(slide_encoder=ModelRef(**{"name": "care_tiny", **slide}))

    seeded, local = facts_key(cfg()), facts_key(cfg(checkpoint=str(ckpt)))
    assert seeded and local and seeded != local
    assert facts_key(cfg(checkpoint=str(ckpt))) == local  # stable
    assert facts_key(cfg(overrides={"in_dim": 64})) not in (seeded, None)
    weights = next(f for f in ckpt.iterdir() if f.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert facts_key(cfg(checkpoint=str(ckpt))) != local  # rewritten: built again
    for uncached in (cfg(checkpoint="s3://bucket/care"), cfg(checkpoint="hf:Zipper-1/CARE"),
                     cfg(trust_remote_code=True), cfg(checkpoint=str(tmp_path / "missing"))):
        assert facts_key(uncached) is None
    # A feature-file run has no patch encoder in its key.
    feats = EmbedConfig(features=True)
    assert facts_key(feats) != seeded and job_models(feats, cache_dir=tmp_path).patch is None


@pytest.mark.filterwarnings("ignore::care_scale.exceptions.UntrainedWeightsWarning")
def test_a_torn_cache_entry_is_rebuilt(tmp_path):
    cfg = EmbedConfig()
    first = job_models(cfg, cache_dir=tmp_path)
    (entry,) = (tmp_path / "models").iterdir()
    assert job_models(cfg, cache_dir=tmp_path).cached
    entry.write_text(json.dumps({"preset": {}})[:7])
    again = job_models(cfg, cache_dir=tmp_path)
    assert not again.cached and again.care == first.care and again.patch == first.patch
    assert job_models(cfg, cache_dir=tmp_path).cached  # written whole again
