"""Vision Transformer patch encoder in plain PyTorch, with timm's state-dict key names.

Keys match ``timm.models.vision_transformer.VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.ls1.gamma``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``,
``head``, ``reg_token``), so timm checkpoints load after :func:`convert_timm_vit` strips
wrappers. The published pathology encoders are this one class with options on their registry
entries (``mlp``, ``reg_tokens``, ``no_embed_class``, ``layer_scale_init``, ``pool``, the
resize): UNI, UNI2-h, Virchow2, H-optimus-0 and Prov-GigaPath are timm models with timm's
names; Phikon-v2 is a transformers ``Dinov2Model`` whose names :func:`convert_hf_dinov2` maps;
CONCH v1.5 (``pool="attn_pool"``) adds its attentional pooler and LayerNorm in place of the
head and :func:`convert_conch_v1_5` maps its published names (``trunk.``,
``attn_pool_contrast.``, ``ln_contrast.``) onto ours.

The encoder takes uint8 tiles ``(B, H, W, 3)`` exactly as the slide layer returns them and does
resize + normalisation itself, batched on whatever device the model lives on, so the data
pipeline never converts images to float on the host.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from care_scale.exceptions import ModelInputError
from care_scale.models.checkpoints import convert_conch_v1_5, convert_hf_dinov2, convert_timm_vit
from care_scale.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchEncoderSpec,
    register_patch_encoder,
)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, tokens, width)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, width: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1, GELU (exact), fc2."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """timm's ``SwiGLUPacked`` (``GluMlp`` with SiLU, gate first): one ``fc1`` to ``hidden``,
    ``SiLU(first half) * second half``, ``fc2`` from ``hidden // 2``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        if hidden % 2:
            raise ModelInputError(f"SwiGLU MLP: hidden width {hidden} is odd (it is split in "
                                  "two halves)")
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden // 2, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(gate) * value)


#: ``PatchEncoderSpec.mlp`` -> the block MLP.
MLPS: dict[str, type[nn.Module]] = {"gelu": Mlp, "swiglu_packed": SwiGLUPacked}


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 layer_scale_init: float | None, mlp: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads, qkv_bias)
        self.ls1 = LayerScale(width, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLPS[mlp](width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width, layer_scale_init) if layer_scale_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionalPooler(nn.Module):
    """Learned queries attending over the token sequence (CoCa / CONCH ``attn_pool``).

    Same parameters and arithmetic as the reference: LayerNorm on keys and queries, no biases,
    ``d_model // n_head`` per head; softmax attention (written with SDPA here).
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int = 1):
        super().__init__()
        if d_model % n_head:
            raise ModelInputError(f"attentional pooler: width {d_model} is not a multiple of "
                                  f"{n_head} heads")
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, context_dim) -> pooled (B, n_queries, d_model)."""
        b, n, _ = x.shape
        q = self.to_q(self.ln_q(self.query))  # (Q, D): the same for every image
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        d = q.shape[-1] // self.heads
        q = q.view(1, -1, self.heads, d).transpose(1, 2).expand(b, -1, -1, -1)
        k = k.reshape(b, n, self.heads, d).transpose(1, 2)
        v = v.reshape(b, n, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, d)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * d))


def resize_square(x: torch.Tensor, size: int, *, resize_size: int | None = None,
                  mode: str = "bilinear", rows_only: bool = False) -> torch.Tensor:
    """Square float tiles (B, C, T, T) -> (B, C, size, size), as the reference transforms do
    on PIL images: Resize(``resize_size or size``) with ``mode`` (antialiased like PIL when
    shrinking; bicubic always through the antialiased kernel, which is PIL's a=-0.5 cubic),
    then CenterCrop(``size``) with torchvision's offsets. Linear in ``x``, so the ONNX graph
    builds its resize matrices with this same function (``rows_only``: the height only)."""
    first = resize_size or size
    side = int(x.shape[-2])
    if side != first:
        out = (first, int(x.shape[-1]) if rows_only else first)
        x = F.interpolate(x, size=out, mode=mode, align_corners=False,
                          antialias=mode == "bicubic" or side > first)
    if first != size:
        top = round((first - size) / 2.0)
        x = x[..., top:top + size, :]
        if not rows_only:
            x = x[..., top:top + size]
    return x


