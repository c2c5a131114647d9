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
- region-level loss (``ssl.region_loss``, off by default): see "Region-level loss" below;
- plus lambda_RSL * L_RSL of the student's CareOutput.

No other prior: the teacher sees exactly the student's global views (unmasked), as in iBOT.

Region-level loss. CARE's slide embedding is a weighted sum of region embeddings, yet the
two losses above train only the slide embedding (whose easiest cross-view invariant is the
slide's stain offset) and single patch tokens; nothing asks a *region* to say what it holds.
The global views are crops of one patch grid and every view knows its patches' positions in
the item (``index``), so regions can be matched across views patch by patch: for each patch
seen by a student view and by the other global teacher view, the student's embedding of the
region holding it predicts the teacher's embedding of the region holding it (regions differ
between views: windows are anchored at each crop's corner). Weighting by shared patches is
weighting by overlap. ``"dino"``: DINO cross-entropy on a region head (centred, sharpened
teacher); ``"contrast"``: InfoNCE whose candidates are all regions of that teacher view, i.e.
regions of the same slide that share its stain offset, so only their content separates them;
``"bow"``: ``"dino"`` plus an OBoW-style slide target: the region head reads each student
view's slide embedding (a weighted sum of region embeddings, so in their space) as a
distribution over region words, which predicts the other teacher view's bag of region words.
None of them is on by default: on the arrangement cohort none lifted the slide probe
(README, "Does pretraining learn?").

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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (what the prototypes score)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.embed(x), F.normalize(self.prototypes, dim=-1))


class SSLModel(nn.Module):
    """CARE encoder + slide head + patch head (+ region head) (one of student / teacher)."""

    def __init__(self, encoder: nn.Module, cfg: Stage1Config):
        super().__init__()
        self.encoder = encoder
        self.region_loss = cfg.ssl.region_loss
        hidden = int(encoder.config.hidden_dim)
        self.slide_head = DINOHead(hidden, cfg.ssl.out_dim, cfg.ssl.head_hidden)
        self.patch_head = DINOHead(hidden, cfg.ssl.patch_out_dim, cfg.ssl.head_hidden)
        self.region_head = (DINOHead(hidden, cfg.ssl.region_out_dim, cfg.ssl.head_hidden)
                            if self.region_loss != "none" else None)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None):
        """(slide logits (B, K), patch logits (B, N, K), region outputs (B, R, .) or None,
        CareOutput). Region outputs: (per region (B, R, .), slide (B, K) or None): prototype
        logits ("dino", "bow"; the slide's only for "bow") or the normalised bottleneck
        ("contrast"); computed here, inside forward, so DDP sees the head's parameters used."""
        # Masked views go without the "augmented" features: those would show the ARG the
        # very patches the student is asked to predict.
        aug = batch["augmented"] if mask is None else None
        out = self.encoder(batch["features"], batch["num_valid"], batch["grid"],
                           augmented=aug, token_mask=mask)
        region = bow = None
        if self.region_head is not None:
            head = self.region_head
            region = (head.embed if self.region_loss == "contrast" else head)(
                out.region_embeddings)
            if self.region_loss == "bow":
                # the slide embedding lives in the regions' space (their weighted sum): the
                # same head reads it as a distribution over region words
                bow = head(out.slide_embedding)
        return self.slide_head(out.slide_embedding), self.patch_head(out.patch_tokens), \
            (region, bow), out


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


def block_token_mask(grid: np.ndarray, num_valid: np.ndarray, ratio: tuple[float, float],
                     rng: np.random.Generator) -> np.ndarray:
    """(B, n) bool: iBOT's blockwise masking on the patch grid: square blocks (side 2-4
    grid steps) around random tokens until a share in ``ratio`` of each view is masked."""
    b, n = grid.shape[:2]
    mask = np.zeros((b, n), bool)
    for i, k in enumerate(num_valid):
        k = int(k)
        target = round(rng.uniform(*ratio) * k)
        g = grid[i, :k]
        for _ in range(4 * k):  # bounded: each try masks at least its centre once it is free
            if mask[i, :k].sum() >= target:
                break
            c = g[rng.integers(k)]
            lo = c - rng.integers(0, 2, 2)
            side = rng.integers(2, 5, 2)
            block = np.all((g >= lo) & (g < lo + side), axis=1)
            room = target - mask[i, :k].sum()
            new = np.nonzero(block & ~mask[i, :k])[0][:room]
            mask[i, new] = True
    return mask


