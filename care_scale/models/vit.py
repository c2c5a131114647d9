"""Vision Transformer patch encoder in plain PyTorch, with timm's state-dict key names.

Keys match ``timm.models.vision_transformer.VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.ls1.gamma``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``,
``head``), so timm / UNI-style checkpoints load after :func:`convert_timm_vit` strips wrappers.
CONCH v1.5 (``pool="attn_pool"``) adds its attentional pooler and LayerNorm in place of the
head; :func:`convert_conch_v1_5` maps its published names (``trunk.``,
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
from care_scale.models.checkpoints import convert_conch_v1_5, convert_timm_vit
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


class VisionTransformer(nn.Module):
    """ViT returning the final-norm CLS token (through ``head`` when it projects), or, with
    ``spec.pool == "attn_pool"``, an attentional pooler over all tokens plus a LayerNorm."""

    def __init__(self, spec: PatchEncoderSpec):
        super().__init__()
        if spec.input_size % spec.patch_size:
            raise ModelInputError(
                f"{spec.name}: input_size {spec.input_size} is not a multiple of "
                f"patch_size {spec.patch_size}"
            )
        self.spec = spec
        width = spec.width
        self.patch_embed = PatchEmbed(spec.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.grid ** 2 + 1, width))
        self.blocks = nn.Sequential(*[
            Block(width, spec.num_heads, spec.mlp_ratio, spec.qkv_bias, spec.layer_scale_init)
            for _ in range(spec.depth)
        ])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        if spec.pool == "attn_pool":
            self.attn_pool = AttentionalPooler(spec.embed_dim, width, spec.pool_heads)
            self.pool_norm = nn.LayerNorm(spec.embed_dim)
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
            # Antialiased bilinear, as PIL's resize in the reference transforms (square
            # tiles: Resize(size) then CenterCrop(size) is this resize).
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > size)
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
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
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
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self.blocks(x + self.pos_embed_for(rows, cols)))

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        if self.spec.pool == "attn_pool":
            return self.pool_norm(self.attn_pool(tokens)[:, 0])
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
# Pathology encoders: same trunks, their own normalisation, MPP and layer scale.
_register(PatchEncoderSpec(
    name="uni", embed_dim=1024, input_size=224, patch_size=16, width=1024, depth=24,
    num_heads=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, layer_scale_init=1e-5,
    hf_repo="MahmoodLab/UNI", weight_files=("pytorch_model.bin",),
    source="MahmoodLab/UNI (gated; timm ViT-L/16 224 with layer scale, num_classes=0)",
))
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
