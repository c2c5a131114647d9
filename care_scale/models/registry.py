"""Registries of patch and slide encoders (timm style).

Every fact about a model lives on its registry entry (embedding size, input size, image
normalisation, microns per pixel, the patch encoder a slide encoder expects), so callers look
facts up instead of branching on names. Family modules register themselves with a decorator
when imported, and ``care_scale.models`` imports every family (timm's way): this module
imports none of them, so a new family is one module plus one import line there.

    @register_patch_encoder(PatchEncoderSpec(name="vit_micro_patch16_64", ...))
    def vit_micro_patch16_64(spec: PatchEncoderSpec) -> nn.Module: ...

``create_patch_encoder`` / ``create_slide_encoder`` build a model from its entry, seeded so that
untrained models are reproducible, and load a checkpoint when one is given.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from care_scale.choices import TilingMode

# UntrainedWeightsWarning is defined with the other warnings (torch-free), named here too.
from care_scale.exceptions import CheckpointError, ConfigError, UntrainedWeightsWarning
from care_scale.storage import redact

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Seed every model starts from when no checkpoint is given (demos and tests stay reproducible).
UNTRAINED_SEED = 0


@dataclass(frozen=True)
class PatchEncoderSpec:
    """Facts about one patch encoder. ``embed_dim`` is the size of the feature it returns."""

    name: str
    embed_dim: int
    input_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5
    layer_scale_init: float | None = None
    qkv_bias: bool = True
    #: Block MLP: timm's ``Mlp`` with GELU ("gelu"), or ``SwiGLUPacked`` ("swiglu_packed":
    #: one ``fc1`` to ``int(width * mlp_ratio)``, SiLU(first half) x second half, ``fc2`` from
    #: half that; UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath).
    mlp: Literal["gelu", "swiglu_packed"] = "gelu"
    #: Register tokens after the class token (timm ``reg_tokens``; key ``reg_token``).
    reg_tokens: int = 0
    #: timm's ``no_embed_class``: the position table covers the patch tokens only and is added
    #: before the class/register tokens are prepended (UNI2-h, H-optimus-0); False: it also has
    #: rows for the class and register tokens (UNI, Virchow2, GigaPath, Phikon-v2, CONCH v1.5).
    no_embed_class: bool = False
    #: What the feature is: the final-norm class token ("token"); the class token concatenated
    #: with the mean of the patch tokens, registers excluded ("token+mean_patch", Virchow2:
    #: ``embed_dim == 2 * width``); or an attentional pooler over all tokens followed by a
    #: LayerNorm ("attn_pool", CONCH v1.5's contrastive head).
    pool: Literal["token", "token+mean_patch", "attn_pool"] = "token"
    #: Heads of the attentional pooler (its query width is ``embed_dim``).
    pool_heads: int = 8
    #: Grid the position table is stored at, when the published model keeps it at another
    #: size than its input (CONCH v1.5: 14, trunk built at 224 px, run at 448 px with the
    #: table interpolated); None: ``input_size // patch_size``.
    pos_embed_grid: int | None = None
    #: Tile side (px, at ``mpp``) the slide is cut at before the encoder resizes it to
    #: ``input_size`` (CONCH v1.5: 512 px at 0.5 um/px, resized to 448); None: input_size.
    tile_size: int | None = None
    #: The reference transform's resize filter (torchvision ``InterpolationMode``; antialiased
    #: as PIL resizes) and the side it resizes to before a centre crop to ``input_size``
    #: (Prov-GigaPath: Resize(256, bicubic) + CenterCrop(224)); None: straight to input_size.
    resize_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    resize_size: int | None = None
    #: Hugging Face repository of the published weights, and the files a snapshot must hold.
    hf_repo: str = ""
    weight_files: tuple[str, ...] = ()
    source: str = ""
    description: str = ""

    @property
    def grid(self) -> int:
        """Side of the position table's token grid."""
        return self.pos_embed_grid or self.input_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token and the registers."""
        return 1 + self.reg_tokens

    @property
    def pos_embed_rows(self) -> int:
        """Rows of the stored position table (timm's ``embed_len``)."""
        return self.grid ** 2 + (0 if self.no_embed_class else self.prefix_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SlideEncoderSpec:
    """Facts about one slide encoder: which patch encoder's features it consumes."""

    name: str
    patch_encoder: str
    config: dict[str, Any] = field(default_factory=dict)
    #: The tiling it was trained on: tile side in px at ``mpp`` um/px, cut by the ``tiling``
    #: mode (care_scale.tiling.TILING_MODES); the job's preset.
    tile_size: int = 224
    mpp: float = 0.5
    tiling: TilingMode = "native"
    #: Hugging Face repository of the published weights, if any.
    hf_repo: str = ""
    source: str = ""
    description: str = ""

    @property
    def in_dim(self) -> int:
        return int(self.config["in_dim"])

    @property
    def embed_dim(self) -> int:
        """Size of the slide, region and ROI embeddings."""
        return int(self.config["hidden_dim"])


@dataclass(frozen=True)
class PatchEncoderEntry:
    spec: PatchEncoderSpec
    build: Callable[[PatchEncoderSpec], nn.Module]
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None


@dataclass(frozen=True)
class SlideEncoderEntry:
    spec: SlideEncoderSpec
    build: Callable[..., nn.Module]
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None


_PATCH_ENCODERS: dict[str, PatchEncoderEntry] = {}
_SLIDE_ENCODERS: dict[str, SlideEncoderEntry] = {}


def register_patch_encoder(spec: PatchEncoderSpec, *, convert=None):
    """Decorator: register ``fn(spec) -> nn.Module`` under ``spec.name``."""

    def deco(fn):
        if spec.name in _PATCH_ENCODERS:
            raise ConfigError(f"patch encoder {spec.name!r} is registered twice")
        _PATCH_ENCODERS[spec.name] = PatchEncoderEntry(spec, fn, convert)
        return fn

    return deco


def register_slide_encoder(spec: SlideEncoderSpec, *, convert=None):
    """Decorator: register ``fn(config) -> nn.Module`` under ``spec.name``."""

    def deco(fn):
        if spec.name in _SLIDE_ENCODERS:
            raise ConfigError(f"slide encoder {spec.name!r} is registered twice")
        _SLIDE_ENCODERS[spec.name] = SlideEncoderEntry(spec, fn, convert)
        return fn

    return deco


def list_patch_encoders() -> list[str]:
    return sorted(_PATCH_ENCODERS)


def list_slide_encoders() -> list[str]:
    return sorted(_SLIDE_ENCODERS)


def patch_encoder_entry(name: str) -> PatchEncoderEntry:
    if name not in _PATCH_ENCODERS:
        raise ConfigError(
            f"unknown patch encoder {name!r}; registered: {', '.join(sorted(_PATCH_ENCODERS))}"
        )
    return _PATCH_ENCODERS[name]


def slide_encoder_entry(name: str) -> SlideEncoderEntry:
    if name not in _SLIDE_ENCODERS:
        raise ConfigError(
            f"unknown slide encoder {name!r}; registered: {', '.join(sorted(_SLIDE_ENCODERS))}"
        )
    return _SLIDE_ENCODERS[name]


def slide_encoder_for_checkpoint(name: str, checkpoint: str | None) -> str:
    """The slide encoder an ``hf:`` checkpoint belongs to: the entry whose published
    repository it names, when the entry ``name`` has no published repository of its own (the
    default ``care_tiny`` with ``hf:Zipper-1/CARE`` means ``care``); else ``name``."""
    from care_scale.models.hub import is_hf_uri, parse_hf_uri

    if not checkpoint or not is_hf_uri(checkpoint) or slide_encoder_entry(name).spec.hf_repo:
        return name
    repo = parse_hf_uri(checkpoint)[0]
    owners = [n for n, e in _SLIDE_ENCODERS.items() if e.spec.hf_repo == repo]
    return owners[0] if len(owners) == 1 else name


def get_patch_encoder_spec(name: str) -> PatchEncoderSpec:
    return patch_encoder_entry(name).spec


def get_slide_encoder_spec(name: str) -> SlideEncoderSpec:
    return slide_encoder_entry(name).spec


def warn_untrained(name: str, reason: str = "no checkpoint given") -> None:
    """Say loudly that weights are random: one Python warning (the CLI prints it as one
    line; a log record as well would show it twice)."""
    msg = (
        f"{name}: {reason}, running on UNTRAINED weights (seed {UNTRAINED_SEED}). "
        "Embeddings are reproducible but carry no biological meaning; pass checkpoint=... "
        "for real use."
    )
    warnings.warn(msg, UntrainedWeightsWarning, stacklevel=3)


def _is_transformers_config(cfg: dict[str, Any]) -> bool:
    """A Hugging Face transformers ``config.json`` (not one of ours)."""
    return "format" not in cfg and any(k in cfg for k in ("architectures", "auto_map",
                                                           "model_type"))


def _check_kind(checkpoint: str, ckpt_cfg: dict[str, Any] | None, kind: str) -> None:
    """A care-scale checkpoint names what it holds; another kind than asked is an error."""
    if ckpt_cfg is not None and ckpt_cfg.get("kind", kind) != kind:
        raise CheckpointError(f"{redact(checkpoint)}: holds a {ckpt_cfg.get('kind')} "
                              f"({ckpt_cfg.get('name')}), not a {kind.replace('_', ' ')}")


def _seeded_build(build: Callable[[], nn.Module], seed: int | None = None) -> nn.Module:
    # fork_rng keeps the caller's global RNG stream untouched by our fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED if seed is None else seed)
        return build()


def create_patch_encoder(
    name: str,
    checkpoint: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Build a registered patch encoder; load ``checkpoint`` (dir / .safetensors / torch file).

    The returned module has ``.spec`` (:class:`PatchEncoderSpec`), ``.name`` and takes uint8
    tiles ``(B, H, W, 3)``, returning float32 ``(B, spec.embed_dim)``.
    """
    from care_scale.models.checkpoints import check_published_config, resolve_weights

    entry = patch_encoder_entry(name)
    state = None
    if checkpoint is not None:  # weights first: a missing file fails before a big build
        state, ckpt_cfg = resolve_weights(checkpoint, storage_options=storage_options,
                                          weight_files=entry.spec.weight_files)
        _check_kind(checkpoint, ckpt_cfg, "patch_encoder")
        if ckpt_cfg is not None:
            check_published_config(ckpt_cfg, entry.spec, checkpoint)
    model = _seeded_build(lambda: entry.build(entry.spec))
    model.name = name
    model.spec = entry.spec
    if state is None:
        model.trained = False
        warn_untrained(name)
    else:
        _load_converted(model, entry, state, checkpoint, strict, name)
    return model.eval()


def _load_converted(model: nn.Module, entry: Any, state: dict[str, torch.Tensor],
                    checkpoint: str, strict: bool, name: str) -> None:
    """Convert with the entry's converter and load; errors name keys as the file has them."""
    from care_scale.models.checkpoints import load_into

    given = {id(v): k for k, v in state.items()}
    if entry.convert is not None:
        state = entry.convert(state, model)
    renamed = {k: given[id(v)] for k, v in state.items() if given.get(id(v), k) != k}
    _mark_loaded(model, load_into(model, state, source=checkpoint, strict=strict,
                                  source_names=renamed), name)


def _mark_loaded(model: nn.Module, report: Any, name: str) -> None:
    """A non-strict load that left keys at their seeded values is not a trained model."""
    model.trained = not report.missing
    if report.missing:
        warn_untrained(name, f"{len(report.missing)} keys not in the checkpoint "
                             f"({', '.join(report.missing[:5])})")


def create_slide_encoder(
    name: str = "care",
    checkpoint: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    strict: bool = True,
    trust_remote_code: bool = False,
    init_seed: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered slide encoder (CARE); ``overrides`` change :class:`CareConfig` fields.

    ``init_seed`` seeds the random initialisation (default: the registry's fixed seed, so an
    untrained model is the same everywhere); weights from a checkpoint replace it.

    With a checkpoint directory, its ``config.json`` defines the architecture (overrides are
    applied on top); a bare weights file uses the registry defaults plus overrides. A
    transformers snapshot with modeling code of its own (the official ``hf:Zipper-1/CARE``)
    runs that code only with ``trust_remote_code=True`` (:mod:`care_scale.models.remote`).
    """
    from care_scale.models.checkpoints import resolve_weights

    entry = slide_encoder_entry(name)
    cfg: dict[str, Any] = dict(entry.spec.config)
    state = None
    if checkpoint is not None:
        from care_scale.models import remote

        folder, snap_cfg = remote.read_snapshot_config(checkpoint, storage_options)
        if folder is not None and remote.is_remote_code_config(snap_cfg):
            extra = sorted(set(overrides) - {"in_dim"})
            if extra:
                raise ConfigError(f"{redact(checkpoint)}: its architecture comes from the "
                                  f"snapshot's own code; overrides {extra} do not apply")
            return remote.load_remote_slide_encoder(
                checkpoint, folder, snap_cfg,
                in_dim=int(overrides.get("in_dim", entry.spec.in_dim)),
                trust_remote_code=trust_remote_code, name=name,
                storage_options=storage_options)
        state, ckpt_cfg = resolve_weights(checkpoint, storage_options=storage_options)
        if ckpt_cfg is not None and _is_transformers_config(ckpt_cfg):
            raise CheckpointError(
                f"{redact(checkpoint)}: a transformers snapshot ({ckpt_cfg.get('model_type')}"
                f", {', '.join(ckpt_cfg.get('architectures') or [])}) with modeling code of "
                "its own; this version loads care-scale CARE checkpoints and converted "
                "state dicts only, not remote code (see the README's Models section)")
        if ckpt_cfg is not None:
            _check_kind(checkpoint, ckpt_cfg, "slide_encoder")
            arch = ckpt_cfg.get("config", ckpt_cfg)
            if not isinstance(arch, dict):
                raise CheckpointError(f"{redact(checkpoint)}: config.json 'config' is not a mapping")
            cfg.update(arch)
    cfg.update(overrides)
    model = _seeded_build(lambda: entry.build(cfg), init_seed)
    model.name = name
    model.spec = entry.spec
    if state is None:
        model.trained = False
        warn_untrained(name)
    else:
        _load_converted(model, entry, state, checkpoint, strict, name)
    return model.eval()


def model_table() -> list[dict[str, Any]]:
    """One row per registered encoder: what ``care-scale models`` prints."""
    rows = []
    for name in list_patch_encoders():
        spec = _PATCH_ENCODERS[name].spec
        rows.append({
            "name": name, "kind": "patch", "in": f"{spec.input_size} px",
            "out": spec.embed_dim, "tiling": f"{spec.tile_size or spec.input_size} px @ "
                                              f"{spec.mpp} um/px",
            "hf_repo": spec.hf_repo,
            "weights": _weights_found(spec.hf_repo, spec.weight_files),
        })
    for name in list_slide_encoders():
        spec = _SLIDE_ENCODERS[name].spec
        rows.append({
            "name": name, "kind": "slide", "in": f"{spec.in_dim}-d ({spec.patch_encoder})",
            "out": spec.embed_dim,
            "tiling": f"{spec.tile_size} px @ {spec.mpp} um/px ({spec.tiling})",
            "hf_repo": spec.hf_repo,
            "weights": _weights_found(spec.hf_repo, ()),
        })
    return rows


def _weights_found(repo: str, files: tuple[str, ...]) -> str:
    from care_scale.models.hub import local_snapshot

    if not repo:
        return "-"
    snap = local_snapshot(repo, files)
    return str(snap) if snap else "not in the HF cache"

