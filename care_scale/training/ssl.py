"""Stage I: iBOT-style self-distillation of the CARE slide encoder on patch-feature views.

Student and teacher are the same architecture (CARE encoder + two projection heads); the
teacher is an exponential moving average of the student and gets no gradients. Views are
iBOT's multi-crop, on the feature grid of one sub-WSI: two global crops (``global_crop_scale``
of the sub-WSI's extent) that teacher and student both see, the student's with a share of
its tokens masked, and ``local_crops`` small crops the student alone sees; every view gets the
feature-space augmentation (patch noise, dropout, one offset per view).

- slide-level distillation: the student's slide embedding of every view predicts the
  teacher's (centred, sharpened) distribution of each *other* global view (DINO);
- masked patch-token prediction: student patch tokens at masked positions (features replaced
  by a learned mask token) predict the teacher's tokens of the same, unmasked view (iBOT);
- plus lambda_RSL * L_RSL of the student's CareOutput.

No other prior: the teacher sees exactly the student's global views (unmasked), as in iBOT.

Collapse is watched through the std across the batch of L2-normalised slide embeddings.
"""

from __future__ import annotations

import copy
import dataclasses
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
        view = ViewParams(crop_scale=tuple(cfg.ssl.global_crop_scale),
                          feature_noise=cfg.ssl.feature_noise,
                          feature_dropout=cfg.ssl.feature_dropout,
                          global_shift=cfg.ssl.global_shift,
                          shift_basis=shift_directions(slides, cfg.ssl.shift_rank))
        self.view = view
        self.local_view = dataclasses.replace(view, crop_scale=tuple(cfg.ssl.local_crop_scale))
        encoder = create_slide_encoder(cfg.model.name, cfg.model.checkpoint,
                                       storage_options=cfg.data.storage_options or None,
                                       init_seed=cfg.model.init_seed, **cfg.model.overrides)
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
        from care_scale.training.optim import param_groups

        return param_groups(self.student.named_parameters(),
                            region_lr_scale=self.cfg.optim.region_lr_scale)

    def phase_of(self, step: int) -> tuple[int, int, int]:
        return 0, 0, self.cfg.optim.steps  # one phase: (index, start, length)

    def _batch(self, step: int, micro: int):
        """The teacher's batch (the two global views of every item, 2B rows), the student's
        (those views again, then the local views: (2 + L) B rows, padded to one length) and
        the student's token mask (global rows only)."""
        rng = self.sampler.rng(step, micro)
        items = [self.items[i] for i in self.sampler.indices(step, micro)]
        glob = [make_view(it, rng, self.view, self.scale) for _ in range(2) for it in items]
        local = [make_view(it, rng, self.local_view, self.scale)
                 for _ in range(self.cfg.ssl.local_crops) for it in items]
        teacher, student = collate(glob), collate(glob + local)
        mask = random_token_mask(student["num_valid"].numpy(), student["features"].shape[1],
                                 tuple(self.cfg.ssl.mask_ratio), rng)
        mask[len(glob):] = False  # local views are never masked (iBOT)
        to = self.device
        return ({k: v.to(to) for k, v in teacher.items()},
                {k: v.to(to) for k, v in student.items()}, torch.from_numpy(mask).to(to))

    def teacher_temp(self, step: int) -> float:
        c = self.cfg.ssl
        w = self.cfg.optim.warmup_steps
        if step >= w:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / max(w, 1)

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.ssl
        teacher, student, mask = self._batch(step, micro)
        bsz = len(teacher["num_valid"]) // 2
        t_temp = self.teacher_temp(step)
        # One forward each (DDP wants one student forward per backward); rows are views.
        with torch.no_grad():
            t_slide, t_patch, _ = self.teacher(teacher)
        s_slide, s_patch, s_out = self.model(student, mask)
        n_views = len(s_slide) // bsz
        # slide-level distillation: every student view against each *other* global teacher view
        t_probs = F.softmax((t_slide - self.center) / t_temp, -1).reshape(2, bsz, -1)
        s_logp = F.log_softmax(s_slide / c.student_temp, -1).reshape(n_views, bsz, -1)
        terms = [(-(t_probs[i] * s_logp[j]).sum(-1)).mean()
                 for i in range(2) for j in range(n_views) if j != i]
        slide_loss = torch.stack(terms).mean()
        # masked patch-token prediction on the global views: the student's masked tokens
        # against the teacher's tokens of the same view (same positions, same padding)
        n_t = t_patch.shape[1]
        sel = mask[:2 * bsz, :n_t] & _valid_mask(teacher["num_valid"], n_t)
        if sel.any():
            tp = F.softmax((t_patch[sel] - self.patch_center) / t_temp, -1)
            sp = F.log_softmax(s_patch[:2 * bsz, :n_t][sel] / c.student_temp, -1)
            patch_loss = (-(tp * sp).sum(-1)).mean()
        else:
            patch_loss = slide_loss * 0
        rsl = s_out.rsl_loss
        total = c.loss_weight_slide * slide_loss + c.loss_weight_patch * patch_loss \
            + self.lambda_rsl * rsl
        self._update_centers(t_slide, t_patch, teacher)
        emb = F.normalize(s_out.slide_embedding[:2 * bsz].detach().float(), dim=-1)
        emb_std = float(emb.std(0).mean())
        self._watch_collapse(step, emb_std)
        return total, {"loss_slide": float(slide_loss), "loss_patch": float(patch_loss),
                       "loss_rsl": float(rsl), "emb_std": emb_std, "teacher_temp": t_temp,
                       "expected_rank": float(s_out.expected_rank.detach().float().mean())}

    @torch.no_grad()
    def _update_centers(self, t_slide: torch.Tensor, t_patch: torch.Tensor,
                        batch: dict[str, torch.Tensor]) -> None:
        import torch.distributed as dist

        c = self.cfg.ssl
        slide_mean = t_slide.mean(0)
        valid = _valid_mask(batch["num_valid"], t_patch.shape[1])
        patch_sum, patch_count = t_patch[valid].sum(0), valid.sum().float()
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
