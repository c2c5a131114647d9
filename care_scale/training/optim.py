"""Optimizer parameter groups shared by both stages (weight decay and learning-rate scales).

Weights get weight decay; biases, norms and other 1-d parameters do not (as in DINO / iBOT /
CLIP). CARE's region-construction scalars, the log inclusion width ``log_sigma`` and the log
semantic temperature ``log_tau``, get their own group with ``optim.region_lr_scale``: they are
two numbers in log space that set how far a patch may move from its window, and at the lr of
the weights (~1e-4 per step for Adam) they would move by a few hundredths in a whole run, which
is why the region structuring loss stayed flat before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

REGION_SCALARS = ("log_sigma", "log_tau")


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], *, lr_scale: float = 1.0,
                 region_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """decay / no-decay / region-scalar groups of ``named`` (trainable ones only); the loop
    multiplies each group's ``lr_scale`` into the scheduled lr."""
    decay, no_decay, region = [], [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in REGION_SCALARS:
            region.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr_scale": lr_scale},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
              {"params": region, "weight_decay": 0.0, "lr_scale": lr_scale * region_lr_scale}]
    return [g for g in groups if g["params"]]
