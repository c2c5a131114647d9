"""CARE: Cross-modal Adaptive Region Encoder (arXiv 2602.21637: "A Molecular-Guided
Foundation Model with Adaptive Region Modeling for Whole Slide Image Analysis", CVPR 2026).

Pipeline for one batch of slides (patch features + integer grid positions):

1. Sub-regions: the grid is cut into non-overlapping k x k windows; non-empty ones are kept.
   Self-attention with a CLS token inside each window gives ``g_cls``; cross-attention from a
   learnable query gives ``g_q``.
2. Adaptive Region Generator: each patch gets its 3 candidate sub-regions with the largest soft
   inclusion ``C`` (softmax of -d^2 / 2 sigma^2 over anchor distances). Semantic affinity
   ``rho`` = mean of four softmax-normalised cosine similarities (patch and augmented patch
   against ``g_cls`` and ``g_q``); score ``w = rho * C``; the patch joins argmax ``w``.
   Training uses a straight-through estimator: the forward pass is the hard assignment, the
   backward pass goes through the soft probabilities ``w / sum(w)``, so a slide-level loss
   shapes the regions (through ``log_sigma``, ``log_tau``, the sub-region attention and query).
3. ARSA: self-attention inside each adaptive region -> region embedding ``g_ar`` (CLS) and
   contextualised patch tokens.
4. SPF: coverage prior ``alpha`` and gated-attention weight ``beta``;
   ``z = sum_i (lambda * alpha_i + (1 - lambda) * beta_i) g_ar_i``; ROI = argmax fused weight.
5. Region Structuring Loss: ``(E_bar - E*)^2`` with ``E`` the expected candidate rank.

Each step is a method of :class:`CARE` that ``forward`` calls in turn, passing the small
records defined below: ``flatten`` and ``embed`` (the valid patches as one flat list),
``subregions`` (1), ``assign`` (2), ``attend_regions`` (3), ``fuse`` (4), ``structuring`` (5)
and ``unflatten`` (back to the caller's (B, N) layout).

Cost is linear in N: attention runs only inside sub-regions and adaptive regions. Groups are
formed by sorting integer keys and gathering members into padded per-group blocks; there is no
Python loop over patches, windows or regions, and no data-dependent Python control flow, so the
forward pass traces for ONNX export with a dynamic number of patches. Sizes that depend on data
(number of groups, largest group) come from ``nonzero`` rather than ``.item()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from care_scale.exceptions import ConfigError, ModelInputError
from care_scale.models.checkpoints import convert_care_reference, model_version
from care_scale.models.registry import SlideEncoderSpec, register_slide_encoder
from care_scale.patch_grid import SlideEncoding

# Field order of CareOutput.as_tuple(), e.g. for ONNX output names.
CARE_OUTPUT_FIELDS = (
    "slide_embedding", "region_embeddings", "region_mask", "num_regions", "region_of_patch",
    "coverage", "semantic_weight", "fused_weight", "roi_index", "roi_embedding",
    "patch_tokens", "rsl_loss", "aux_loss",
)


@dataclass
class CareConfig:
    """Architecture and loss settings; defaults are the paper's (hidden 512, 8 heads, k=8,
    lambda_SPF 0.5, lambda_RSL 0.1, E* 0.5)."""

    in_dim: int = 768
    hidden_dim: int = 512
    num_heads: int = 8
    subregion_size: int = 8
    lambda_spf: float = 0.5
    lambda_rsl: float = 0.1
    e_star: float = 0.5
    num_candidates: int = 3
    # Candidates are searched among sub-regions within this many windows of the patch's own;
    # the inclusion of farther anchors is < 1e-5 of the nearest at sigma = k/2.
    candidate_radius: int = 2
    subregion_depth: int = 1
    region_depth: int = 2
    mlp_ratio: float = 4.0
    sigma_init: float = 0.5  # inclusion width, in units of the sub-region side k
    tau_init: float = 0.1  # temperature of the semantic softmax

    def validate(self) -> None:
        if self.in_dim < 1 or self.hidden_dim < 1:
            raise ConfigError(f"CareConfig: in_dim and hidden_dim must be positive, got "
                              f"{self.in_dim}, {self.hidden_dim}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"CareConfig: hidden_dim {self.hidden_dim} is not divisible by "
                              f"num_heads {self.num_heads}")
        if self.subregion_size < 1:
            raise ConfigError(f"CareConfig: subregion_size must be >= 1, got "
                              f"{self.subregion_size}")
        if not 1 <= self.num_candidates <= (2 * self.candidate_radius + 1) ** 2:
            raise ConfigError(f"CareConfig: num_candidates {self.num_candidates} does not fit "
                              f"candidate_radius {self.candidate_radius}")
        if not 0.0 <= self.lambda_spf <= 1.0:
            raise ConfigError(f"CareConfig: lambda_spf must be in [0, 1], got {self.lambda_spf}")
        if not 0.0 <= self.e_star <= 1.0:
            raise ConfigError(f"CareConfig: e_star must be in [0, 1], got {self.e_star}")
        if self.sigma_init <= 0 or self.tau_init <= 0:
            raise ConfigError("CareConfig: sigma_init and tau_init must be positive")


@dataclass
class CareOutput:
    """Batched CARE result (torch). R = most regions of any slide in the batch."""

    slide_embedding: torch.Tensor  # (B, H)
    region_embeddings: torch.Tensor  # (B, R, H), zeros where ~region_mask
    region_mask: torch.Tensor  # (B, R) bool
    num_regions: torch.Tensor  # (B,) long
    region_of_patch: torch.Tensor  # (B, N) long, -1 on padding
    coverage: torch.Tensor  # (B, R) alpha
    semantic_weight: torch.Tensor  # (B, R) beta
    fused_weight: torch.Tensor  # (B, R)
    roi_index: torch.Tensor  # (B,) long
    roi_embedding: torch.Tensor  # (B, H)
    patch_tokens: torch.Tensor  # (B, N, H), zeros on padding
    rsl_loss: torch.Tensor  # scalar
    aux_loss: torch.Tensor  # scalar, lambda_rsl * rsl_loss
    # (B,) mean expected rank of each slide's patches among their ranked candidates, in
    # [0, 1]; the RSL pulls it toward E*. Not an export output (training diagnostics).
    expected_rank: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in CARE_OUTPUT_FIELDS)


# ------------------------------------------------------------------------------ building blocks

class MaskedBlock(nn.Module):
    """Pre-norm transformer block whose attention runs inside groups.

    Tokens stay in a flat (T, H) list: the linear layers (most of the FLOPs) touch each token
    once, without padding. Only attention gathers them into padded per-group blocks
    (``index`` (G, L) into the list, ``valid`` (G, L) key mask) and scatters back via
    ``back`` = (group, slot) of every token.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, t: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                back: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        c = t.shape[-1]
        h = self.num_heads
        qkv = self.qkv(self.norm1(t))[index]  # (G, L, 3H)
        g, n = index.shape
        q, k, v = qkv.reshape(g, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        a = a.transpose(1, 2).reshape(g, n, c)[back[0], back[1]]  # (T, H)
        t = t + self.proj(a)
        return t + self.mlp(self.norm2(t))


class QueryPool(nn.Module):
    """Cross-attention from one learnable query to the members of each group.

    Values are the members' own features (split by head, no value projection), so ``g_q`` is
    a convex combination of member features and lives in the patches' feature space: the
    cosine similarities of the region generator compare like with like from the first step.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.k = nn.Linear(dim, dim)
        self.q = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (M, H) members in group order; index/valid (G, L) -> (G, H)."""
        c = x.shape[-1]
        h = self.num_heads
        g, n = index.shape
        k = self.k(self.norm(x))[index].reshape(g, n, h, c // h).transpose(1, 2)
        v = x[index].reshape(g, n, h, c // h).transpose(1, 2)
        q = self.q(self.query).reshape(1, 1, h, c // h).transpose(1, 2).expand(g, -1, -1, -1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return a.transpose(1, 2).reshape(g, c)


def _segment_mean(x: torch.Tensor, gid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of x (M, H) per group id (scatter_add: exports as ScatterElements)."""
    total = x.new_zeros(counts.shape[0], x.shape[-1])
    total = total.scatter_add(0, gid[:, None].expand(-1, x.shape[-1]), x)
    return total / counts[:, None].to(x.dtype)


def _with_cls(grp: _Groups) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Attention layout for the token list [CLS_0..CLS_{G-1}, members...]: each group's block
    is its CLS token followed by its members."""
    n_groups = grp.starts.shape[0]
    ids = _iota(grp.starts)
    index = torch.cat([ids[:, None], grp.index + n_groups], dim=1)
    valid = F.pad(grp.valid, (1, 0), value=True)
    back = (torch.cat([ids, grp.gid]), torch.cat([torch.zeros_like(ids), grp.rank + 1]))
    return index, valid, back


@dataclass
class _Groups:
    """Padded block layout of contiguous groups in a sorted list of M items."""

    gid: torch.Tensor  # (M,) group of each item
    rank: torch.Tensor  # (M,) position inside its group
    starts: torch.Tensor  # (G,) first item of each group
    counts: torch.Tensor  # (G,) members per group
    index: torch.Tensor  # (G, L) item index per slot (0 where padding)
    valid: torch.Tensor  # (G, L) bool


def _iota(t: torch.Tensor) -> torch.Tensor:
    """arange(len(t)) built from t itself, so traced graphs keep the length dynamic."""
    return torch.cumsum(torch.ones_like(t, dtype=torch.long), 0) - 1


# Sums use scatter_add (ONNX ScatterElements with reduction="add"): index_add with repeated
# indices does not export correctly.


def _groups(sorted_keys: torch.Tensor) -> _Groups:
    """Group equal adjacent keys of an ascending key list into padded blocks."""
    is_first = torch.cat([torch.ones_like(sorted_keys[:1], dtype=torch.bool),
                          sorted_keys[1:] != sorted_keys[:-1]])
    gid = torch.cumsum(is_first.long(), 0) - 1
    starts = torch.nonzero(is_first).squeeze(1)
    counts = torch.zeros_like(starts).scatter_add(0, gid, torch.ones_like(gid))
    rank = _iota(gid) - starts[gid]
    # arange(max group size) with a data-dependent length, via nonzero (no .item()).
    slots = torch.nonzero(_iota(gid) < counts.max()).squeeze(1)
    index = starts[:, None] + slots[None, :]
    valid = slots[None, :] < counts[:, None]
    index = torch.where(valid, index, torch.zeros_like(index))
    return _Groups(gid, rank, starts, counts, index, valid)


def _invert(perm: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(perm).scatter(0, perm, _iota(perm))


def _checking() -> bool:
    """Input checks raise Python exceptions; skip them while tracing / exporting."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    compiler = getattr(torch, "compiler", None)
    exporting = getattr(compiler, "is_exporting", lambda: False)
    return not (compiler is not None and (compiler.is_compiling() or exporting()))


# --------------------------------------------------------------- records between forward steps
# Each step of CARE.forward is a method taking and returning one of these. Per-patch tensors
# are flat lists of the M valid patches of the batch; "s-order" is the order of step 1's sort.

@dataclass
class FlatPatches:
    """Prologue: the valid patches of a (B, N) batch as one flat list of M items."""

    bsz: int
    n: int  # padded patches per slide
    num_valid: torch.Tensor  # (B,) long
    flat: torch.Tensor  # (M,) index into the B*N slots
    slide: torch.Tensor  # (M,) slide of each patch
    grid: torch.Tensor  # (M, 2) long, relative to the slide's smallest valid position


@dataclass
class SubRegions:
    """Step 1: patches sorted by (slide, window, position), the windows' groups and tokens."""

    perm: torch.Tensor  # (M,) flat index of each s-order patch
    x: torch.Tensor  # (M, H) patch features, s-order
    xa: torch.Tensor  # (M, H) augmented-view features (x itself without a view), s-order
    grid: torch.Tensor  # (M, 2) s-order
    window: torch.Tensor  # (M, 2) window coordinates, s-order
    slide: torch.Tensor  # (M,) s-order
    span: torch.Tensor  # (2,) key extent of window coordinates (with neighbour room)
    keys: torch.Tensor  # (G,) ascending unique window key of each sub-region
    groups: _Groups  # the G sub-regions as padded blocks of s-order patches
    anchor: torch.Tensor  # (G, 2) window centres in grid units
    g_cls: torch.Tensor  # (G, H) CLS output of the in-window self-attention
    g_q: torch.Tensor  # (G, H) learnable-query cross-attention output


@dataclass
class Assignment:
    """Step 2 (ARG): each patch's candidate sub-regions and the one it joins."""

    cand: torch.Tensor  # (M, K) candidate sub-region ids, nearest first
    cand_ok: torch.Tensor  # (M, K) bool, False where fewer than K candidates exist
    inclusion: torch.Tensor  # (M, K) soft inclusion C of the candidates
    affinity: torch.Tensor  # (M, K) semantic affinity rho
    prob: torch.Tensor  # (M, K) soft assignment w / sum(w)
    choice: torch.Tensor  # (M,) argmax w, index into the K candidates
    region: torch.Tensor  # (M,) sub-region id of the chosen candidate
    gate: torch.Tensor  # (M, 1) straight-through gate: 1 forward, d prob backward


@dataclass
class Regions:
    """Step 3 (ARSA): adaptive regions, their embeddings and contextualised patch tokens."""

    perm: torch.Tensor  # (M,) s-order index of each region-ordered patch
    groups: _Groups  # the R_tot regions of the batch as padded blocks
    g_ar: torch.Tensor  # (R_tot, H) region embeddings
    tokens: torch.Tensor  # (M, H) patch tokens, region order
    slide: torch.Tensor  # (R_tot,) slide of each region
    count: torch.Tensor  # (B,) regions per slide
    local: torch.Tensor  # (R_tot,) index of each region within its slide
    slot: torch.Tensor  # (R_tot,) index into the flattened (B, R) padded layout
    embeddings: torch.Tensor  # (B, R, H), zeros where ~mask
    mask: torch.Tensor  # (B, R) bool


@dataclass
class Fusion:
    """Step 4 (SPF): region weights, slide embedding and region of interest."""

    coverage: torch.Tensor  # (B, R) alpha
    semantic: torch.Tensor  # (B, R) beta
    fused: torch.Tensor  # (B, R) lambda * alpha + (1 - lambda) * beta
    slide_embedding: torch.Tensor  # (B, H)
    roi: torch.Tensor  # (B,)
    roi_embedding: torch.Tensor  # (B, H)


@dataclass
class Structuring:
    """Step 5 (RSL): expected candidate rank per patch and per slide, and the loss."""

    rank_patch: torch.Tensor  # (M,) expected rank in [0, 1] of each patch's assignment
    rank_slide: torch.Tensor  # (B,) E_bar: mean over the slide's patches
    loss: torch.Tensor  # scalar mean over slides of (E_bar - E*)^2


# ------------------------------------------------------------------------------------- the model

class CARE(nn.Module):
    """The CARE slide encoder. See the module docstring for the algorithm."""

    def __init__(self, config: CareConfig):
        super().__init__()
        config.validate()
        self.config = config
        h, nh, mr = config.hidden_dim, config.num_heads, config.mlp_ratio
        self.input_proj = nn.Linear(config.in_dim, h)
        self.input_norm = nn.LayerNorm(h)
        self.mask_token = nn.Parameter(torch.zeros(h))  # for masked-token pretraining
        # Sub-regions (fixed k x k windows)
        self.sub_pos = nn.Linear(2, h)
        self.sub_cls = nn.Parameter(torch.zeros(1, 1, h))
        self.sub_blocks = nn.ModuleList(MaskedBlock(h, nh, mr)
                                        for _ in range(config.subregion_depth))
        self.sub_norm = nn.LayerNorm(h)
        self.sub_query = QueryPool(h, nh)
        # Adaptive region generator: inclusion width and semantic temperature (log scale)
        self.log_sigma = nn.Parameter(torch.tensor(float(np.log(config.sigma_init))))
        self.log_tau = nn.Parameter(torch.tensor(float(np.log(config.tau_init))))
        # ARSA
        self.region_pos = nn.Linear(2, h)
        self.region_cls = nn.Parameter(torch.zeros(1, 1, h))
        self.region_blocks = nn.ModuleList(MaskedBlock(h, nh, mr)
                                           for _ in range(config.region_depth))
        self.region_norm = nn.LayerNorm(h)
        # SPF gated attention (Ilse et al. style: w^T (tanh(V g) * sigmoid(U g)))
        self.gate_v = nn.Linear(h, h // 2)
        self.gate_u = nn.Linear(h, h // 2)
        self.gate_w = nn.Linear(h // 2, 1)
        # Neighbour window offsets searched for candidates, in a fixed order.
        r = config.candidate_radius
        offs = torch.stack(torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1),
                                          indexing="ij"), -1).reshape(-1, 2)
        self.register_buffer("offsets", offs, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for p in (self.sub_cls, self.region_cls, self.sub_query.query, self.mask_token):
            nn.init.normal_(p, std=0.02)

    # -------------------------------------------------------------------------- input checks
    def _check(self, features, num_valid, grid, augmented, token_mask) -> None:
        cfg = self.config
        if features.ndim != 3 or features.shape[-1] != cfg.in_dim:
            raise ModelInputError(f"CARE: features must be (B, N, {cfg.in_dim}), got "
                                  f"{tuple(features.shape)}")
        b, n = features.shape[:2]
        if tuple(grid.shape) != (b, n, 2):
            raise ModelInputError(f"CARE: grid must be (B, N, 2) = {(b, n, 2)}, got "
                                  f"{tuple(grid.shape)}")
        if tuple(num_valid.shape) != (b,):
            raise ModelInputError(f"CARE: num_valid must be (B,) = ({b},), got "
                                  f"{tuple(num_valid.shape)}")
        if b == 0 or n == 0 or bool((num_valid < 1).any()):
            raise ModelInputError("CARE: empty input: every slide needs at least one patch")
        if bool((num_valid > n).any()):
            raise ModelInputError(f"CARE: num_valid exceeds N={n}")
        if augmented is not None and augmented.shape != features.shape:
            raise ModelInputError("CARE: augmented must have the shape of features")
        if token_mask is not None and tuple(token_mask.shape) != (b, n):
            raise ModelInputError("CARE: token_mask must be (B, N)")
        valid = torch.arange(n, device=features.device)[None] < num_valid[:, None]
        g = grid[valid]
        extent = ((g.amax(0) - g.amin(0)).double() / cfg.subregion_size
                  + 2 * cfg.candidate_radius + 2)
        # Sort keys pack (slide, window, position, index) into int64; refuse grids so sparse
        # (usually pixel coordinates passed as grid positions) that they would overflow.
        if float(extent.prod()) * b * cfg.subregion_size**2 * g.shape[0] > 2**62:
            raise ModelInputError(
                f"CARE: grid spans {tuple(int(v) for v in g.amax(0) - g.amin(0))} positions; "
                "pass grid positions (coordinate // patch step), not pixel coordinates"
            )
        for name, t in (("features", features), ("augmented", augmented)):
            if t is not None and not bool(torch.isfinite(t[valid]).all()):
                bad = int((~torch.isfinite(t[valid])).any(-1).sum())
                raise ModelInputError(f"CARE: {name} contain NaN or inf ({bad} patches)")

    # ------------------------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, num_valid: torch.Tensor, grid: torch.Tensor, *,
                augmented: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> CareOutput:
        """features (B, N, D), num_valid (B,) long, grid (B, N, 2) long (x, y) positions.

        ``augmented``: features of an augmented view (same layout) for the semantic affinity;
        the original features are used when it is None. ``token_mask`` (B, N) bool replaces
        those patches' inputs with the learnable mask token (masked-token pretraining).
        """
        if _checking():
            self._check(features, num_valid, grid, augmented, token_mask)
        fp = self.flatten(features, num_valid, grid)
        x, xa = self.embed(fp, features, augmented, token_mask)
        sub = self.subregions(fp, x, xa)
        del x, xa  # sorted copies only from here on: memory stays at a few (M, H) tensors
        asg = self.assign(sub)
        reg = self.attend_regions(fp, sub, asg)
        fus = self.fuse(fp, reg, asg)
        rsl = self.structuring(asg.prob, sub.slide, fp.num_valid)
        patch_tokens, region_of_patch = self.unflatten(fp, sub, reg)
        return CareOutput(
            slide_embedding=fus.slide_embedding, region_embeddings=reg.embeddings,
            region_mask=reg.mask, num_regions=reg.count, region_of_patch=region_of_patch,
            coverage=fus.coverage, semantic_weight=fus.semantic, fused_weight=fus.fused,
            roi_index=fus.roi, roi_embedding=fus.roi_embedding, patch_tokens=patch_tokens,
            rsl_loss=rsl.loss, aux_loss=self.config.lambda_rsl * rsl.loss,
            expected_rank=rsl.rank_slide,
        )

    def flatten(self, features: torch.Tensor, num_valid: torch.Tensor,
                grid: torch.Tensor) -> FlatPatches:
        """Prologue: the valid patches as one flat list (no padding from here on)."""
        bsz, n, _ = features.shape
        dev = features.device
        num_valid = num_valid.to(dev).long()
        grid = grid.to(dev).long()
        pmask = _iota(grid[0, :, 0])[None, :] < num_valid[:, None]  # (B, N)
        flat = torch.nonzero(pmask.reshape(-1)).squeeze(1)  # (M,)
        b_of = torch.div(flat, n, rounding_mode="floor")
        # Window origin per slide = smallest valid grid position: translation invariance.
        big = torch.full_like(grid, 2**40)
        gmin = torch.where(pmask[..., None], grid, big).amin(dim=1)  # (B, 2)
        g = grid.reshape(-1, 2)[flat] - gmin[b_of]  # (M, 2)
        return FlatPatches(bsz, n, num_valid, flat, b_of, g)

    def embed(self, fp: FlatPatches, features: torch.Tensor, augmented: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prologue: input projection of the flat patches (and of the augmented view, None
        without one); masked tokens replaced by the mask token."""
        # Stored patch features may be float16; compute in the model's dtype.
        dtype = self.input_proj.weight.dtype
        rows = fp.bsz * fp.n
        x = self.input_norm(self.input_proj(features.to(dtype).reshape(rows, -1)[fp.flat]))
        if token_mask is not None:
            tm = token_mask.to(x.device).reshape(-1)[fp.flat][:, None]
            x = torch.where(tm, self.mask_token.to(x.dtype)[None], x)
        if augmented is None:
            return x, None
        return x, self.input_norm(self.input_proj(augmented.to(dtype).reshape(rows, -1)[fp.flat]))

    def subregions(self, fp: FlatPatches, x: torch.Tensor,
                   xa: torch.Tensor | None = None) -> SubRegions:
        """Step 1: sort by (slide, window, position), gather into k*k blocks, attend."""
        k = self.config.subregion_size
        g = fp.grid
        w = torch.div(g, k, rounding_mode="floor")  # window coords (M, 2)
        span = w.amax(dim=0) + 1 + self.config.candidate_radius  # room for neighbour keys
        win_key = (fp.slide * span[1] + w[:, 1]) * span[0] + w[:, 0]
        local = g - w * k
        m_tot = fp.flat.shape[0]
        key = ((win_key * (k * k) + local[:, 1] * k + local[:, 0]) * m_tot + _iota(fp.flat))
        perm = torch.argsort(key)
        xs, gs, ws = x[perm], g[perm], w[perm]
        xas = xs if xa is None else xa[perm]
        keys_sorted = win_key[perm]
        sub = _groups(keys_sorted)
        anchor = (ws[sub.starts] * k).to(xs.dtype) + (k - 1) / 2.0  # (G, 2) window centres
        g_cls = self._subregion_cls(xs, gs, sub, anchor)
        g_q = self.sub_query(xs, sub.index, sub.valid)  # (G, H)
        return SubRegions(perm, xs, xas, gs, ws, fp.slide[perm], span, keys_sorted[sub.starts],
                          sub, anchor, g_cls, g_q)

    def _subregion_cls(self, xs: torch.Tensor, gs: torch.Tensor, sub: _Groups,
                       anchor: torch.Tensor) -> torch.Tensor:
        """Self-attention with a CLS token inside each window -> g_cls (G, H)."""
        k = self.config.subregion_size
        rel = (gs.to(xs.dtype) - anchor[sub.gid]) / k
        # The CLS token starts at the window's mean feature (plus a learned offset), so its
        # output stays in the patches' feature space, comparable with them by cosine.
        cls = _segment_mean(xs, sub.gid, sub.counts) + self.sub_cls[0]
        t = torch.cat([cls, xs + self.sub_pos(rel)])  # (G + M, H)
        layout = _with_cls(sub)
        for blk in self.sub_blocks:
            t = blk(t, *layout)
        return self.sub_norm(t[:sub.starts.shape[0]])

    def assign(self, sub: SubRegions) -> Assignment:
        """Step 2 (ARG): candidates from neighbouring windows, inclusion, semantic affinity,
        hard assignment with a straight-through gate."""
        cand, cand_ok, c_top = self._candidates(sub)
        rho = self._affinity(sub, cand, cand_ok)
        score = rho * c_top * cand_ok.to(rho.dtype)  # w = rho * C
        prob = score / score.sum(-1, keepdim=True).clamp_min(1e-12)
        choice = torch.argmax(score, dim=-1)  # hard assignment (M,)
        onehot = F.one_hot(choice, self.config.num_candidates).to(prob.dtype)
        # Straight-through: value 1 in the forward pass, gradient of the soft probability.
        gate = (onehot + prob - prob.detach()).gather(1, choice[:, None])  # (M, 1)
        region = torch.gather(cand, 1, choice[:, None]).squeeze(1)  # sub-region id (M,)
        return Assignment(cand, cand_ok, c_top, rho, prob, choice, region, gate)

    def _candidates(self, sub: SubRegions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The K nearest existing sub-regions of each patch: ids, found, soft inclusion C."""
        k, span = self.config.subregion_size, sub.span
        nb = sub.window[:, None, :] + self.offsets[None]  # (M, Q, 2)
        inside = ((nb >= 0) & (nb < span)).all(-1)
        q_key = (sub.slide[:, None] * span[1] + nb[..., 1]) * span[0] + nb[..., 0]
        q_key = torch.where(inside, q_key, torch.full_like(q_key, -1))
        cand_all, found = self._lookup(sub.keys, q_key)  # (M, Q) sub-region ids, bool

        sigma = self.log_sigma.exp() * k
        d2 = ((sub.grid.to(sub.x.dtype)[:, None, :] - sub.anchor[cand_all]) ** 2).sum(-1)
        logit_c = torch.where(found, -d2 / (2 * sigma**2), torch.full_like(d2, -1e9))
        c_all = torch.softmax(logit_c, dim=-1)  # soft inclusion matrix C (truncated)
        # Rank candidates by an exact integer key (4*d^2 is an integer: anchors sit on half
        # steps), ties broken by the fixed offset order, so torch and ONNX Runtime agree.
        n_off = self.offsets.shape[0]
        d2_key = torch.round(4 * d2).long() * n_off + _iota(self.offsets[:, 0])[None, :]
        d2_key = torch.where(found, d2_key, torch.full_like(d2_key, 2**62))
        top = torch.topk(d2_key, self.config.num_candidates, dim=-1,
                         largest=False).indices  # (M, K), nearest first
        return (torch.gather(cand_all, 1, top), torch.gather(found, 1, top),
                torch.gather(c_all, 1, top))

    def _affinity(self, sub: SubRegions, cand: torch.Tensor,
                  cand_ok: torch.Tensor) -> torch.Tensor:
        """rho: mean of four softmax-normalised cosine similarities over the candidates."""
        tau = self.log_tau.exp()
        xn, xan = F.normalize(sub.x, dim=-1), F.normalize(sub.xa, dim=-1)
        gcn, gqn = F.normalize(sub.g_cls, dim=-1)[cand], F.normalize(sub.g_q, dim=-1)[cand]
        rho = torch.zeros_like(cand, dtype=sub.x.dtype)
        for p_feat in (xn, xan):
            for g_feat in (gcn, gqn):
                sim = (p_feat[:, None, :] * g_feat).sum(-1) / tau
                sim = torch.where(cand_ok, sim, torch.full_like(sim, -1e9))
                rho = rho + torch.softmax(sim, dim=-1) / 4.0
        return rho

    def attend_regions(self, fp: FlatPatches, sub: SubRegions, asg: Assignment) -> Regions:
        """Step 3 (ARSA): sort by (region, canonical position), attend inside each region,
        lay the regions out per slide (B, R)."""
        k = self.config.subregion_size
        region = asg.region
        perm2 = torch.argsort(region * region.shape[0] + _iota(region))
        reg = _groups(region[perm2])
        rid = region[perm2][reg.starts]  # sub-region id of each adaptive region
        rel2 = (sub.grid[perm2].to(sub.x.dtype) - sub.anchor[rid][reg.gid]) / k
        y2 = (sub.x * asg.gate)[perm2]
        cls = _segment_mean(y2, reg.gid, reg.counts) + self.region_cls[0]
        t = torch.cat([cls, y2 + self.region_pos(rel2)])  # (R_tot + M, H)
        layout = _with_cls(reg)
        for blk in self.region_blocks:
            t = blk(t, *layout)
        t = self.region_norm(t)
        n_regions = reg.starts.shape[0]
        g_ar = t[:n_regions]  # (R_tot, H)
        b_reg = sub.slide[perm2][reg.starts]  # (R_tot,)
        return Regions(perm2, reg, g_ar, t[n_regions:], b_reg,
                       *self._pad_regions(fp, b_reg, g_ar))

    @staticmethod
    def _pad_regions(fp: FlatPatches, b_reg: torch.Tensor, g_ar: torch.Tensor):
        """Per-slide padded region layout: count, local index, slot, (B, R, H), (B, R)."""
        n_reg = torch.zeros_like(fp.num_valid).scatter_add(0, b_reg, torch.ones_like(b_reg))
        first = torch.cumsum(n_reg, 0) - n_reg
        r_loc = _iota(b_reg) - first[b_reg]
        rmax_slots = torch.nonzero(_iota(b_reg) < n_reg.max()).squeeze(1)  # arange(R)
        r_pad = rmax_slots.shape[0]
        slot = b_reg * r_pad + r_loc
        h_dim = g_ar.shape[-1]
        reg_emb = g_ar.new_zeros(fp.bsz * r_pad, h_dim).index_copy(0, slot, g_ar)
        reg_mask = (rmax_slots[None, :] < n_reg[:, None])
        return n_reg, r_loc, slot, reg_emb.reshape(fp.bsz, r_pad, h_dim), reg_mask

    def fuse(self, fp: FlatPatches, reg: Regions, asg: Assignment) -> Fusion:
        """Step 4 (SPF): coverage prior alpha, gated attention beta, fused weights, ROI."""
        g_ar, (bsz, r_pad) = reg.g_ar, reg.mask.shape
        mass = torch.zeros_like(g_ar[:, 0]).scatter_add(0, reg.groups.gid,
                                                        asg.gate[reg.perm].squeeze(1))
        alpha_flat = mass / fp.num_valid[reg.slide].to(mass.dtype)
        a_logit = self.gate_w(torch.tanh(self.gate_v(g_ar)) * torch.sigmoid(self.gate_u(g_ar)))
        neg = torch.full((bsz * r_pad,), -1e9, dtype=g_ar.dtype, device=g_ar.device)
        a_pad = neg.index_copy(0, reg.slot, a_logit.squeeze(1)).reshape(bsz, r_pad)
        beta = torch.softmax(a_pad, dim=-1) * reg.mask
        alpha = g_ar.new_zeros(bsz * r_pad).index_copy(0, reg.slot, alpha_flat)
        alpha = alpha.reshape(bsz, r_pad)
        lam = self.config.lambda_spf
        fused = lam * alpha + (1 - lam) * beta
        z = (fused[..., None] * reg.embeddings).sum(1)
        roi = torch.argmax(torch.where(reg.mask, fused, torch.full_like(fused, -1.0)), dim=-1)
        idx = roi[:, None, None].expand(-1, 1, g_ar.shape[-1])
        roi_emb = torch.gather(reg.embeddings, 1, idx).squeeze(1)
        return Fusion(alpha, beta, fused, z, roi, roi_emb)

    def structuring(self, prob: torch.Tensor, slide: torch.Tensor,
                    num_valid: torch.Tensor) -> Structuring:
        """Step 5 (RSL) on the soft assignment ``prob`` (M, K) over ranked candidates;
        ``slide`` (M,) is each patch's slide, ``num_valid`` (B,) the patches per slide."""
        kc = prob.shape[-1]
        ranks = torch.arange(kc, device=prob.device, dtype=prob.dtype) / max(kc - 1, 1)
        e_patch = (prob * ranks).sum(-1)  # (M,)
        e_slide = torch.zeros_like(num_valid, dtype=prob.dtype).scatter_add(0, slide, e_patch)
        e_bar = e_slide / num_valid.to(e_slide.dtype)
        return Structuring(e_patch, e_bar, ((e_bar - self.config.e_star) ** 2).mean())

    @staticmethod
    def unflatten(fp: FlatPatches, sub: SubRegions,
                  reg: Regions) -> tuple[torch.Tensor, torch.Tensor]:
        """Epilogue: patch tokens (B, N, H) and region of each patch (B, N), -1 on padding,
        in the caller's layout."""
        inv2 = _invert(reg.perm)
        ptok_s = reg.tokens[inv2]  # s-order
        rloc_s = reg.local[reg.groups.gid][inv2]
        inv = _invert(sub.perm)
        rows, h_dim = fp.bsz * fp.n, reg.tokens.shape[-1]
        patch_tokens = reg.tokens.new_zeros(rows, h_dim).index_copy(0, fp.flat, ptok_s[inv])
        region_of_patch = torch.full((rows,), -1, dtype=torch.long, device=fp.flat.device)
        region_of_patch = region_of_patch.index_copy(0, fp.flat, rloc_s[inv])
        return (patch_tokens.reshape(fp.bsz, fp.n, h_dim),
                region_of_patch.reshape(fp.bsz, fp.n))

    @staticmethod
    def _lookup(sub_key: torch.Tensor, q_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort-merge join: index of the sub-region whose key equals each query (-1 = none).

        Sub-region keys enter as 2*key and queries as 2*key+1, so after one sort every query
        sits right after its sub-region (if any); the running count of sub-region entries is
        then that sub-region's index. Linear after the sort, no hash table, exportable.
        """
        g = sub_key.shape[0]
        q = q_key.reshape(-1)
        merged = torch.cat([sub_key * 2, q * 2 + 1])
        order = torch.argsort(merged)
        is_sub = (order < g).long()
        last = torch.cumsum(is_sub, 0) - 1  # index of latest sub-region at/before position
        pos = _invert(order)
        idx = last[pos[g:]]
        idx_c = idx.clamp_min(0)
        found = (idx >= 0) & (sub_key[idx_c] == q) & (q >= 0)
        return idx_c.reshape(q_key.shape), found.reshape(q_key.shape)

    # --------------------------------------------------------------------------- one slide
    @torch.no_grad()
    def encode(self, features: Any, coords: np.ndarray | None = None, *,
               patch_step: int | None = None) -> SlideEncoding:
        """Encode one slide. ``features``: (N, D) array or :class:`PatchFeatures`.

        ``coords`` are level-0 pixel positions (N, 2); ``patch_step`` the level-0 distance
        between neighbouring patches (detected from the coordinates when not given).
        """
        from care_scale.models.features import PatchFeatures, coords_to_grid, file_step

        if isinstance(features, PatchFeatures):
            coords = features.coords if coords is None else coords
            patch_step = patch_step or file_step(features)
            features = features.features
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise ModelInputError(f"CARE.encode: features must be a non-empty (N, D) array, "
                                  f"got shape {feats.shape}")
        if coords is None:
            raise ModelInputError("CARE.encode: coords are required with a plain feature array")
        coords = np.asarray(coords)
        if coords.shape != (feats.shape[0], 2):
            raise ModelInputError(f"CARE.encode: coords must be ({feats.shape[0]}, 2), got "
                                  f"{coords.shape}")
        grid, step = coords_to_grid(coords, patch_step)
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            out = self(torch.from_numpy(feats)[None].to(dev),
                       torch.tensor([feats.shape[0]], device=dev),
                       torch.from_numpy(grid)[None].to(dev))
        finally:
            self.train(was_training)
        r = int(out.num_regions[0])

        def np_(t):
            return t.detach().float().cpu().numpy()

        return SlideEncoding(
            slide_embedding=np_(out.slide_embedding[0]),
            region_embeddings=np_(out.region_embeddings[0, :r]),
            num_regions=r,
            region_of_patch=out.region_of_patch[0].cpu().numpy(),
            coverage=np_(out.coverage[0, :r]),
            semantic_weight=np_(out.semantic_weight[0, :r]),
            fused_weight=np_(out.fused_weight[0, :r]),
            roi_index=int(out.roi_index[0]),
            roi_embedding=np_(out.roi_embedding[0]),
            model_version=model_version(self),
            patch_step=int(step),
        )


class CAREReferenceAdapter(nn.Module):
    """The reference implementation's call shape around :class:`CARE`:

        slide_emb, region_embs, num_regions, aux_loss = adapter(x, num_valid, coords)

    ``x`` (B, N, D), ``num_valid`` (B,) (or an int for B = 1), ``coords`` (B, N, 2) level-0
    pixel coordinates, turned into grid positions with ``patch_step`` (detected when None).
    """

    def __init__(self, model: CARE, patch_step: int | None = None):
        super().__init__()
        self.model = model
        self.patch_step = patch_step

    def forward(self, x: torch.Tensor, num_valid: torch.Tensor | int, coords: torch.Tensor):
        from care_scale.models.features import coords_to_grid

        if isinstance(num_valid, int):
            num_valid = torch.tensor([num_valid])
        num_valid = torch.as_tensor(num_valid).long().reshape(-1)
        c = torch.as_tensor(coords).detach().cpu().numpy()
        grid = np.zeros(c.shape[:2] + (2,), dtype=np.int64)
        for i in range(c.shape[0]):  # per slide (not per patch): the step is a slide property
            nv = int(num_valid[i])
            if nv > 0:
                grid[i, :nv] = coords_to_grid(c[i, :nv], self.patch_step)[0]
        out = self.model(x, num_valid.to(x.device), torch.from_numpy(grid).to(x.device))
        return out.slide_embedding, out.region_embeddings, out.num_regions, out.aux_loss


def reference_adapter(model: CARE, patch_step: int | None = None) -> CAREReferenceAdapter:
    return CAREReferenceAdapter(model, patch_step)


def _build(config: dict[str, Any] | CareConfig) -> CARE:
    if isinstance(config, CareConfig):
        return CARE(config)
    names = {f.name for f in dataclasses.fields(CareConfig)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ConfigError(f"CareConfig: unknown fields {unknown}")
    return CARE(CareConfig(**config))


register_slide_encoder(SlideEncoderSpec(
    name="care", patch_encoder="conch_v1_5",
    config=dataclasses.asdict(CareConfig()),
    # The authors run CARE through TRIDENT with --patch_size 512 --mag 20; CONCH v1.5
    # resizes those tiles to 448. Tiled as TRIDENT does, so coordinates match theirs.
    tile_size=512, mpp=0.5, tiling="trident", hf_repo="Zipper-1/CARE",
    source="Hugging Face Zipper-1/CARE (a transformers remote-code snapshot; pass a "
           "care-scale checkpoint=...)",
    description="CARE with the paper's defaults on 768-d CONCH v1.5 patch features",
), convert=convert_care_reference)(_build)

register_slide_encoder(SlideEncoderSpec(
    name="care_tiny", patch_encoder="vit_demo_patch16_112",
    config=dataclasses.asdict(CareConfig(in_dim=192, hidden_dim=64, num_heads=4,
                                         subregion_depth=1, region_depth=1, mlp_ratio=2.0)),
    description="small CARE for tests and demos, on vit_demo_patch16_112 features",
), convert=convert_care_reference)(_build)
