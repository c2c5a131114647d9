"""Stage I: iBOT-style self-distillation of the CARE slide encoder on patch-feature views.

Student and teacher are the same architecture (CARE encoder + two projection heads); the
teacher is an exponential moving average of the student and gets no gradients. Per sub-WSI
two global views are made (crops of the feature grid + feature-space augmentation).

- slide-level distillation: the student's slide embedding of one view predicts the teacher's
  (centred, sharpened) distribution of the other view (DINO);
- masked patch-token prediction: student patch tokens at masked positions (features replaced
  by a learned mask token) predict the teacher's tokens of the unmasked view (iBOT);
- plus lambda_RSL * L_RSL of the student's CareOutput.

Collapse is watched through the std across the batch of L2-normalised slide embeddings.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from care_scale.training.config import Stage1Config
from care_scale.training.data import (
    SlideFeatures,
    StepSampler,
    ViewParams,
    collate,
    feature_scale,
    make_view,
    shift_directions,
    split_sub_wsis,
)

log = logging.getLogger(__name__)


class CollapseWarning(UserWarning):
    """Slide embeddings of a batch have (nearly) collapsed to one point."""


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO/iBOT head)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        # Prototypes of unit norm (DINO's norm_last_layer): logits are cosines in [-1, 1],
        # so the temperatures alone set how sharp the distributions are.
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) / bottleneck**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


class SSLModel(nn.Module):
    """CARE encoder + slide head + patch head (one of student / teacher)."""

    def __init__(self, encoder: nn.Module, cfg: Stage1Config):
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_dim)
        self.slide_head = DINOHead(hidden, cfg.ssl.out_dim, cfg.ssl.head_hidden)
        self.patch_head = DINOHead(hidden, cfg.ssl.patch_out_dim, cfg.ssl.head_hidden)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None):
        # Masked views go without the "augmented" features: those would show the ARG the
        # very patches the student is asked to predict.
        aug = batch["augmented"] if mask is None else None
        out = self.encoder(batch["features"], batch["num_valid"], batch["grid"],
                           augmented=aug, token_mask=mask)
        return self.slide_head(out.slide_embedding), self.patch_head(out.patch_tokens), out


def _valid_mask(num_valid: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=num_valid.device)[None] < num_valid[:, None]


def random_token_mask(num_valid: np.ndarray, n: int, ratio: tuple[float, float],
                      rng: np.random.Generator) -> np.ndarray:
    """(B, n) bool: a random share in ``ratio`` of each view's valid tokens is masked."""
    mask = np.zeros((len(num_valid), n), bool)
    for i, k in enumerate(num_valid):
        r = rng.uniform(*ratio)
        m = round(r * int(k))
        if m > 0:
            mask[i, rng.choice(int(k), m, replace=False)] = True
    return mask


def cosine_momentum(step: int, total: int, base: float) -> float:
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total, 1)) + 1) / 2


