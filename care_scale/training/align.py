"""Stage II: CLIP-style alignment of slide embeddings with RNA, then with protein profiles.

One run, two phases (``align.phases``, default ``["rna", "protein"]``): each phase pairs the
slides that have that modality, and trains the CARE encoder (it stays trainable, so the
contrastive signal reaches region construction), a slide projection and the molecular encoder
with a symmetric InfoNCE loss and a learnable temperature. Embeddings are gathered across
workers (with gradients) so every worker contrasts against the global batch.

The run's extra artifact ``aligner.safetensors`` + ``aligner.json`` holds the projection
heads, molecular encoders and the normalisation of the molecular inputs (for retrieval).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from care_scale.exceptions import TrainingDataError
from care_scale.training.config import Stage2Config
from care_scale.training.data import (
    SlideFeatures,
    StepSampler,
    ViewParams,
    collate,
    feature_scale,
    make_view,
    shift_directions,
)
from care_scale.training.encoders import (
    ProjectionHead,
    ProteinEncoder,
    RNAEncoder,
    load_rna_checkpoint,
)
from care_scale.training.molecular import (
    MolecularTable,
    pair_slides,
    read_gene_list,
    read_mapping,
    read_molecular_table,
    read_protein_embeddings,
    select_genes,
    table_from_frame,
    top_proteins,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MolecularInputs:
    """Selected, normalised molecular inputs keyed by sample id (what the encoders eat)."""

    genes: list[str]
    rna: dict[str, np.ndarray]  # sample -> (G,) standardised expression
    rna_mean: np.ndarray
    rna_std: np.ndarray
    proteins: list[str]
    protein_ids: dict[str, np.ndarray]  # sample -> (k,) int64 index into ``proteins``
    protein_values: dict[str, np.ndarray]  # sample -> (k,) standardised abundance
    protein_mean: float
    protein_std: float
    protein_table: np.ndarray | None  # (P, E) user protein embeddings
    mapping: dict[str, str] | None
    mapping_uri: str | None
    rna_uri: str
    protein_uri: str


def load_molecular(cfg: Stage2Config, cohort: Any = None, *,
                   fit_slides: list[str] | None = None) -> MolecularInputs | None:
    """Read, validate and normalise the RNA / protein tables of the config (or the cohort's).

    ``fit_slides``: the training slides. Every statistic (which genes vary most, the
    standardisation of RNA and protein values) is computed over their samples only, so
    nothing about held-out slides leaks into training or into the evaluation's inputs.
    """
    m = cfg.molecular
    opts = m.storage_options or None
    if cohort is not None:
        rna = table_from_frame(cohort.rna.rename_axis("sample_id"), uri="<synthetic rna>")
        prot = table_from_frame(cohort.protein.rename_axis("sample_id"),
                                uri="<synthetic protein>")
        mapping = dict(zip(cohort.mapping()["slide_id"], cohort.mapping()["sample_id"]))
        mapping_uri = "<synthetic mapping>"
        gene_list = None
        prot_emb_uri = None
    else:
        if "rna" in cfg.align.phases and not m.rna:
            raise TrainingDataError("stage II phase 'rna' needs molecular.rna (a table path)")
        if "protein" in cfg.align.phases and not m.protein:
            raise TrainingDataError("stage II phase 'protein' needs molecular.protein")
        rna = read_molecular_table(m.rna, sample_id_column=m.sample_id_column, log1p=m.log1p,
                                   storage_options=opts) if m.rna else None
        prot = read_molecular_table(m.protein, sample_id_column=m.sample_id_column,
                                    storage_options=opts) if m.protein else None
        mapping = read_mapping(m.mapping, storage_options=opts) if m.mapping else None
        mapping_uri = m.mapping
        gene_list = read_gene_list(m.gene_list, storage_options=opts) if m.gene_list else None
        prot_emb_uri = m.protein_embeddings
    fit = None if fit_slides is None else {
        (mapping or {}).get(s, s) for s in fit_slides}
    genes, rna_vals, rna_mean, rna_std = [], {}, np.zeros(0), np.ones(0)
    if rna is not None:
        rows = _fit_rows(rna.samples, fit)
        rna = select_genes(rna, gene_list=gene_list, gene_list_uri=m.gene_list or "",
                           n_genes=m.n_genes, fit_rows=rows)
        rna_mean = rna.values[rows].mean(0)
        rna_std = rna.values[rows].std(0) + 1e-6
        z = (rna.values - rna_mean) / rna_std
        genes = rna.features
        rna_vals = dict(zip(rna.samples, z.astype(np.float32)))
    proteins, pids, pvals, pmean, pstd, ptable = [], {}, {}, 0.0, 1.0, None
    if prot is not None:
        ids, vals = top_proteins(prot, m.n_proteins)
        rows = _fit_rows(prot.samples, fit)
        pmean, pstd = float(vals[rows].mean()), float(vals[rows].std() + 1e-6)
        proteins = prot.features
        pids = dict(zip(prot.samples, ids))
        pvals = dict(zip(prot.samples, ((vals - pmean) / pstd).astype(np.float32)))
        if prot_emb_uri:
            ptable = read_protein_embeddings(prot_emb_uri, proteins, storage_options=opts)
    return MolecularInputs(
        genes=genes, rna=rna_vals, rna_mean=rna_mean, rna_std=rna_std, proteins=proteins,
        protein_ids=pids, protein_values=pvals, protein_mean=pmean, protein_std=pstd,
        protein_table=ptable, mapping=mapping, mapping_uri=mapping_uri,
        rna_uri=rna.uri if rna is not None else "", protein_uri=prot.uri if prot is not None else "")


def _fit_rows(samples: list[str], fit: set[str] | None) -> np.ndarray:
    """Row indices the statistics are computed over (all rows when no split is given)."""
    if fit is None:
        return np.arange(len(samples))
    rows = np.array([i for i, smp in enumerate(samples) if smp in fit], np.int64)
    if len(rows) < 2:
        raise TrainingDataError(
            f"only {len(rows)} training sample(s) have molecular data; need at least 2")
    return rows


def _as_table(uri: str, samples: dict[str, np.ndarray]) -> MolecularTable:
    names = list(samples)
    return MolecularTable(uri=uri, samples=names, features=[],
                          values=np.zeros((len(names), 0), np.float32))


class AlignModel(nn.Module):
    """CARE encoder + slide projection + RNA / protein encoders + learnable temperatures."""

    def __init__(self, encoder: nn.Module, *, n_genes: int, n_proteins: int,
                 cfg: Stage2Config, protein_table: np.ndarray | None = None):
        super().__init__()
        a = cfg.align
        self.encoder = encoder
        self.slide_proj = ProjectionHead(int(encoder.config.hidden_dim), a.embed_dim)
        self.rna = RNAEncoder(n_genes, a.rna_dim, a.rna_layers, a.rna_heads,
                              a.embed_dim) if n_genes else None
        self.protein = ProteinEncoder(n_proteins, a.protein_dim, a.protein_layers,
                                      a.protein_heads, a.embed_dim,
                                      pretrained=protein_table) if n_proteins else None
        init = math.log(1.0 / a.init_temperature)
        self.logit_scale = nn.Parameter(torch.full((2,), init))  # [rna, protein]

    def embed_slides(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        out = self.encoder(batch["features"], batch["num_valid"], batch["grid"],
                           augmented=batch.get("augmented"))
        return F.normalize(self.slide_proj(out.slide_embedding), dim=-1), out

    def embed_molecular(self, phase: str, mol: dict[str, torch.Tensor]) -> torch.Tensor:
        if phase == "rna":
            z = self.rna(mol["rna"])
        else:
            z = self.protein(mol["protein_ids"], mol["protein_values"])
        return F.normalize(z, dim=-1)

    def forward(self, phase: str, batch: dict[str, torch.Tensor], mol: dict[str, torch.Tensor]):
        zs, out = self.embed_slides(batch)
        zm = self.embed_molecular(phase, mol)
        scale = self.logit_scale[0 if phase == "rna" else 1].clamp(max=math.log(100.0)).exp()
        return zs, zm, scale, out


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather with gradients (global negatives); identity without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), 0)


def clip_loss(zs: torch.Tensor, zm: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor,
                                                                                  float]:
    """Symmetric InfoNCE over the global batch; returns (loss, in-batch top-1 accuracy)."""
    gs, gm = _gather(zs), _gather(zm)
    logits = scale * gs @ gm.t()
    labels = torch.arange(len(gs), device=gs.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    acc = float((logits.argmax(1) == labels).float().mean())
    return loss, acc


class AlignTask:
    """Everything stage II needs on one worker: paired data per phase, model, loss."""

    stage = "stage2"

    def __init__(self, cfg: Stage2Config, *, rank: int, world: int, device: torch.device,
                 slides: list[SlideFeatures] | None = None):
        from care_scale.models import create_slide_encoder
        from care_scale.training.data import load_slides_for, model_in_dim, synthetic_slides

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        cohort = None
        if cfg.data.synthetic:
            _, cohort = synthetic_slides(cfg.data, embed_dim=model_in_dim(cfg.model))
        held_out: list[SlideFeatures] = []
        if slides is None:
            slides, held_out = load_slides_for(cfg, train_only=False)
        self.mol = load_molecular(cfg, cohort, fit_slides=[s.slide_id for s in slides])
        by_id = {s.slide_id: s for s in slides}
        # Pair over all slides (held-out ones too) so that the mismatch counts are about the
        # user's data, then train on the training slides only.
        all_ids = list(by_id) + [s.slide_id for s in held_out]
        self.pairs: dict[str, list[tuple[SlideFeatures, str]]] = {}
        m = cfg.molecular
        for phase in cfg.align.phases:
            samples = self.mol.rna if phase == "rna" else self.mol.protein_ids
            uri = self.mol.rna_uri if phase == "rna" else self.mol.protein_uri
            kept, sample_ids = pair_slides(
                all_ids, _as_table(uri, samples), mapping=self.mol.mapping,
                mapping_uri=self.mol.mapping_uri, allow_unpaired=m.allow_unpaired)
            self.pairs[phase] = [(by_id[s], smp) for s, smp in zip(kept, sample_ids)
                                 if s in by_id]
        self.scale = feature_scale(slides)
        self.view = ViewParams(crop_scale=(1.0, 1.0), feature_noise=cfg.align.feature_noise,
                               feature_dropout=0.0, global_shift=cfg.align.global_shift,
                               shift_basis=shift_directions(slides, cfg.align.shift_rank),
                               shift_mix=cfg.align.shift_mix,
                               max_patches=cfg.align.max_patches)
        steps = cfg.align.phase_steps or _even_split(cfg.optim.steps, len(cfg.align.phases))
        self.phase_bounds = np.cumsum([0, *steps]).tolist()
        self.samplers = {
            phase: StepSampler(len(self.pairs[phase]), batch_size=cfg.optim.batch_size,
                               world_size=world, rank=rank, seed=cfg.run.seed + 101 * i,
                               accum=cfg.optim.grad_accum_steps)
            for i, phase in enumerate(cfg.align.phases)}
        encoder = create_slide_encoder(cfg.model.name, cfg.model.checkpoint,
                                       storage_options=cfg.data.storage_options or None,
                                       init_seed=cfg.model.init_seed, **cfg.model.overrides)
        self.lambda_rsl = (cfg.align.lambda_rsl if cfg.align.lambda_rsl is not None
                           else float(encoder.config.lambda_rsl))
        self.align_model = AlignModel(encoder, n_genes=len(self.mol.genes),
                                      n_proteins=len(self.mol.proteins), cfg=cfg,
                                      protein_table=self.mol.protein_table).to(device)
        if cfg.align.rna_checkpoint and self.align_model.rna is not None:
            load_rna_checkpoint(self.align_model.rna, cfg.align.rna_checkpoint,
                                cfg.align.rna_key_map, storage_options=m.storage_options or None)
        self.model: nn.Module = self.align_model
        log.info("stage II: pairs per phase %s", {k: len(v) for k, v in self.pairs.items()})

    @property
    def trainable(self) -> nn.Module:
        return self.align_model

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        from care_scale.training.optim import param_groups

        named = list(self.align_model.named_parameters())
        return param_groups([(n, p) for n, p in named if n.startswith("encoder.")],
                            lr_scale=self.cfg.align.slide_lr_scale,
                            region_lr_scale=self.cfg.optim.region_lr_scale) + \
            param_groups([(n, p) for n, p in named if not n.startswith("encoder.")])

    def phase_of(self, step: int) -> tuple[int, int, int]:
        b = self.phase_bounds
        for i in range(len(b) - 1):
            if b[i] <= step < b[i + 1]:
                return i, b[i], b[i + 1] - b[i]
        return len(b) - 2, b[-2], b[-1] - b[-2]

    def molecular_batch(self, phase: str, sample_ids: list[str]) -> dict[str, torch.Tensor]:
        to = self.device
        if phase == "rna":
            return {"rna": torch.from_numpy(np.stack([self.mol.rna[s] for s in sample_ids]))
                    .to(to)}
        return {"protein_ids": torch.from_numpy(np.stack(
                    [self.mol.protein_ids[s] for s in sample_ids])).to(to),
                "protein_values": torch.from_numpy(np.stack(
                    [self.mol.protein_values[s] for s in sample_ids])).to(to)}

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        pi, start, _ = self.phase_of(step)
        phase = self.cfg.align.phases[pi]
        sampler = self.samplers[phase]
        idx = sampler.indices(step - start, micro)
        rng = sampler.rng(step, micro)
        items = [self.pairs[phase][i] for i in idx]
        batch = collate([make_view(s, rng, self.view, self.scale) for s, _ in items])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mol = self.molecular_batch(phase, [smp for _, smp in items])
        zs, zm, scale, out = self.model(phase, batch, mol)
        loss, acc = clip_loss(zs, zm, scale)
        total = loss + self.lambda_rsl * out.rsl_loss
        return total, {"loss_clip": float(loss), "loss_rsl": float(out.rsl_loss),
                       "expected_rank": float(out.expected_rank.detach().float().mean()),
                       "batch_top1": acc, "temperature": float(1 / scale), "phase": float(pi)}

    def after_step(self, step: int) -> None:
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        return None

    def final_encoder(self) -> nn.Module:
        return self.align_model.encoder

    def final_extras(self) -> dict[str, Any]:
        """Aligner weights and the molecular input description, for retrieval."""
        meta = {"genes": self.mol.genes, "rna_mean": self.mol.rna_mean.tolist(),
                "rna_std": self.mol.rna_std.tolist(), "proteins": self.mol.proteins,
                "protein_mean": self.mol.protein_mean, "protein_std": self.mol.protein_std,
                "n_proteins": self.cfg.molecular.n_proteins,
                "align": dataclasses.asdict(self.cfg.align)}
        state = {k: v.detach().cpu().contiguous() for k, v in
                 self.align_model.state_dict().items() if not k.startswith("encoder.")}
        return {"aligner": (state, meta)}


def _even_split(total: int, parts: int) -> list[int]:
    base = [total // parts] * parts
    for i in range(total - sum(base)):
        base[i] += 1
    return base


def load_aligner(uri: str, encoder: nn.Module, *, cfg: Stage2Config,
                 storage_options: dict[str, Any] | None = None
                 ) -> tuple[AlignModel, dict[str, Any]]:
    """Rebuild the stage II aligner around ``encoder`` from ``<uri>/aligner.*``."""
    import json

    import fsspec
    from safetensors.torch import load

    from care_scale.storage import join, to_fsspec

    with fsspec.open(join(uri, "aligner.json"), "r", **to_fsspec(storage_options, uri)) as fh:
        meta = json.load(fh)
    with fsspec.open(join(uri, "aligner.safetensors"), "rb",
                     **to_fsspec(storage_options, uri)) as fh:
        state = load(fh.read())
    table = state.get("protein.protein_table")
    model = AlignModel(encoder, n_genes=len(meta["genes"]), n_proteins=len(meta["proteins"]),
                       cfg=cfg, protein_table=None if table is None else table.numpy())
    missing = model.load_state_dict({**{f"encoder.{k}": v for k, v in
                                        encoder.state_dict().items()}, **state}, strict=False)
    if missing.missing_keys:
        raise TrainingDataError(f"{uri}: aligner misses {missing.missing_keys[:3]}")
    return model.eval(), meta
