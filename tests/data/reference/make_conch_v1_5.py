"""Make the CONCH v1.5 parity fixtures from the reference implementation (run once, by hand).

The reference is TRIDENT's ``trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py``
(the code the CONCH v1.5 weights are published for). It needs timm, einops, einops_exts and
torchvision, which break beside the project's torch, so this runs in a separate environment:

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm einops einops_exts \
        safetensors
    git clone https://github.com/mahmoodlab/TRIDENT /tmp/TRIDENT
    /tmp/refenv/bin/python tests/data/reference/make_conch_v1_5.py --trident /tmp/TRIDENT

It builds the reference's own modules (``VisionTransformer`` with layer scale,
``AttentionalPooler``, a LayerNorm, wired as ``CONCHVisionTower``) at test size, the size of
care-scale's ``conch_v1_5_micro`` entry: trunk at 64 px (4 x 4 position table) run at 128 px,
pooler 48 wide with 8 heads. Every parameter is random (LayerNorm and layer-scale weights
included, so a wrong one shows). The published state dict is saved with a 6 x 6 position
table, so both of the reference's resamplings run (bilinear at load, bicubic per input).
Outputs: ``conch_v1_5_micro.safetensors`` (state dict, published key names) and
``conch_v1_5_micro_io.safetensors`` (uint8 tiles at 160 px, the reference transform's
normalised input, the reference output), plus ``conch_v1_5_micro.json`` (versions).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REF_FILE = "trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_reference(trident: Path):
    spec = importlib.util.spec_from_file_location("conchv1_5_ref", trident / REF_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiles(n: int, side: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus noise: resizing them is neither trivial nor pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        f = rng.uniform(2, 9, size=3)
        base = np.stack([np.sin(f[c] * xx + 3 * yy * c) for c in range(3)], -1)
        img = 128 + 90 * base + rng.normal(0, 20, size=(side, side, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trident", type=Path, required=True, help="a TRIDENT checkout")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    ref = load_reference(args.trident)
    import timm
    import torchvision
    import torchvision.transforms as T

    torch.manual_seed(0)
    tower = torch.nn.Module()
    tower.trunk = ref.VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2,
                                        num_heads=4, mlp_ratio=4, qkv_bias=True,
                                        init_values=1.0)
    tower.attn_pool_contrast = ref.AttentionalPooler(d_model=48, context_dim=64, n_head=8,
                                                     n_queries=1)
    tower.ln_contrast = torch.nn.LayerNorm(48)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln_k.weight",
                              "ln_q.weight", "ln_contrast.weight", "gamma")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}
    # As published at another grid: the reference loader resamples it to its trunk's grid.
    state["trunk.pos_embed"] = 0.1 * torch.randn(1, 1 + 6 * 6, 64)

    loaded = dict(state)
    loaded["trunk.pos_embed"] = ref.resize_pos_embed(tower.trunk, state["trunk.pos_embed"],
                                                     verbose=False)
    tower.load_state_dict(loaded, strict=True)
    tower.eval()

    imgs = tiles(3, 160, seed=1)
    transform = T.Compose([T.Resize(128, interpolation=T.InterpolationMode.BILINEAR),
                           T.CenterCrop(128), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = torch.stack([transform(Image.fromarray(im)) for im in imgs])
    with torch.no_grad():
        y = ref.CONCHVisionTower.forward(tower, x)

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out / "conch_v1_5_micro.safetensors"))
    save_file({"tiles": torch.from_numpy(imgs), "normalized": x.contiguous(),
               "expected": y.contiguous()}, str(args.out / "conch_v1_5_micro_io.safetensors"))
    commit = subprocess.run(["git", "-C", str(args.trident), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (args.out / "conch_v1_5_micro.json").write_text(json.dumps({
        "reference": f"mahmoodlab/TRIDENT@{commit}:{REF_FILE}",
        "torch": torch.__version__, "timm": timm.__version__,
        "torchvision": torchvision.__version__, "python": sys.version.split()[0],
        "trunk": "ViT img 64 patch 16 width 64 depth 2 heads 4 layer scale, run at 128",
        "pooler": "d_model 48, context 64, 8 heads, 1 query; ln_contrast 48",
        "published_pos_embed_grid": 6, "tile_px": 160, "output_shape": list(y.shape),
    }, indent=2) + "\n")
    print("wrote", args.out, tuple(y.shape))


if __name__ == "__main__":
    main()