class VisionTransformer(nn.Module):
    """ViT returning the final-norm class token (through ``head`` when it projects), the class
    token beside the mean patch token (``pool="token+mean_patch"``), or an attentional pooler
    over all tokens plus a LayerNorm (``pool="attn_pool"``)."""

    def __init__(self, spec: PatchEncoderSpec):
        super().__init__()
        if spec.input_size % spec.patch_size:
            raise ModelInputError(
                f"{spec.name}: input_size {spec.input_size} is not a multiple of "
                f"patch_size {spec.patch_size}"
            )
        if spec.pool == "token+mean_patch" and spec.embed_dim != 2 * spec.width:
            raise ModelInputError(f"{spec.name}: pool 'token+mean_patch' returns 2 x width "
                                  f"= {2 * spec.width}, but embed_dim is {spec.embed_dim}")
        self.spec = spec
        width = spec.width
        self.patch_embed = PatchEmbed(spec.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.reg_token = (nn.Parameter(torch.zeros(1, spec.reg_tokens, width))
                          if spec.reg_tokens else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.pos_embed_rows, width))
        self.blocks = nn.Sequential(*[
            Block(width, spec.num_heads, spec.mlp_ratio, spec.qkv_bias, spec.layer_scale_init,
                  spec.mlp)
            for _ in range(spec.depth)
        ])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        if spec.pool == "attn_pool":
            self.attn_pool = AttentionalPooler(spec.embed_dim, width, spec.pool_heads)
            self.pool_norm = nn.LayerNorm(spec.embed_dim)
            self.head = nn.Identity()
        elif spec.pool == "token+mean_patch":
            self.head = nn.Identity()
        else:
            # timm uses Identity when num_classes == 0; a Linear head projects (1024 -> 768).
            self.head = (nn.Linear(width, spec.embed_dim) if spec.embed_dim != width
                         else nn.Identity())
        # Normalisation travels with the model; non-persistent so it is not in the state dict.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S) on the model's device."""
        device = self.mean.device
        if isinstance(tiles, np.ndarray):
            tiles = torch.from_numpy(np.ascontiguousarray(tiles))
        if not isinstance(tiles, torch.Tensor):
            raise ModelInputError(f"{self.spec.name}: tiles must be a uint8 array, got "
                                  f"{type(tiles).__name__}")
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ModelInputError(
                f"{self.spec.name}: expected uint8 tiles (B, H, W, 3), got "
                f"{tuple(tiles.shape)} {tiles.dtype}"
            )
        if tiles.shape[0] == 0:
            raise ModelInputError(f"{self.spec.name}: empty tile batch")
        if tiles.shape[1] != tiles.shape[2]:
            raise ModelInputError(f"{self.spec.name}: tiles must be square, got "
                                  f"{tiles.shape[1]} x {tiles.shape[2]}")
        x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        spec = self.spec
        x = resize_square(x, spec.input_size, resize_size=spec.resize_size,
                          mode=spec.resize_interpolation)
        # Normalise in float32, then match the weights (a half-precision model on a GPU).
        return ((x - self.mean) / self.std).to(self.patch_embed.proj.weight.dtype)

    def pos_embed_for(self, rows: int, cols: int) -> torch.Tensor:
        """The position table for a ``rows x cols`` token grid.

        Stored at ``spec.grid``; another grid is interpolated the way DINO / iBOT (and so
        CONCH v1.5's reference code) do it: bicubic, by scale factor, with the 0.1 offset that
        keeps floating point from dropping a row.
        """
        n = self.spec.grid
        if rows == n and cols == n:
            return self.pos_embed
        prefix = 0 if self.spec.no_embed_class else self.spec.prefix_tokens
        cls_pos, grid = self.pos_embed[:, :prefix], self.pos_embed[:, prefix:]
        dim = grid.shape[-1]
        grid = F.interpolate(
            grid.reshape(1, n, n, dim).permute(0, 3, 1, 2),
            scale_factor=((rows + 0.1) / n, (cols + 0.1) / n),
            mode="bicubic",
        )
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> token sequence after the final norm."""
        # Plain ints: the grid is fixed per input size, so an export traces a constant table.
        rows = int(x.shape[-2]) // self.spec.patch_size
        cols = int(x.shape[-1]) // self.spec.patch_size
        x = self.patch_embed(x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        pos = self.pos_embed_for(rows, cols)
        if self.spec.no_embed_class:  # timm: patches get positions, prefix tokens none
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return self.norm(self.blocks(x))

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        if self.spec.pool == "attn_pool":
            return self.pool_norm(self.attn_pool(tokens)[:, 0])
        if self.spec.pool == "token+mean_patch":  # Virchow's embedding: registers left out
            patches = tokens[:, self.spec.prefix_tokens:]
            return torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)
        return self.head(tokens[:, 0])

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.preprocess(tiles))


def _vit(spec: PatchEncoderSpec) -> VisionTransformer:
    return VisionTransformer(spec)


def _register(spec: PatchEncoderSpec, convert=convert_timm_vit) -> None:
    register_patch_encoder(spec, convert=convert)(_vit)


# Small enough for unit tests on a CPU (a few ms per batch).
_register(PatchEncoderSpec(
    name="vit_micro_patch16_64", embed_dim=64, input_size=64, patch_size=16, width=64, depth=2,
    num_heads=2, description="very small ViT for CPU unit tests (no pretrained weights)",
))
# The demo encoder paired with care_tiny: vit_tiny's width at a smaller input and depth,
# so the end-to-end demo on a CPU is decode-bound like a GPU node is.
_register(PatchEncoderSpec(
    name="vit_demo_patch16_112", embed_dim=192, input_size=112, patch_size=16, width=192,
    depth=4, num_heads=3, description="demo ViT (vit_tiny width, 4 blocks, 112 px input)",
))
_register(PatchEncoderSpec(
    name="vit_tiny_patch16_224", embed_dim=192, input_size=224, patch_size=16, width=192,
    depth=12, num_heads=3, source="timm vit_tiny_patch16_224",
))
_register(PatchEncoderSpec(
    name="vit_small_patch16_224", embed_dim=384, input_size=224, patch_size=16, width=384,
    depth=12, num_heads=6, source="timm vit_small_patch16_224",
))
_register(PatchEncoderSpec(
    name="vit_base_patch16_224", embed_dim=768, input_size=224, patch_size=16, width=768,
    depth=12, num_heads=12, source="timm vit_base_patch16_224",
))
_register(PatchEncoderSpec(
    name="vit_large_patch16_224", embed_dim=1024, input_size=224, patch_size=16, width=1024,
    depth=24, num_heads=16, source="timm vit_large_patch16_224",
))
_register(PatchEncoderSpec(
    name="vit_large_patch16_448", embed_dim=1024, input_size=448, patch_size=16, width=1024,
    depth=24, num_heads=16, source="timm vit_large_patch16_448 shape",
))
# The published pathology patch encoders, built as TRIDENT builds them
# (mahmoodlab/TRIDENT trident/patch_encoder_models/load.py: timm.create_model arguments, the
# eval transform, the forward), tiled as TRIDENT's README recommends (--patch_size, --mag 20).
# Each has a "_micro" twin: the same options at unit-test size ("micro": its sizes), whose
# parity fixtures (tests/data/reference/make_patch_encoders.py) come from timm / transformers.
# "convert": the entry's key-name converter when the published file is not in timm's names.
def _trunk(width: int, depth: int, heads: int, patch: int, **facts) -> dict:
    """A published trunk's facts: 224 px input, feature = the class token unless told."""
    return {"embed_dim": width, "input_size": 224, "patch_size": patch, "width": width,
            "depth": depth, "num_heads": heads, "mpp": 0.5, **facts}