def shared_patches(s_index: torch.Tensor, t_index: torch.Tensor,
                   pairs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Patches two views have in common, for each (student row, teacher row) pair.

    ``s_index`` (Bs, Ns) / ``t_index`` (Bt, Nt): each token's patch index in its item, -1 on
    padding; ``pairs`` (P, 2) long: rows of views of the same item. Returns flat (row_s, pos_s,
    row_t, pos_t): patch ``s_index[row_s, pos_s] == t_index[row_t, pos_t]``, one entry per
    shared patch of every pair.
    """
    n_items = int(max(s_index.max(), t_index.max())) + 2
    # lut[row_t, patch] = position of that patch in teacher view row_t (-1: not in the view);
    # padding (-1) is written to the spare last column.
    lut = torch.full((t_index.shape[0], n_items), -1, dtype=torch.long, device=t_index.device)
    pos = torch.arange(t_index.shape[1], device=t_index.device).expand_as(t_index)
    lut.scatter_(1, torch.where(t_index >= 0, t_index, n_items - 1), pos)
    lut[:, -1] = -1
    rs, rt = pairs[:, 0], pairs[:, 1]
    idx = s_index[rs]  # (P, Ns)
    pos_t = torch.gather(lut[rt], 1, idx.clamp_min(0))
    hit = (idx >= 0) & (pos_t >= 0)
    p, pos_s = torch.nonzero(hit, as_tuple=True)
    return rs[p], pos_s, rt[p], pos_t[p, pos_s]


def region_loss(kind: str, s_region: torch.Tensor, s_of_patch: torch.Tensor,
                t_region: torch.Tensor, t_of_patch: torch.Tensor, t_mask: torch.Tensor,
                match: tuple[torch.Tensor, ...], *, student_temp: float, teacher_temp: float,
                center: torch.Tensor | None = None) -> torch.Tensor:
    """The region-level loss (module doc) over shared patches ``match`` (:func:`shared_patches`).

    ``s_region`` (Bs, Rs, K) / ``t_region`` (Bt, Rt, K): region outputs of SSLModel;
    ``*_of_patch`` (B, N): each token's region (CareOutput.region_of_patch); ``t_mask`` (Bt,
    Rt): the teacher's real regions. "dino": centred, sharpened teacher prototypes vs the
    student's; "contrast": the student's region against every region of the teacher view,
    the one holding the same patch being the positive (temperature ``student_temp``).
    """
    rs, ps, rt, pt = match
    s_reg = s_region[rs, s_of_patch[rs, ps]]  # (P, K): the student region of each patch
    t_reg_id = t_of_patch[rt, pt]  # (P,)
    if kind == "dino":
        t = F.softmax((t_region[rt, t_reg_id] - center) / teacher_temp, -1)
        return (-(t * F.log_softmax(s_reg / student_temp, -1)).sum(-1)).mean()
    logits = torch.einsum("pk,prk->pr", s_reg, t_region[rt]) / student_temp
    logits = logits.masked_fill(~t_mask[rt], float("-inf"))
    return F.cross_entropy(logits, t_reg_id)


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
        self.region_center = torch.zeros(cfg.ssl.region_out_dim, device=device)
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
        if self.cfg.ssl.mask_mode == "block":
            mask = block_token_mask(student["grid"].numpy(), student["num_valid"].numpy(),
                                    tuple(self.cfg.ssl.mask_ratio), rng)
        else:
            mask = random_token_mask(student["num_valid"].numpy(),
                                     student["features"].shape[1],
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
            t_slide, t_patch, (t_region, _), t_out = self.teacher(teacher)
        s_slide, s_patch, (s_region, s_bow), s_out = self.model(student, mask)
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
        # region-level loss: every student view against each *other* global teacher view,
        # patch by patch (a view pair of one item shares the patches of its crops' overlap)
        reg_loss = slide_loss * 0
        if s_region is not None:
            rows = torch.arange(bsz, device=s_region.device)
            pairs = torch.cat([torch.stack([j * bsz + rows, i * bsz + rows], 1)
                               for i in range(2) for j in range(n_views) if j != i])
            match = shared_patches(student["index"], teacher["index"], pairs)
            if len(match[0]):
                contrast = c.region_loss == "contrast"
                reg_loss = region_loss(
                    "contrast" if contrast else "dino", s_region, s_out.region_of_patch,
                    t_region, t_out.region_of_patch, t_out.region_mask, match,
                    student_temp=c.region_temp if contrast else c.student_temp,
                    teacher_temp=t_temp, center=self.region_center)
        bow_loss = slide_loss * 0
        if s_bow is not None:
            # OBoW-style: each student view's slide embedding predicts the *other* global
            # teacher view's bag of region words (patch-weighted histogram of its regions'
            # sharpened prototype distributions)
            with torch.no_grad():
                words = F.softmax((t_region - self.region_center) / t_temp, -1)
                rop = t_out.region_of_patch
                valid = (rop >= 0).to(words.dtype)
                per_patch = torch.gather(words, 1, rop.clamp_min(0)[..., None].expand(
                    -1, -1, words.shape[-1]))
                hist = (per_patch * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
                hist = hist.reshape(2, bsz, -1)
            s_bow_logp = F.log_softmax(s_bow / c.student_temp, -1).reshape(n_views, bsz, -1)
            bow_loss = torch.stack([(-(hist[i] * s_bow_logp[j]).sum(-1)).mean()
                                    for i in range(2) for j in range(n_views) if j != i]).mean()
            reg_loss = reg_loss + bow_loss
        rsl = s_out.rsl_loss
        total = c.loss_weight_slide * slide_loss + c.loss_weight_patch * patch_loss \
            + c.loss_weight_region * reg_loss + self.lambda_rsl * rsl
        self._update_centers(t_slide, t_patch, teacher, t_region, t_out.region_mask)
        emb = F.normalize(s_out.slide_embedding[:2 * bsz].detach().float(), dim=-1)
        emb_std = float(emb.std(0).mean())
        self._watch_collapse(step, emb_std)
        return total, {"loss_slide": float(slide_loss), "loss_patch": float(patch_loss),
                       "loss_region": float(reg_loss), "loss_bow": float(bow_loss),
                       "loss_rsl": float(rsl), "emb_std": emb_std, "teacher_temp": t_temp,
                       "expected_rank": float(s_out.expected_rank.detach().float().mean())}

    @torch.no_grad()
    def _update_centers(self, t_slide: torch.Tensor, t_patch: torch.Tensor,
                        batch: dict[str, torch.Tensor], t_region: torch.Tensor | None,
                        region_mask: torch.Tensor) -> None:
        import torch.distributed as dist

        c = self.cfg.ssl
        slide_mean = t_slide.mean(0)
        valid = _valid_mask(batch["num_valid"], t_patch.shape[1])
        patch_sum, patch_count = t_patch[valid].sum(0), valid.sum().float()
        # region centre: over the teacher's real regions ("dino", "bow"; zeros otherwise, so
        # every worker all-reduces the same tensors)
        region_sum = torch.zeros_like(self.region_center)
        region_count = torch.zeros((), device=region_sum.device)
        if c.region_loss in ("dino", "bow") and t_region is not None:
            region_sum, region_count = t_region[region_mask].sum(0), region_mask.sum().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(slide_mean)
            slide_mean /= dist.get_world_size()
            for t in (patch_sum, patch_count, region_sum, region_count):
                dist.all_reduce(t)
        m = c.center_momentum
        self.center.mul_(m).add_(slide_mean, alpha=1 - m)
        self.patch_center.mul_(m).add_(patch_sum / patch_count.clamp(min=1), alpha=1 - m)
        if c.region_loss in ("dino", "bow"):
            self.region_center.mul_(m).add_(region_sum / region_count.clamp(min=1),
                                            alpha=1 - m)

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
        state["region_center"] = self.region_center
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items()
                                      if k.startswith("teacher.")})
        self.center.copy_(state["center"])
        self.patch_center.copy_(state["patch_center"])
        if "region_center" in state:  # absent in checkpoints of runs before the region loss
            self.region_center.copy_(state["region_center"])

    def final_encoder(self) -> nn.Module:
        """The teacher's encoder: the EMA weights are the better encoder (DINO/iBOT)."""
        return self.teacher.encoder

    def final_extras(self) -> dict[str, torch.Tensor]:
        return {}
