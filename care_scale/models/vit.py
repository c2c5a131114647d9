"""Vision Transformer patch encoder in plain PyTorch, with timm's state-dict key names.

Keys match ``timm.models.vision_transformer.VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.ls1.gamma``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``,
``head``), so timm / UNI-style checkpoints load after :func:`convert_timm_vit` strips wrappers.

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
from care_scale.models.checkpoints import convert_timm_vit
from care_scale.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
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
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 layer_scale_init: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads, qkv_bias)
        self.ls1 = LayerScale(width, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width, layer_scale_init) if layer_scale_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT returning the final-norm CLS token (through ``head`` when it projects)."""

    def __init__(self, spec: PatchEncoderSpec):
        super().__init__()
        if spec.input_size % spec.patch_size:
            raise ModelInputError(
                f"{spec.name}: input_size {spec.input_size} is not a multiple of "
                f"patch_size {spec.patch_size}"
            )
        self.spec = spec
        width = spec.width
        num_tokens = (spec.input_size // spec.patch_size) ** 2
        self.patch_embed = PatchEmbed(spec.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, width))
        self.blocks = nn.Sequential(*[
            Block(width, spec.num_heads, spec.mlp_ratio, spec.qkv_bias, spec.layer_scale_init)
            for _ in range(spec.depth)
        ])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        # timm uses Identity when num_classes == 0; a Linear head projects (e.g. 1024 -> 768).
        self.head = nn.Linear(width, spec.embed_dim) if spec.embed_dim != width else nn.Identity()
        # Normalisation travels with the model; non-persistent so it is not in the state dict.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
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
        x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        size = self.spec.input_size
        if x.shape[-2] != size or x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
        # Normalise in float32, then match the weights (a half-precision model on a GPU).
        return ((x - self.mean) / self.std).to(self.patch_embed.proj.weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> token sequence after the final norm."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.preprocess(tiles))


def _vit(spec: PatchEncoderSpec) -> VisionTransformer:
    return VisionTransformer(spec)


def _register(spec: PatchEncoderSpec) -> None:
    register_patch_encoder(spec, convert=convert_timm_vit)(_vit)


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
# Pathology encoders: same trunks, their own normalisation, MPP and layer scale.
_register(PatchEncoderSpec(
    name="uni", embed_dim=1024, input_size=224, patch_size=16, width=1024, depth=24,
    num_heads=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, layer_scale_init=1e-5,
    source="MahmoodLab/UNI (gated; timm ViT-L/16 224 with layer scale, num_classes=0)",
))
_register(PatchEncoderSpec(
    name="conch_v1_5", embed_dim=768, input_size=448, patch_size=16, width=1024, depth=24,
    num_heads=16, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, mpp=0.5, layer_scale_init=1e-5,
    source="MahmoodLab/conchv1_5 shape (ViT-L/16 448 trunk, 768-d output); the official "
           "weights pool with an attention head, so they need their own converter",
    description="the patch encoder whose 768-d features CARE was trained on",
))