_SWIGLU_G = {"mlp": "swiglu_packed", "mlp_ratio": 2.66667 * 2}  # timm's ViT-g/14 DINOv2 MLP
_TIMM_BIN = ("pytorch_model.bin",)
_PUBLISHED: dict[str, dict] = {
    # timm vit_large_patch16_224, init_values=1e-5, num_classes=0; Resize + CenterCrop(224).
    "uni": _trunk(
        1024, 24, 16, 16, layer_scale_init=1e-5, tile_size=256, hf_repo="MahmoodLab/UNI",
        weight_files=_TIMM_BIN, micro={"input_size": 64, "tile_size": 72},
        source="MahmoodLab/UNI (gated): timm ViT-L/16 with layer scale, class token"),
    # timm vit_giant_patch14_224 with depth 24, 24 heads, width 1536, mlp_ratio 2.66667 * 2,
    # SwiGLUPacked + SiLU, 8 registers, no_embed_class; class token.
    "uni2_h": _trunk(
        1536, 24, 24, 14, **_SWIGLU_G, reg_tokens=8, no_embed_class=True,
        layer_scale_init=1e-5, tile_size=256, hf_repo="MahmoodLab/UNI2-h",
        weight_files=_TIMM_BIN, micro={"input_size": 56, "tile_size": 64},
        source="MahmoodLab/UNI2-h (gated): timm ViT-H/14, SwiGLU, 8 registers"),
    # timm vit_huge_patch14_224, mlp_ratio 5.3375, SwiGLUPacked + SiLU, 4 registers (with
    # rows in the position table), global_pool=""; the forward returns
    # cat(class token, mean of tokens[:, 5:]); Resize(224, bicubic).
    "virchow2": _trunk(
        1280, 32, 16, 14, embed_dim=2560, mlp="swiglu_packed", mlp_ratio=5.3375,
        reg_tokens=4, layer_scale_init=1e-5, pool="token+mean_patch",
        resize_interpolation="bicubic", tile_size=224, hf_repo="paige-ai/Virchow2",
        weight_files=_TIMM_BIN, micro={"input_size": 56, "tile_size": 64, "embed_dim": 64},
        source="paige-ai/Virchow2 (gated): timm ViT-H/14, SwiGLU, 4 registers, class + "
               "mean patch token"),
    # timm vit_giant_patch14_reg4_dinov2 at img_size 224, init_values=1e-5, global_pool
    # "token"; its own mean/std; Resize(224).
    "h_optimus_0": _trunk(
        1536, 40, 24, 14, **_SWIGLU_G, reg_tokens=4, no_embed_class=True,
        layer_scale_init=1e-5, mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517), tile_size=224, hf_repo="bioptimus/H-optimus-0",
        weight_files=_TIMM_BIN, micro={"input_size": 56, "tile_size": 64},
        source="bioptimus/H-optimus-0 (gated): timm ViT-g/14, SwiGLU, 4 registers"),
    # Tile encoder: timm vit_giant_patch14_dinov2 (SwiGLUPacked, init_values 1e-5) with
    # patch_size 16, mlp_ratio 5.33334, num_classes=0; Resize(256, bicubic) + CenterCrop(224).
    "gigapath": _trunk(
        1536, 40, 24, 16, mlp="swiglu_packed", mlp_ratio=5.33334, layer_scale_init=1e-5,
        resize_interpolation="bicubic", resize_size=256, tile_size=256,
        hf_repo="prov-gigapath/prov-gigapath", weight_files=_TIMM_BIN,
        micro={"input_size": 64, "resize_size": 72, "tile_size": 80},
        source="prov-gigapath/prov-gigapath (gated) tile encoder: timm ViT-g, 16 px "
               "patches, SwiGLU"),
    # transformers Dinov2Model (ViT-L/16, layer scale); last_hidden_state[:, 0];
    # Resize + CenterCrop(224). Published names mapped by convert_hf_dinov2.
    "phikon_v2": _trunk(
        1024, 24, 16, 16, layer_scale_init=1.0, tile_size=224, hf_repo="owkin/phikon-v2",
        weight_files=("model.safetensors",), micro={"input_size": 64, "tile_size": 72},
        convert=convert_hf_dinov2,
        source="owkin/phikon-v2: transformers Dinov2Model ViT-L/16 (HF names converted)"),
}
#: What every _micro twin changes: fewer, narrower blocks (its sizes are in "micro"), and
#: no HF repository (it keeps the published file names, so a test snapshot is laid out alike).
_MICRO = {"width": 32, "depth": 2, "num_heads": 2, "embed_dim": 32, "hf_repo": ""}
for _name, _facts in _PUBLISHED.items():
    _facts = dict(_facts)
    _convert, _sizes = _facts.pop("convert", convert_timm_vit), _facts.pop("micro")
    _register(PatchEncoderSpec(name=_name, **_facts), convert=_convert)
    _register(PatchEncoderSpec(
        name=f"{_name}_micro",
        **{**_facts, **_MICRO, **_sizes, "source": f"{_name} at test size (no weights)"},
        description=f"{_name}'s modules at unit-test size: parity fixtures",
    ), convert=_convert)