class SSLTask:
    """Everything stage I needs on one worker: data, student/teacher, loss, EMA."""

    stage = "stage1"

    def __init__(self, cfg: Stage1Config, *, rank: int, world: int, device: torch.device,
                 slides: list[SlideFeatures] | None = None):
        from care_scale.models import create_slide_encoder
        from care_scale.training.data import load_slides_for

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        if slides is None:
            slides = load_slides_for(cfg, train_only=True)
        subs = [s for sl in slides for s in split_sub_wsis(
            sl, max_patches=cfg.ssl.max_patches, eps=cfg.ssl.dbscan_eps)]
        self.items = subs
        self.scale = feature_scale(subs)
        self.sampler = StepSampler(len(subs), batch_size=cfg.optim.batch_size, world_size=world,
                                   rank=rank, seed=cfg.run.seed, accum=cfg.optim.grad_accum_steps)
        self.view = ViewParams(crop_scale=tuple(cfg.ssl.global_crop_scale),
                               feature_noise=cfg.ssl.feature_noise,
                               feature_dropout=cfg.ssl.feature_dropout,
                               global_shift=cfg.ssl.global_shift,
                               shift_basis=shift_directions(slides, cfg.ssl.shift_rank),
                               teacher_view=True)
        encoder = create_slide_encoder(cfg.model.name, cfg.model.checkpoint,
                                       storage_options=cfg.data.storage_options or None,
                                       **cfg.model.overrides)
        self.lambda_rsl = (cfg.ssl.lambda_rsl if cfg.ssl.lambda_rsl is not None
                           else float(encoder.config.lambda_rsl))
        self.student = SSLModel(encoder, cfg).to(device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.center = torch.zeros(cfg.ssl.out_dim, device=device)
        self.patch_center = torch.zeros(cfg.ssl.patch_out_dim, device=device)
        self.model: nn.Module = self.student  # replaced by the DDP wrapper
        self._warned = False
        log.info("stage I: %d slides -> %d sub-WSIs (<= %d patches)", len(slides), len(subs),
                 cfg.ssl.max_patches)

    # -- interface used by the loop
    @property
    def trainable(self) -> nn.Module:
        return self.student

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
        return [{"params": decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]

    def phase_of(self, step: int) -> tuple[int, int, int]:
        return 0, 0, self.cfg.optim.steps  # one phase: (index, start, length)

    def _batch(self, step: int, micro: int):
        rng = self.sampler.rng(step, micro)
        idx = self.sampler.indices(step, micro)
        views = [[make_view(self.items[i], rng, self.view, self.scale) for i in idx]
                 for _ in range(2)]
        batches = [collate(v) for v in views]
        masks = [random_token_mask(b["num_valid"].numpy(), b["features"].shape[1],
                                   tuple(self.cfg.ssl.mask_ratio), rng) for b in batches]
        to = self.device
        batches = [{k: v.to(to) for k, v in b.items()} for b in batches]
        return batches, [torch.from_numpy(m).to(to) for m in masks]

    def teacher_temp(self, step: int) -> float:
        c = self.cfg.ssl
        w = self.cfg.optim.warmup_steps
        if step >= w:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / max(w, 1)

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.ssl
        batches, masks = self._batch(step, micro)
        t_temp = self.teacher_temp(step)
        with torch.no_grad():
            t_out = [self.teacher({**b, "features": b["teacher_features"],
                                   "augmented": b["teacher_features"]}) for b in batches]
        s_out = [self.model(b, m) for b, m in zip(batches, masks)]
        # slide-level distillation across views
        t_probs = [F.softmax((t[0] - self.center) / t_temp, -1) for t in t_out]
        slide_loss = 0.0
        pairs = 0
        for i in range(2):
            for j in range(2):
                if i == j:
                    continue
                s_logp = F.log_softmax(s_out[j][0] / c.student_temp, -1)
                slide_loss = slide_loss + (-(t_probs[i] * s_logp).sum(-1)).mean()
                pairs += 1
        slide_loss = slide_loss / pairs
        # masked patch-token prediction, view by view
        patch_terms = []
        for b, m, t, s in zip(batches, masks, t_out, s_out):
            sel = m & _valid_mask(b["num_valid"], m.shape[1])
            if sel.any():
                tp = F.softmax((t[1][sel] - self.patch_center) / t_temp, -1)
                sp = F.log_softmax(s[1][sel] / c.student_temp, -1)
                patch_terms.append((-(tp * sp).sum(-1)).mean())
        patch_loss = torch.stack(patch_terms).mean() if patch_terms else slide_loss * 0
        rsl = torch.stack([s[2].rsl_loss for s in s_out]).mean()
        total = c.loss_weight_slide * slide_loss + c.loss_weight_patch * patch_loss \
            + self.lambda_rsl * rsl
        self._update_centers(t_out, batches)
        emb = torch.cat([F.normalize(s[2].slide_embedding.detach().float(), dim=-1)
                         for s in s_out])
        emb_std = float(emb.std(0).mean())
        self._watch_collapse(step, emb_std)
        return total, {"loss_slide": float(slide_loss), "loss_patch": float(patch_loss),
                       "loss_rsl": float(rsl), "emb_std": emb_std, "teacher_temp": t_temp}

    @torch.no_grad()
    def _update_centers(self, t_out, batches) -> None:
        import torch.distributed as dist

        c = self.cfg.ssl
        slide_mean = torch.cat([t[0] for t in t_out]).mean(0)
        sums = []
        counts = []
        for b, t in zip(batches, t_out):
            valid = _valid_mask(b["num_valid"], t[1].shape[1])
            sums.append(t[1][valid].sum(0))
            counts.append(valid.sum())
        patch_sum, patch_count = torch.stack(sums).sum(0), torch.stack(counts).sum().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(slide_mean)
            slide_mean /= dist.get_world_size()
            dist.all_reduce(patch_sum)
            dist.all_reduce(patch_count)
        m = c.center_momentum
        self.center.mul_(m).add_(slide_mean, alpha=1 - m)
        self.patch_center.mul_(m).add_(patch_sum / patch_count.clamp(min=1), alpha=1 - m)

    def _watch_collapse(self, step: int, emb_std: float) -> None:
        if emb_std < self.cfg.ssl.collapse_std and not self._warned:
            self._warned = True
            msg = (f"step {step}: slide embeddings collapsed (std across the batch "
                   f"{emb_std:.2e} < {self.cfg.ssl.collapse_std:.0e}); lower the lr or raise "
                   "ssl.teacher_temp / center_momentum")
            log.warning(msg)
            warnings.warn(msg, CollapseWarning, stacklevel=2)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = cosine_momentum(step, self.cfg.optim.steps, self.cfg.ssl.teacher_momentum)
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        state["center"] = self.center
        state["patch_center"] = self.patch_center
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items()
                                      if k.startswith("teacher.")})
        self.center.copy_(state["center"])
        self.patch_center.copy_(state["patch_center"])

    def final_encoder(self) -> nn.Module:
        """The teacher's encoder: the EMA weights are the better encoder (DINO/iBOT)."""
        return self.teacher.encoder

    def final_extras(self) -> dict[str, torch.Tensor]:
        return {}
