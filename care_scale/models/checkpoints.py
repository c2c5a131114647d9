"""Checkpoints: safetensors + config.json, torch files only through ``weights_only=True``.

A care-scale checkpoint is a directory (local path or any fsspec URI) holding
``model.safetensors`` and ``config.json``. A bare ``.safetensors`` file also works (its header
metadata carries the config when we wrote it), and so do torch files (``.pt/.pth/.bin/.ckpt``),
which are read with ``torch.load(weights_only=True)``: nothing is ever unpickled freely.

One function resolves weights (:func:`resolve_weights`), one loads them into a model with clear
reports of missing/unexpected keys and a refusal of shape mismatches (:func:`load_into`).
Converters are pure functions ``(state_dict, model) -> state_dict`` for foreign key names.
:func:`model_version` names what produced an embedding: model name + hash of config and weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from care_scale.exceptions import CheckpointError, UnsafeCheckpointError
from care_scale.models.hub import is_hf_uri, resolve_hf_snapshot
from care_scale.storage import join, redact, url_to_fs

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "care-scale-checkpoint"
FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_METADATA_KEY = "care_scale_config"


@dataclass(frozen=True)
class LoadReport:
    missing: list[str]
    unexpected: list[str]


def _read_bytes(fs, path: str, uri: str) -> bytes:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{redact(uri)}: no such checkpoint file") from exc
    except OSError as exc:
        raise CheckpointError(f"{redact(uri)}: cannot read checkpoint: {redact(exc)}") from exc


def _safetensors_metadata(data: bytes, uri: str) -> dict[str, str]:
    # The header is an 8-byte little-endian length followed by JSON; reading it ourselves
    # works on bytes from any filesystem.
    if len(data) < 8:
        raise CheckpointError(f"{redact(uri)}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{redact(uri)}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{redact(uri)}: not a safetensors file ({exc})") from exc
    return header.get("__metadata__") or {}


def _load_safetensors(data: bytes, uri: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors.torch import load as st_load

    meta = _safetensors_metadata(data, uri)
    try:
        state = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported)
        raise CheckpointError(f"{redact(uri)}: corrupt safetensors file: {exc}") from exc
    cfg = json.loads(meta[_METADATA_KEY]) if _METADATA_KEY in meta else None
    return state, cfg


def _unwrap(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside common training-checkpoint layouts."""
    for key in ("state_dict", "model_state_dict", "model", "teacher", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{redact(uri)}: torch file holds {type(obj).__name__}, "
                              "not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [str(k) for k in obj if not isinstance(obj[k], torch.Tensor)]
    if not tensors:
        raise CheckpointError(f"{redact(uri)}: torch file contains no tensors")
    if dropped:
        log.info("%s: ignoring non-tensor entries %s", redact(uri), dropped[:10])
    return tensors


def _load_torch(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{redact(uri)}: refused: the torch file needs to unpickle objects that are not "
            f"plain tensors/containers ({_unpickle_reason(exc)}); loading it could run code. "
            "Re-save its state dict as safetensors where it was made, or use the published "
            "safetensors file"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{redact(uri)}: unreadable torch file: {exc}") from exc
    return _unwrap(obj, uri)


def _unpickle_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, without the advice torch appends (to
    retry with ``weights_only=False``: never advise that for a file of unknown origin)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if ("GLOBAL" in ln or "Unsupported" in ln)
             and "weights_only" not in ln]
    return (named[0] if named else "an object torch's weights-only loader does not allow")[:200]


def resolve_weights(
    uri: str, *, storage_options: dict[str, Any] | None = None,
    weight_files: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a checkpoint -> (state, config): a folder, a .safetensors or torch file (local
    or fsspec), or ``hf:ORG/NAME[@revision]`` (a snapshot in the local Hugging Face cache,
    never the network; :mod:`care_scale.models.hub`).

    In a folder, the names in ``weight_files`` (a registry entry's published file names,
    e.g. CONCH v1.5's ``pytorch_model_vision.bin``) are looked for first, then
    ``model.safetensors`` and the usual torch names. ``config`` is the parsed ``config.json``
    (or safetensors metadata) or ``None``.
    """
    if is_hf_uri(uri):
        snap = resolve_hf_snapshot(uri, files=weight_files[:1])
        return resolve_weights(str(snap), weight_files=weight_files)
    fs, path = url_to_fs(uri, storage_options)
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return _load_safetensors(_read_bytes(fs, path, uri), uri)
    if lower.endswith(_TORCH_SUFFIXES):
        return _load_torch(_read_bytes(fs, path, uri), uri), None
    try:
        exists = fs.exists(path)
    except OSError as exc:
        raise CheckpointError(f"{redact(uri)}: cannot reach checkpoint: {redact(exc)}") from exc
    if not exists:
        raise CheckpointError(f"{redact(uri)}: checkpoint not found")
    cfg = None
    cfg_path = join(path, CONFIG_FILE)
    if fs.exists(cfg_path):
        try:
            cfg = json.loads(_read_bytes(fs, cfg_path, uri))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{redact(uri)}: config.json is not JSON: {exc}") from exc
    names = (*weight_files, WEIGHTS_FILE, "pytorch_model.bin", "model.pt", "model.pth",
             "checkpoint.pt")
    for name in dict.fromkeys(names):
        if not fs.exists(join(path, name)):
            continue
        data = _read_bytes(fs, join(path, name), uri)
        if name.endswith(".safetensors"):
            state, meta_cfg = _load_safetensors(data, uri)
            return state, cfg if cfg is not None else meta_cfg
        return _load_torch(data, uri), cfg
    raise CheckpointError(f"{redact(uri)}: no weights file in it (looked for "
                          f"{', '.join(dict.fromkeys(names))})")


#: config.json field -> PatchEncoderSpec attribute, in the two layouts published snapshots
#: have: transformers' config (top level; Phikon-v2) and timm's hub config (``model_args``).
TRANSFORMERS_CONFIG_FIELDS = {
    "hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
    "patch_size": "patch_size", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias"}
TIMM_CONFIG_FIELDS = {
    "embed_dim": "width", "depth": "depth", "num_heads": "num_heads",
    "patch_size": "patch_size", "mlp_ratio": "mlp_ratio", "reg_tokens": "reg_tokens",
    "no_embed_class": "no_embed_class"}


def check_published_config(cfg: dict[str, Any], spec: Any, source: str) -> None:
    """A published snapshot's ``config.json`` must not contradict the registry entry it is
    loaded as: fields a state dict cannot show (the number of heads) would otherwise load
    silently wrong. Only the fields present are compared; care-scale's own configs are
    skipped (their architecture is the entry)."""
    if "format" in cfg:
        return
    args = cfg.get("model_args")
    given, fields = ((args, TIMM_CONFIG_FIELDS) if isinstance(args, dict)
                     else (cfg, TRANSFORMERS_CONFIG_FIELDS))
    bad = [f"{key}={given[key]!r} (entry {spec.name}: {attr}={getattr(spec, attr)!r})"
           for key, attr in fields.items()
           if key in given and not _same_value(given[key], getattr(spec, attr))]
    if bad:
        raise CheckpointError(f"{redact(source)}: config.json contradicts the registry entry: "
                              f"{', '.join(bad)}")


def _same_value(given: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(given, bool):
        return given is ours
    if isinstance(given, (int, float)) and isinstance(ours, (int, float)):
        return math.isclose(given, ours, rel_tol=1e-6)
    return False


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
              strict: bool = True, source_names: dict[str, str] | None = None) -> LoadReport:
    """Load ``state`` into ``model``; shape mismatches are refused with the key named.

    Missing and unexpected keys are an error when ``strict`` (the default), else a warning.
    ``source_names``: converted key -> the key as the file has it, for the messages.
    """
    own = model.state_dict()
    src = redact(source)
    names = source_names or {}

    def shown(key: str) -> str:
        return names.get(key, key)

    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{src}: shape mismatch for {shown(key)!r}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(own[key].shape)}"
            )
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(shown(k) for k in state if k not in own)
    if missing or unexpected:
        msg = (f"{src}: {len(missing)} missing keys {missing[:20]}, "
               f"{len(unexpected)} unexpected keys {unexpected[:20]}")
        if strict:
            raise CheckpointError(msg)
        log.warning(msg)
    usable = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    model.load_state_dict(usable, strict=False)
    return LoadReport(missing, unexpected)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The architecture description saved next to the weights (CareConfig or patch spec)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        cfg = getattr(model, "spec", None)
    if cfg is None:
        raise CheckpointError(f"{type(model).__name__} has neither .config nor .spec")
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _kind(model: nn.Module) -> str:
    return "slide_encoder" if hasattr(model, "config") else "patch_encoder"


def save_checkpoint(model: nn.Module, uri: str, *,
                    storage_options: dict[str, Any] | None = None) -> str:
    """Write ``model.safetensors`` + ``config.json`` under directory ``uri``; returns ``uri``."""
    from safetensors.torch import save as st_save

    name = getattr(model, "name", type(model).__name__)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
           "kind": _kind(model), "config": model_config(model),
           "model_version": model_version(model)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = st_save(state, metadata={_METADATA_KEY: json.dumps(doc, sort_keys=True)})
    fs, path = url_to_fs(uri, storage_options)
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(join(path, WEIGHTS_FILE), "wb") as f:
            f.write(data)
        with fs.open(join(path, CONFIG_FILE), "wb") as f:
            f.write(json.dumps(doc, indent=2, sort_keys=True).encode())
    except OSError as exc:
        raise CheckpointError(f"{redact(uri)}: cannot write checkpoint: {redact(exc)}") from exc
    return uri


def model_version(model: nn.Module) -> str:
    """``"<name>-<12 hex>"``: hash of the architecture config and every weight tensor.

    Cached until a parameter or buffer is modified in place (e.g. by an optimizer step).
    """
    tensors = model.state_dict()
    stamp = tuple((k, v._version, v.data_ptr()) for k, v in tensors.items())
    cached = getattr(model, "_care_version_cache", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.sha256()
    h.update(json.dumps(model_config(model), sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    version = f"{getattr(model, 'name', type(model).__name__)}-{h.hexdigest()[:12]}"
    object.__setattr__(model, "_care_version_cache", (stamp, version))
    return version


# ---------------------------------------------------------------- converters (pure functions)

def strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p):]
                break
        out[key] = value
    return out


def convert_timm_vit(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm / UNI style ViT state dict -> ours: strip wrappers, drop an unused classifier."""
    out = strip_prefixes(state, ("module.", "model.", "backbone.", "encoder.", "trunk.",
                                 "visual.trunk."))
    if "head.weight" not in model.state_dict():
        # A classification head (timm num_classes > 0) has no place in a feature encoder.
        out.pop("head.weight", None)
        out.pop("head.bias", None)
    return out


def resample_pos_embed(pos_embed: torch.Tensor, grid: int,
                       mode: str = "bilinear") -> torch.Tensor:
    """A (1, 1 + g*g, C) position table (class token first) resampled to ``grid`` x ``grid``
    by size, no antialiasing, in float32: bilinear as timm's ``resample_abs_pos_embed`` does
    when CONCH v1.5's reference code fits a published table to its trunk; bicubic as
    transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` does."""
    import torch.nn.functional as F

    n_old = pos_embed.shape[1] - 1
    old = math.isqrt(n_old)
    if old * old != n_old:
        raise CheckpointError(f"position table of {n_old} tokens is not a square grid")
    if old == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, table = pos_embed[:, :1], pos_embed[:, 1:].float()
    table = F.interpolate(table.reshape(1, old, old, dim).permute(0, 3, 1, 2),
                          size=(grid, grid), mode=mode, align_corners=False,
                          antialias=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, table], dim=1)


#: CONCH v1.5's published module names -> ours (TRIDENT's ``CONCHVisionTower``).
CONCH_V1_5_RENAMES = (("trunk.", ""), ("attn_pool_contrast.", "attn_pool."),
                      ("ln_contrast.", "pool_norm."))


def convert_conch_v1_5(state: dict[str, torch.Tensor],
                       model: nn.Module) -> dict[str, torch.Tensor]:
    """``pytorch_model_vision.bin`` of MahmoodLab/conchv1_5 -> our ViT with ``attn_pool``.

    Renames only the three published prefixes; any other key is left as it is, so the strict
    load names it instead of dropping it. The position table is fitted to the model's stored
    grid as the reference loader does (bilinear) before it is interpolated per input size.
    """
    out = {}
    for key, value in state.items():
        for old, new in CONCH_V1_5_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    if "pos_embed" in out and hasattr(model, "spec"):
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model.spec.grid)
    return out


#: transformers ``Dinov2Model`` names as its published files hold them (Phikon-v2's
#: ``model.safetensors``; transformers 5 renames the attention modules in memory but still
#: writes these) -> ours. ``{i}``: the block number.
HF_DINOV2_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
#: Inside ``encoder.layer.{i}.``: a name ending in "." renames a module (its weight/bias).
HF_DINOV2_BLOCK_RENAMES = {
    "norm1.": "norm1.", "norm2.": "norm2.", "attention.output.dense.": "attn.proj.",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
#: Only used when pretraining masks patches (``bool_masked_pos``); never at inference.
HF_DINOV2_UNUSED = ("embeddings.mask_token",)
_HF_QKV = ("query", "key", "value")


def _rename_block_key(inner: str) -> str | None:
    for old, new in HF_DINOV2_BLOCK_RENAMES.items():
        if inner == old or (old.endswith(".") and inner.startswith(old)
                            and "." not in inner[len(old):]):
            return new + inner[len(old):]
    return None


def convert_hf_dinov2(state: dict[str, torch.Tensor],
                      model: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model`` state dict (owkin/phikon-v2) -> our ViT.

    Explicit names only: ``query``/``key``/``value`` are stacked into ``qkv`` when all three of
    a block are there; a key it does not know keeps its name, so the strict load names it. The
    position table is fitted to the model's grid the way ``Dinov2Embeddings`` interpolates it
    at run time (bicubic to the target size, in float32), once, at load.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in HF_DINOV2_UNUSED:
            continue
        if key in HF_DINOV2_RENAMES:
            out[HF_DINOV2_RENAMES[key]] = value
            continue
        head, _, rest = key.partition(".layer.")
        index, _, inner = rest.partition(".")
        if head != "encoder" or not index.isdigit():
            out[key] = value
            continue
        renamed = _rename_block_key(inner)
        module, _, param = inner.rpartition(".")
        if renamed is not None:
            out[f"blocks.{index}.{renamed}"] = value
        elif module.startswith("attention.attention.") and module.rsplit(".", 1)[1] in _HF_QKV:
            qkv.setdefault((index, param), {})[module.rsplit(".", 1)[1]] = value
        else:
            out[key] = value
    for (index, param), parts in qkv.items():
        if set(parts) == set(_HF_QKV):
            out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts[n] for n in _HF_QKV])
        else:  # incomplete: leave them as the file names them
            out.update({f"encoder.layer.{index}.attention.attention.{n}.{param}": v
                        for n, v in parts.items()})
    if "pos_embed" in out and hasattr(model, "spec"):
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model.spec.grid,
                                              mode="bicubic")
    return out


def convert_care_reference(state: dict[str, torch.Tensor],
                           model: nn.Module) -> dict[str, torch.Tensor]:
    """Training-wrapper prefixes of CARE checkpoints (DDP ``module.``, iBOT ``teacher.`` /
    ``student.`` / ``backbone.``) -> our key names. The official release's inner key names are
    not published in a form we could verify; extend this mapping when they are."""
    out = strip_prefixes(state, ("module.", "teacher.backbone.", "student.backbone.",
                                 "teacher.", "student.", "backbone.", "slide_encoder.",
                                 "model."))
    return {k: v for k, v in out.items() if not k.startswith(("head.", "dino_head.", "ibot_head."))
            or k in model.state_dict()}
