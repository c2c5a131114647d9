"""Make tests/data/care_forward.npz: inputs, weights and every CareOutput field of small CARE
models, from the implementation of ``CARE.forward`` at the time it is run.

Written before ``CARE.forward`` was split into step methods (issue 18, point 6); the fixture
it wrote then is what ``tests/test_care_steps.py`` compares the split forward with, bit for
bit. Rerun it only when the outputs are meant to change:

    python tests/data/make_care_forward_fixture.py [OUT.npz]

Layout of the .npz: for each case ``c`` (see ``CASES``), ``c/in/<name>`` the forward inputs,
``c/w/<param>`` the state dict, ``c/out/<field>`` the outputs; ``c/config`` the CareConfig
as JSON. Forward runs in eval mode on the CPU with one thread (reduction order fixed).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from care_scale.models.care import CARE, CARE_OUTPUT_FIELDS, CareConfig

OUT = Path(__file__).with_name("care_forward.npz")

SMALL = {"in_dim": 12, "hidden_dim": 16, "num_heads": 2, "subregion_size": 4,
         "subregion_depth": 1, "region_depth": 1, "mlp_ratio": 2.0}
CONFIGS = {
    "k4": CareConfig(**SMALL),
    "k2": CareConfig(**{**SMALL, "subregion_size": 2}, num_candidates=2, candidate_radius=1,
                     lambda_spf=0.3, e_star=0.2),
}
# case name -> (config name, use augmented, use token_mask)
CASES = {
    "k4_plain": ("k4", False, False),
    "k4_aug": ("k4", True, False),
    "k4_mask": ("k4", False, True),
    "k2_aug_mask": ("k2", True, True),
}
SIZES = (53, 31)  # patches of slide 0 and 1 (batch padded to the larger)


def irregular_grid(rng: np.random.Generator, n: int, side: int, origin: tuple[int, int]):
    """n distinct positions drawn from a side x side square with holes, shifted to origin."""
    cells = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    pick = rng.choice(len(cells), size=n, replace=False)
    return cells[pick] + np.asarray(origin)


def make_inputs(seed: int, in_dim: int, augmented: bool, token_mask: bool) -> dict:
    rng = np.random.default_rng(seed)
    n = max(SIZES)
    feats = np.zeros((2, n, in_dim), np.float32)
    grid = np.zeros((2, n, 2), np.int64)
    aug = np.zeros_like(feats)
    for b, (size, side, origin) in enumerate(zip(SIZES, (11, 7), ((3, 5), (40, 2)))):
        feats[b, :size] = rng.normal(size=(size, in_dim))
        aug[b, :size] = feats[b, :size] + 0.3 * rng.normal(size=(size, in_dim))
        grid[b, :size] = irregular_grid(rng, size, side, origin)
    inputs = {"features": feats, "num_valid": np.asarray(SIZES, np.int64), "grid": grid}
    if augmented:
        inputs["augmented"] = aug
    if token_mask:
        inputs["token_mask"] = rng.random((2, n)) < 0.25
    return inputs


def build(config: CareConfig, seed: int) -> CARE:
    torch.manual_seed(seed)
    return CARE(config).eval()


def run_forward(model: CARE, inputs: dict):
    """The model's forward on numpy inputs, one CPU thread, no grad."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(t["features"], t["num_valid"], t["grid"],
                         augmented=t.get("augmented"), token_mask=t.get("token_mask"))
    finally:
        torch.set_num_threads(threads)


def make() -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for i, (case, (cname, aug, mask)) in enumerate(CASES.items()):
        cfg = CONFIGS[cname]
        model = build(cfg, seed=100 + i)
        inputs = make_inputs(seed=i, in_dim=cfg.in_dim, augmented=aug, token_mask=mask)
        out = run_forward(model, inputs)
        arrays[f"{case}/config"] = np.asarray(json.dumps(dataclasses.asdict(cfg)))
        arrays.update({f"{case}/in/{k}": v for k, v in inputs.items()})
        arrays.update({f"{case}/w/{k}": v.numpy() for k, v in model.state_dict().items()})
        arrays.update({f"{case}/out/{f}": getattr(out, f).numpy() for f in CARE_OUTPUT_FIELDS})
    return arrays


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    np.savez_compressed(out, **make())
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
