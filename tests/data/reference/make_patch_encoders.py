"""Make the parity fixtures of the published patch encoders (run once, by hand).

UNI, UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath (timm) and Phikon-v2 (transformers
``Dinov2Model``), each at unit-test size, built the way TRIDENT builds them. The construction
is read from TRIDENT's own ``trident/patch_encoder_models/load.py`` rather than copied: for
each encoder class the script takes, with ``ast``, the ``timm_kwargs`` dict and the timm model
name of its local-checkpoint branch, its ``eval_transform`` (``Compose``) and its ``forward``,
and evaluates them with only the sizes changed (width, depth, heads; 224 -> the micro input
side, 256 -> the micro resize side). Phikon-v2 is ``AutoModel.from_pretrained`` of a folder
that ``Dinov2Model.save_pretrained`` wrote, exactly as TRIDENT loads a local snapshot; its
position table is stored at a 6 x 6 grid and run at 4 x 4, so transformers' own bicubic
interpolation is in the reference output.

Needs timm, torchvision and transformers, which do not install beside the project's torch, so
it runs in a separate environment (the one make_conch_v1_5.py uses, plus transformers):

    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 \
        transformers safetensors
    /tmp/refenv/bin/python tests/data/reference/make_patch_encoders.py --trident /tmp/TRIDENT

Every parameter is random (norm and layer-scale weights near 1, the rest N(0, 0.1)), so a
wrong option shows in the output. Writes, per entry ``NAME`` (care-scale's ``NAME_micro``):
``NAME_micro.safetensors`` (the state dict as the published file names it),
``NAME_micro_io.safetensors`` (uint8 tiles, the reference transform's output, the reference
forward's output), ``phikon_v2_micro.config.json`` (the transformers config), and
``patch_encoders_micro.json`` (versions, what was evaluated for each, and the key names and
shapes of the published-size model, built on the meta device with TRIDENT's arguments).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_conch_v1_5 import tiles

LOAD_PY = "trident/patch_encoder_models/load.py"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
MICRO = {"embed_dim": 32, "depth": 2, "num_heads": 2}
#: care-scale entry -> (TRIDENT class, micro input side, tile side, micro resize side).
MODELS = {
    "uni": ("UNIInferenceEncoder", 64, 72, None),
    "uni2_h": ("UNIv2InferenceEncoder", 56, 64, None),
    "virchow2": ("Virchow2InferenceEncoder", 56, 64, None),
    "h_optimus_0": ("HOptimus0InferenceEncoder", 56, 64, None),
    "gigapath": ("GigaPathInferenceEncoder", 64, 80, 72),
    "phikon_v2": ("Phikonv2InferenceEncoder", 64, 72, None),
}


class Resize(ast.NodeTransformer):
    """224 -> the micro input side, 256 -> the micro resize side (integer literals only)."""

    def __init__(self, size: int, resize: int | None):
        self.map = {224: size, 256: resize or size}

    def visit_Constant(self, node):
        if type(node.value) is int and node.value in self.map:
            return ast.copy_location(ast.Constant(self.map[node.value]), node)
        return node


def trident_class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name),
                None)


def first_assign(fn: ast.FunctionDef, target: str, kind=ast.AST) -> ast.expr:
    for node in ast.walk(fn):
        if (isinstance(node, ast.Assign) and isinstance(node.value, kind)
                and any(isinstance(t, ast.Name) and t.id == target for t in node.targets)):
            return node.value
    raise LookupError(f"no assignment to {target} in {fn.name}")


def timm_model_name(fn: ast.FunctionDef) -> str:
    """The model name of the first ``timm.create_model`` call that is not an hf-hub id."""
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "timm.create_model"):
            continue
        args = [a for a in node.args if isinstance(a, ast.Constant)]
        args += [k.value for k in node.keywords if k.arg == "model_name"]
        if args and not str(args[0].value).startswith("hf"):
            return str(args[0].value)
    raise LookupError(f"no local timm.create_model in {fn.name}")


def randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight",
                              "gamma", "lambda1")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


def saved_names(memory: dict, saved: dict):
    """In-memory key -> the key ``save_pretrained`` wrote for it, found by value (every
    tensor is random, so unique), generalised over the block number."""
    pattern = {}
    for key, value in memory.items():
        (match,) = [k for k, t in saved.items() if t.shape == value.shape
                    and torch.equal(t, value)]
        pattern[re.sub(r"\.\d+\.", ".{i}.", key)] = re.sub(r"\.\d+\.", ".{i}.", match)

    def rename(key: str) -> str:
        index = re.search(r"\.(\d+)\.", key)
        new = pattern[re.sub(r"\.\d+\.", ".{i}.", key)]
        return new.replace("{i}", index.group(1)) if index else new
    return rename


def shapes(state: dict) -> dict:
    """Key -> shape for the keys outside the blocks and those of block 0, plus the depth."""
    keep = {k: list(v.shape) for k, v in state.items()
            if not any(f"{sep}{i}." in k for sep in ("blocks.", "layer.") for i in range(1, 64))}
    depth = 1 + max(int(k.split(".")[1 if k.startswith("blocks.") else 2])
                    for k in state if k.startswith(("blocks.", "encoder.layer.")))
    return {"depth": depth, "keys": keep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trident", type=Path, required=True, help="a TRIDENT checkout")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    import timm
    import torchvision
    import transformers
    from torchvision import transforms
    from transformers import AutoModel, Dinov2Config, Dinov2Model

    tree = ast.parse((args.trident / LOAD_PY).read_text())
    commit = subprocess.run(["git", "-C", str(args.trident), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    record = {"reference": f"mahmoodlab/TRIDENT@{commit}:{LOAD_PY}",
              "torch": torch.__version__, "timm": timm.__version__,
              "torchvision": torchvision.__version__, "transformers": transformers.__version__,
              "python": sys.version.split()[0], "micro": MICRO, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, (entry, (cls_name, size, tile, resize)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        cls = trident_class(tree, cls_name)
        build = method(cls, "_build")
        ns = {"timm": timm, "torch": torch, "torchvision": torchvision,
              "transforms": transforms, "T": transforms, "img_size": size,
              "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "IMAGENET_MEAN": IMAGENET_MEAN,
              "IMAGENET_STD": IMAGENET_STD}
        info = {"trident_class": cls_name, "input": size, "tile": tile}
        if entry == "phikon_v2":
            config = Dinov2Config(hidden_size=MICRO["embed_dim"],
                                  num_hidden_layers=MICRO["depth"],
                                  num_attention_heads=MICRO["num_heads"], patch_size=16,
                                  image_size=96, layerscale_value=1.0)
            snap = Path(tempfile.mkdtemp())
            seeded = Dinov2Model(config)
            randomise(seeded)
            seeded.save_pretrained(snap)
            model = AutoModel.from_pretrained(snap)  # TRIDENT: AutoModel.from_pretrained(dir)
            state_bytes = (snap / "model.safetensors").read_bytes()
            (args.out / f"{entry}_micro.safetensors").write_bytes(state_bytes)
            (args.out / f"{entry}_micro.config.json").write_text(
                (snap / "config.json").read_text())
            info["transformers_config"] = {"image_size": 96, "patch_size": 16}
            with torch.device("meta"):  # phikon-v2's config.json values (not checked here)
                full = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24,
                                                num_attention_heads=16, patch_size=16,
                                                image_size=224, layerscale_value=1.0))
            # Names as save_pretrained writes them (transformers 5 renames some in memory).
            names = saved_names(seeded.state_dict(), load_file(str(snap / "model.safetensors")))
            info["published_shapes"] = shapes({names(k): v for k, v in
                                               full.state_dict().items()})
        else:
            kwargs = eval(compile(ast.Expression(first_assign(build, "timm_kwargs", ast.Dict)),
                                  LOAD_PY, "eval"), ns)
            name = timm_model_name(build)
            with torch.device("meta"):  # the published size: key names and shapes only
                full = timm.create_model(name, pretrained=False,
                                         **{**kwargs, "img_size": 224})
            info["published_shapes"] = shapes(full.state_dict())
            kwargs.update(MICRO)
            model = timm.create_model(name, pretrained=False, **kwargs)
            randomise(model)
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            model.load_state_dict(state, strict=True)  # as TRIDENT loads pytorch_model.bin
            save_file(state, str(args.out / f"{entry}_micro.safetensors"))
            info.update(timm_model=name, timm_kwargs={k: repr(v) for k, v in kwargs.items()})
        model.eval()
        compose = first_assign(build, "eval_transform", ast.Call)
        compose = ast.fix_missing_locations(Resize(size, resize).visit(compose))
        transform = eval(compile(ast.Expression(compose), LOAD_PY, "eval"), ns)
        forward_def = method(cls, "forward")
        if forward_def is None:
            def forward(self, x):  # BasePatchEncoder.forward
                return self.model(x)
        else:
            forward_ns: dict = {"torch": torch}
            # TRIDENT's own forward, from the checkout given on the command line.
            exec(compile(ast.Module([forward_def], []), LOAD_PY, "exec"), forward_ns)  # noqa: S102
            forward = forward_ns["forward"]
        wrapper = types.SimpleNamespace(model=model, return_cls=False)
        imgs = tiles(2, tile, seed=10 + seed)
        x = torch.stack([transform(Image.fromarray(im)) for im in imgs])
        with torch.no_grad():
            y = forward(wrapper, x)
        save_file({"tiles": torch.from_numpy(imgs), "normalized": x.contiguous(),
                   "expected": y.contiguous()}, str(args.out / f"{entry}_micro_io.safetensors"))
        info.update(transform=repr(transform), forward=ast.unparse(forward_def)
                    if forward_def else "self.model(x)", output_shape=list(y.shape))
        record["models"][entry] = info
        print(entry, tuple(x.shape), "->", tuple(y.shape))
    (args.out / "patch_encoders_micro.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