# CONCH v1.5 as published (MahmoodLab/conchv1_5, file pytorch_model_vision.bin; reference:
# TRIDENT's model_zoo/conchv1_5/conchv1_5.py): ViT-L/16 trunk with layer scale, built at
# 224 px (14 x 14 position table) and run at 448 px, an attentional pooler (one query, 768
# wide, 8 heads) and a LayerNorm; ImageNet mean/std; 512 px tiles at 20x resized to 448.
_CONCH_V1_5 = {
    "embed_dim": 768, "input_size": 448, "patch_size": 16, "width": 1024, "depth": 24,
    "num_heads": 16, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "mpp": 0.5,
    "layer_scale_init": 1.0, "pool": "attn_pool", "pool_heads": 8, "pos_embed_grid": 14,
    "tile_size": 512, "hf_repo": "MahmoodLab/conchv1_5",
    "weight_files": ("pytorch_model_vision.bin",),
}
_register(PatchEncoderSpec(
    name="conch_v1_5", **_CONCH_V1_5,
    source="MahmoodLab/conchv1_5 (gated): pytorch_model_vision.bin, loaded strictly",
    description="the patch encoder whose 768-d features CARE was trained on",
), convert=convert_conch_v1_5)
# The same architecture at test size (timm's "test_vit" idea): same module names and code
# paths, 2 narrow blocks; the parity fixtures in tests/data/reference were made with it.
_register(PatchEncoderSpec(
    name="conch_v1_5_micro", **{**_CONCH_V1_5, "embed_dim": 48, "input_size": 128,
                                "width": 64, "depth": 2, "num_heads": 4, "pos_embed_grid": 4,
                                "tile_size": 160, "hf_repo": ""},
    source="CONCH v1.5 architecture at test size (no published weights)",
    description="CONCH v1.5's modules at unit-test size: parity fixtures",
), convert=convert_conch_v1_5)
