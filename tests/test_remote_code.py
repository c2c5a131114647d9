"""Remote-code slide encoders (the official CARE release's shape): a transformers snapshot
whose config.json ``auto_map`` points at Python files inside it.

The real ``Zipper-1/CARE`` snapshot is not available here (no hub access). These tests build
a snapshot of the same shape with a small modeling file of their own, in a fake Hugging Face
cache, and check the loading path, the trust flag, the output mapping and the tables."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save
from test_published_weights import fake_snapshot

from care_scale.exceptions import CheckpointError, ConfigError
from care_scale.models import create_slide_encoder
from care_scale.models.remote import OUTPUT_NAMES, map_outputs

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is "
                                   "not installed: pip install 'care-scale[hf]'")

IN_DIM, HID = 768, 32

# The snapshot's own code, as the official release ships it (configuration + modeling files
# named by auto_map). Importing it leaves a mark, so a test can tell whether it ever ran.
CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyCareConfig(PretrainedConfig):
    model_type = "tiny_care"

    def __init__(self, in_dim=768, hidden=32, window=2, **kwargs):
        self.in_dim, self.hidden, self.window = in_dim, hidden, window
        super().__init__(**kwargs)
'''
MODELING = '''
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_tiny_care import TinyCareConfig

if os.environ.get("TINY_CARE_MARK"):
    with open(os.environ["TINY_CARE_MARK"], "a") as fh:
        fh.write("imported\\n")


@dataclass
class TinyCareOutput(ModelOutput):
    wsi_embedding: torch.FloatTensor = None
    region_embedding: torch.FloatTensor = None
    num_region: torch.LongTensor = None
    aux_loss: torch.FloatTensor = None


class TinyCareModel(PreTrainedModel):
    config_class = TinyCareConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.in_dim, config.hidden)
        self.head = nn.Linear(config.hidden, config.hidden)

    def forward(self, features, N_values, coords):
        # Regions: windows of window x window grid cells (coords are floored grid positions).
        n = int(N_values[0])
        x, c = features[0, :n], coords[0, :n].long()
        cell = c // self.config.window
        keys, inv = torch.unique(cell[:, 0] * 100003 + cell[:, 1], return_inverse=True)
        h = torch.tanh(self.proj(x))
        regions = torch.zeros(len(keys), h.shape[1]).index_add_(0, inv, h)
        regions = regions / torch.bincount(inv, minlength=len(keys))[:, None]
        wsi = self.head(regions.mean(0))
        return TinyCareOutput(wsi_embedding=wsi[None], region_embedding=regions[None],
                              num_region=torch.tensor([len(keys)]),
                              aux_loss=torch.tensor(0.0))
'''


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(HID, IN_DIM, generator=g) * 0.05,
            "proj.bias": torch.randn(HID, generator=g) * 0.05,
            "head.weight": torch.randn(HID, HID, generator=g) * 0.2,
            "head.bias": torch.zeros(HID)}


def snapshot_files(state: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    config = {
        "architectures": ["TinyCareModel"], "model_type": "tiny_care",
        "auto_map": {"AutoConfig": "configuration_tiny_care.TinyCareConfig",
                     "AutoModel": "modeling_tiny_care.TinyCareModel"},
        "in_dim": IN_DIM, "hidden": HID, "window": 2, "torch_dtype": "float32",
        "transformers_version": "4.57.6",
    }
    return {"config.json": json.dumps(config).encode(),
            "configuration_tiny_care.py": CONFIGURATION.encode(),
            "modeling_tiny_care.py": MODELING.encode(),
            "model.safetensors": save(state or tiny_state(), metadata={"format": "pt"})}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setenv("TINY_CARE_MARK", str(tmp_path / "mark"))
    # A hub that cannot answer: any network call would fail (none is made).
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def grid_coords(nx: int, ny: int, step: int = 512, origin=(1024, 2048)) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(nx) * step + origin[0], np.arange(ny) * step + origin[1])
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def test_without_the_trust_flag_the_snapshot_code_never_runs(hf_cache, tmp_path):
    fake_snapshot(hf_cache, "Zipper-1/CARE", snapshot_files())
    with pytest.raises(CheckpointError) as err:
        create_slide_encoder("care", "hf:Zipper-1/CARE")
    msg = str(err.value)
    assert "modeling_tiny_care.py" in msg and "configuration_tiny_care.py" in msg
    assert "--set slide_encoder.trust_remote_code=true" in msg and "\n" not in msg
    assert not (tmp_path / "mark").exists()  # its module was never imported


def test_trusted_snapshot_loads_offline_and_matches_the_authors_call(hf_cache, tmp_path):
    from transformers import AutoModel

    snap = fake_snapshot(hf_cache, "Zipper-1/CARE", snapshot_files())
    model = create_slide_encoder("care", "hf:Zipper-1/CARE", trust_remote_code=True)
    assert (tmp_path / "mark").read_text().count("imported") >= 1
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert model.trained and model.config.in_dim == IN_DIM and model.config.hidden_dim == HID
    rng = np.random.default_rng(0)
    coords = grid_coords(5, 4)
    feats = rng.normal(size=(len(coords), IN_DIM)).astype(np.float32)
    enc = model.encode(feats, coords)
    # The reference: the authors' own call (care_wsi_encoder_api.py), coords floored by step.
    ref_model = AutoModel.from_pretrained(str(snap), trust_remote_code=True,
                                          local_files_only=True).eval()
    with torch.inference_mode():
        ref = ref_model(torch.from_numpy(feats)[None], torch.tensor([len(coords)]),
                        torch.from_numpy(coords // 512)[None])
    err = float(np.abs(enc.slide_embedding - ref.wsi_embedding[0].numpy()).max())
    print(f"remote CARE slide embedding max abs error {err:.2e}")
    assert err == 0.0
    assert enc.num_regions == int(ref.num_region[0]) == 6  # ceil(5/2) x ceil(4/2) windows
    np.testing.assert_array_equal(enc.region_embeddings, ref.region_embedding[0].numpy())
    # What it does not expose is None, never made up.
    assert enc.region_of_patch is None and enc.roi_index is None and enc.fused_weight is None
    assert enc.patch_step == 512 and enc.model_version.startswith("care-")


def test_the_model_version_follows_the_snapshot_weights(hf_cache, tmp_path):
    fake_snapshot(hf_cache, "org/a", snapshot_files(tiny_state(0)))
    fake_snapshot(hf_cache, "org/b", snapshot_files(tiny_state(1)))
    from care_scale.models import model_version

    va = model_version(create_slide_encoder("care", "hf:org/a", trust_remote_code=True))
    vb = model_version(create_slide_encoder("care", "hf:org/b", trust_remote_code=True))
    assert va != vb


def test_a_snapshot_that_cannot_run_on_the_entrys_features_fails_at_load(hf_cache):
    fake_snapshot(hf_cache, "Zipper-1/CARE", snapshot_files())
    with pytest.raises(CheckpointError, match="does not run on 192-d patch features"):
        create_slide_encoder("care", "hf:Zipper-1/CARE", trust_remote_code=True, in_dim=192)
    with pytest.raises(ConfigError, match="overrides .*hidden_dim"):
        create_slide_encoder("care", "hf:Zipper-1/CARE", trust_remote_code=True, hidden_dim=8)


def test_without_transformers_the_error_names_the_extra(hf_cache, monkeypatch):
    fake_snapshot(hf_cache, "Zipper-1/CARE", snapshot_files())
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"care-scale\[hf\]"):
        create_slide_encoder("care", "hf:Zipper-1/CARE", trust_remote_code=True)


def test_outputs_map_by_name_or_position():
    t = torch.ones(1, 4)
    got = map_outputs({"wsi_embedding": t, "num_adapt_region": torch.tensor([3])})
    assert got["slide_embedding"] is t and int(got["num_regions"][0]) == 3
    assert got["region_of_patch"] is None
    pos = map_outputs((t, torch.zeros(1, 3, 4), torch.tensor([3]), torch.tensor(0.5)))
    assert pos["region_embeddings"].shape == (1, 3, 4) and float(pos["aux_loss"]) == 0.5
    assert set(OUTPUT_NAMES) >= {"slide_embedding", "region_embeddings", "num_regions"}


def test_patch_encoders_never_take_the_trust_flag():
    from care_scale.config import load_config
    from care_scale.embed import EmbedConfig

    with pytest.raises(ConfigError, match="patch encoders never run"):
        load_config(EmbedConfig, None, {"patch_encoder": {"trust_remote_code": True}})


def test_embed_job_with_the_remote_code_snapshot_writes_nulls_it_cannot_know(
        ray_local, hf_cache, tmp_path, capsys):
    """The user's command of issue 12, on feature files (as the authors' pipeline makes them)."""
    import h5py

    from care_scale.cli import main
    from care_scale.query import connect_duckdb

    fake_snapshot(hf_cache, "Zipper-1/CARE", snapshot_files())
    src = tmp_path / "feats"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i, (nx, ny) in enumerate([(4, 4), (6, 3)]):
        coords = grid_coords(nx, ny)
        with h5py.File(src / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(len(coords), IN_DIM)).astype(np.float32)
            f["coords"] = coords
            f["coords"].attrs["patch_size_level0"] = 512
    wh = tmp_path / "wh"
    # As the issue writes it: no slide_encoder.name; hf:Zipper-1/CARE is `care`'s repository.
    rc = main(["embed", str(src), "--warehouse", str(wh), "--features", "--set", "progress=none",
               "--set", "slide_encoder.checkpoint=hf:Zipper-1/CARE",
               "--set", "slide_encoder.trust_remote_code=true", "--set", "keep_patches=true"])
    assert rc == 0, capsys.readouterr()
    con = connect_duckdb(str(wh))
    slides = con.sql("SELECT slide_id, num_regions, len(slide_embedding), roi_region_id, "
                     "roi_embedding IS NULL FROM slides ORDER BY 1").fetchall()
    assert slides == [("s0", 4, HID, None, True), ("s1", 6, HID, None, True)]
    regions = con.sql("SELECT count(*), count(geometry), count(fused_weight), "
                      "count(embedding) FROM regions").fetchone()
    assert regions == (10, 0, 0, 10)
    assert con.sql("SELECT count(*), count(region_id) FROM patches").fetchone() == (34, 0)
    cfg = json.loads(con.sql("SELECT config_json FROM runs").fetchone()[0])
    assert cfg["slide_encoder"]["trust_remote_code"] is True
    assert cfg["slide_encoder"]["name"] == "care"


def test_remote_code_models_are_not_exported(hf_cache):
    from care_scale.exceptions import ExportError
    from care_scale.export import create_slide_backend

    fake_snapshot(hf_cache, "Zipper-1/CARE", snapshot_files())
    model = create_slide_encoder("care", "hf:Zipper-1/CARE", trust_remote_code=True)
    backend = create_slide_backend("auto", model)
    assert backend.kind == "torch"
    coords = grid_coords(3, 3)
    enc = backend.encode(np.zeros((9, IN_DIM), np.float32), coords)
    assert enc.num_regions == 4
    with pytest.raises(ExportError, match="not traced or exported"):
        create_slide_backend("onnxruntime", model)



def test_a_snapshot_folder_in_object_storage_is_copied_then_loaded(s3_options, s3_bucket,
                                                                    tmp_path, monkeypatch):
    import fsspec

    from care_scale.storage import to_fsspec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    fs = fsspec.filesystem("s3", **to_fsspec(s3_options))
    for name, data in snapshot_files().items():
        fs.pipe(f"{s3_bucket}/models/care/{name}", data)
    uri = f"s3://{s3_bucket}/models/care"
    with pytest.raises(CheckpointError, match="trust_remote_code=true"):
        create_slide_encoder("care", uri, storage_options=s3_options)
    model = create_slide_encoder("care", uri, storage_options=s3_options,
                                 trust_remote_code=True)
    enc = model.encode(np.ones((4, IN_DIM), np.float32), grid_coords(2, 2))
    assert enc.num_regions == 1 and enc.slide_embedding.shape == (HID,)
    copies = list((tmp_path / "cache" / "care-scale" / "remote-code").iterdir())
    assert len(copies) == 1 and (copies[0] / "modeling_tiny_care.py").is_file()
