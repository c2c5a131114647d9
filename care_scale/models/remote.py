"""Slide encoders whose snapshot ships its own modeling code (transformers ``trust_remote_code``).

The official CARE release (Hugging Face ``Zipper-1/CARE``) is such a snapshot: a
``config.json`` with ``auto_map`` pointing at Python files in the snapshot, loaded by the
authors as ``AutoModel.from_pretrained("Zipper-1/CARE", trust_remote_code=True)`` and called
as ``model(features (B, N, D), N_values (B,), coords (B, N, 2))`` with the coordinates floored
by the patch step (their ``care_wsi_encoder_api.py``; TRIDENT's ``CARESlideEncoder`` does the
same with ``patch_size_level0``).

Running that code runs arbitrary Python from the snapshot, so it happens only when the user
says so (``slide_encoder.trust_remote_code: true``, off by default; the runs table keeps the
config that said it). ``transformers`` is imported only here, only then, and only from local
files (``local_files_only``, ``HF_HUB_OFFLINE=1``): no network call is made.

The model's outputs are mapped onto ours by :data:`OUTPUT_NAMES`; what a snapshot does not
expose (which patch is in which region, the weights, the ROI) stays ``None`` and the tables
store nulls there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from care_scale.exceptions import CheckpointError, ConfigError, ModelInputError
from care_scale.storage import is_remote, redact, url_to_fs

log = logging.getLogger(__name__)

#: Our output -> the attribute names a remote model's output may carry it under, in order.
#: Positional outputs (a tuple, as the authors' ``return_wsi=True`` call returns) are read
#: as (slide embedding, region embeddings, number of regions, aux loss).
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "slide_embedding": ("wsi_embedding", "slide_embedding", "pooler_output"),
    "region_embeddings": ("region_embeddings", "region_embedding", "adapt_region_embedding",
                          "adapt_region_data"),
    "num_regions": ("num_regions", "num_region", "num_adapt_region"),
    "region_of_patch": ("region_of_patch", "patch_region", "region_assignment"),
    "coverage": ("coverage",),
    "semantic_weight": ("semantic_weight",),
    "fused_weight": ("fused_weight", "region_weight"),
    "roi_index": ("roi_index",),
    "aux_loss": ("aux_loss",),
}
_POSITIONAL = ("slide_embedding", "region_embeddings", "num_regions", "aux_loss")


def is_remote_code_config(cfg: dict[str, Any] | None) -> bool:
    """A transformers ``config.json`` whose ``auto_map`` names modeling code in the snapshot."""
    return bool(cfg) and "format" not in cfg and bool(cfg.get("auto_map"))


def _code_files(cfg: dict[str, Any]) -> list[str]:
    """The snapshot's Python files ``auto_map`` names (``"modeling_care.CARE"`` ->
    ``modeling_care.py``; ``"repo--module.Class"`` references another repository)."""
    names = []
    for ref in (cfg.get("auto_map") or {}).values():
        for one in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(one, str) and "." in one:
                names.append(one.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(set(names))


def read_snapshot_config(uri: str, storage_options: dict[str, Any] | None = None
                         ) -> tuple[str | None, dict[str, Any] | None]:
    """(the folder's path or URI, its parsed ``config.json``) for a checkpoint that is a
    folder or ``hf:`` snapshot; (None, None) for a single weights file or no config."""
    from care_scale.models.hub import is_hf_uri, resolve_hf_snapshot

    if is_hf_uri(uri):
        folder = str(resolve_hf_snapshot(uri))
        fs, path = url_to_fs(folder, None)
    else:
        folder = uri
        fs, path = url_to_fs(uri, storage_options)
        if path.lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
            return None, None
    cfg_path = f"{path.rstrip('/')}/config.json"
    try:
        if not fs.exists(cfg_path):
            return None, None
        with fs.open(cfg_path, "rb") as fh:
            return folder, json.loads(fh.read())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{redact(uri)}: config.json is not JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"{redact(uri)}: cannot read config.json: {redact(exc)}") from exc


def refuse_untrusted(uri: str, cfg: dict[str, Any]) -> CheckpointError:
    """The error for a remote-code snapshot the user has not said to trust."""
    files = ", ".join(_code_files(cfg)) or "its own Python files"
    return CheckpointError(
        f"{redact(uri)}: a transformers snapshot ({cfg.get('model_type')}) whose model is "
        f"defined by code inside it ({files}); running it runs that Python code. Read it, "
        "then set --set slide_encoder.trust_remote_code=true (YAML: slide_encoder: "
        "{trust_remote_code: true}) to load it")


def _local_folder(folder: str, storage_options: dict[str, Any] | None) -> Path:
    """A local copy of an object-storage snapshot (transformers reads local files only)."""
    if not is_remote(folder):
        return Path(folder.removeprefix("file://"))
    fs, path = url_to_fs(folder, storage_options)
    from care_scale.artifacts import default_cache_dir

    key = hashlib.sha256(folder.encode()).hexdigest()[:16]
    dest = default_cache_dir() / "remote-code" / key
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{redact(folder)}: cannot copy the snapshot to {tmp}: "
                              f"{redact(exc)}") from exc
    if dest.exists():  # a previous copy: replaced whole, never merged with a newer one
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


@dataclass(frozen=True)
class RemoteCodeConfig:
    """What a remote-code slide encoder is, as far as care-scale needs to know (the model
    version hashes it with the weights)."""

    in_dim: int
    hidden_dim: int
    model_type: str
    architectures: tuple[str, ...]
    code_sha256: str  # of the snapshot's modeling files, in name order
    trust_remote_code: bool = True


class RemoteSlideEncoder(nn.Module):
    """A remote-code model behind our slide-encoder contract (``encode`` -> SlideEncoding)."""

    remote_code = True

    def __init__(self, model: nn.Module, config: RemoteCodeConfig):
        super().__init__()
        self.remote = model
        self.config = config

    def forward(self, x: torch.Tensor, num_valid: torch.Tensor, grid: torch.Tensor
                ) -> dict[str, torch.Tensor | None]:
        """The remote model on a batch -> our output names (None where it exposes nothing)."""
        return map_outputs(self.remote(x, num_valid, grid))

    @torch.no_grad()
    def encode(self, features: Any, coords: np.ndarray | None = None, *,
               patch_step: int | None = None) -> Any:
        """One slide, the call of :meth:`CARE.encode`; coordinates floored by the step, as
        the authors' code and TRIDENT pass them."""
        from care_scale.models.care import SlideEncoding
        from care_scale.models.checkpoints import model_version
        from care_scale.models.features import PatchFeatures, detect_step, file_step

        if isinstance(features, PatchFeatures):
            coords = features.coords if coords is None else coords
            patch_step = patch_step or file_step(features)
            features = features.features
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != self.config.in_dim:
            raise ModelInputError(f"{self.config.model_type}: expected features "
                                  f"(N>0, {self.config.in_dim}), got {feats.shape}")
        if coords is None:
            raise ModelInputError(f"{self.config.model_type}: coords are required")
        coords = np.asarray(coords, dtype=np.int64)
        step = int(patch_step or detect_step(coords))
        dev = next(self.parameters()).device
        out = self(torch.from_numpy(feats)[None].to(dev),
                   torch.tensor([feats.shape[0]], dtype=torch.long, device=dev),
                   torch.from_numpy(coords // step)[None].to(dev))
        return _encoding(out, feats.shape[0], model_version(self), step, SlideEncoding)


def _first(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t[0].detach().float().cpu().numpy()


def _encoding(out: dict[str, torch.Tensor | None], n: int, version: str, step: int,
              cls: type) -> Any:
    slide = _first(out["slide_embedding"])
    if slide is None:
        raise CheckpointError(f"{version}: the model's output has no slide embedding (looked "
                              f"for {', '.join(OUTPUT_NAMES['slide_embedding'])})")
    regions = _first(out["region_embeddings"])
    if out["num_regions"] is not None:
        r = int(out["num_regions"].reshape(-1)[0])
    else:
        r = 0 if regions is None else len(regions)
    regions = np.zeros((0, slide.shape[-1]), np.float32) if regions is None else regions[:r]
    rop = _first(out["region_of_patch"])
    roi = None if out["roi_index"] is None else int(out["roi_index"].reshape(-1)[0])

    def per_region(name: str) -> np.ndarray | None:
        v = _first(out[name])
        return None if v is None else v[:r].astype(np.float32)

    return cls(
        slide_embedding=slide.astype(np.float32), region_embeddings=regions.astype(np.float32),
        num_regions=r, region_of_patch=None if rop is None else rop[:n].astype(np.int64),
        coverage=per_region("coverage"), semantic_weight=per_region("semantic_weight"),
        fused_weight=per_region("fused_weight"), roi_index=roi,
        roi_embedding=None if roi is None or roi >= r else regions[roi].astype(np.float32),
        model_version=version, patch_step=step,
    )


def map_outputs(raw: Any) -> dict[str, torch.Tensor | None]:
    """A remote model's output (a ModelOutput / object, a mapping, or a tuple) -> ours."""
    if isinstance(raw, (tuple, list)) and not hasattr(raw, "keys"):
        got = dict(zip(_POSITIONAL, raw, strict=False))
        return {name: _tensor(got.get(name)) for name in OUTPUT_NAMES}
    out: dict[str, torch.Tensor | None] = {}
    for ours, theirs in OUTPUT_NAMES.items():
        value = None
        for attr in theirs:
            value = raw.get(attr) if isinstance(raw, dict) else getattr(raw, attr, None)
            if value is not None:
                break
        out[ours] = _tensor(value)
    return out


def _tensor(value: Any) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value)


def load_remote_slide_encoder(uri: str, folder: str, cfg: dict[str, Any], *, in_dim: int,
                              trust_remote_code: bool, name: str,
                              storage_options: dict[str, Any] | None = None
                              ) -> RemoteSlideEncoder:
    """Load a remote-code snapshot folder with transformers, offline, and check it runs.

    ``in_dim`` is the patch-feature size the registry entry says the model takes; one small
    forward at load time checks it and finds the output size (a snapshot that cannot run on
    it fails here, naming the snapshot, not on the first slide).
    """
    if not trust_remote_code:
        raise refuse_untrusted(uri, cfg)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise ConfigError(f"{redact(uri)}: running a remote-code snapshot needs transformers: "
                          "pip install 'care-scale[hf]'") from exc
    local = _local_folder(folder, storage_options)
    code = hashlib.sha256()
    for fname in _code_files(cfg):
        p = local / fname
        if not p.is_file():
            raise CheckpointError(f"{redact(uri)}: config.json's auto_map names {fname}, which "
                                  "is not in the snapshot")
        code.update(fname.encode() + b"\0" + p.read_bytes())
    log.warning("%s: running the modeling code shipped in the snapshot (%s), as "
                "trust_remote_code=true asks", redact(uri), ", ".join(_code_files(cfg)))
    try:
        model = AutoModel.from_pretrained(str(local), trust_remote_code=True,
                                          local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, AttributeError, TypeError,
            RuntimeError) as exc:
        raise CheckpointError(f"{redact(uri)}: transformers could not load it: "
                              f"{type(exc).__name__}: {redact(exc)[:500]}") from exc
    model = model.float().eval()
    probe = _probe(model, in_dim, uri)
    config = RemoteCodeConfig(
        in_dim=int(in_dim), hidden_dim=int(probe.shape[-1]),
        model_type=str(cfg.get("model_type") or ""),
        architectures=tuple(cfg.get("architectures") or ()), code_sha256=code.hexdigest())
    wrapped = RemoteSlideEncoder(model, config).eval()
    wrapped.name = name
    wrapped.trained = True
    return wrapped


def _probe(model: nn.Module, in_dim: int, uri: str) -> torch.Tensor:
    """A 4 x 4 grid of zeros through the model: its slide embedding, else a clear error."""
    n = 16
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"),
                       -1).reshape(1, n, 2)
    try:
        with torch.inference_mode():
            out = map_outputs(model(torch.zeros(1, n, in_dim), torch.tensor([n]), grid))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{redact(uri)}: the model does not run on {in_dim}-d patch "
                              f"features (probe forward: {type(exc).__name__}: "
                              f"{redact(exc)[:300]})") from exc
    if out["slide_embedding"] is None:
        raise CheckpointError(f"{redact(uri)}: the model's output has none of "
                              f"{', '.join(OUTPUT_NAMES['slide_embedding'])}")
    return out["slide_embedding"]


__all__ = [
    "OUTPUT_NAMES",
    "RemoteCodeConfig",
    "RemoteSlideEncoder",
    "is_remote_code_config",
    "load_remote_slide_encoder",
    "map_outputs",
    "read_snapshot_config",
    "refuse_untrusted",
]
