"""Molecular encoders of stage II and the projection heads into the shared space.

RNA encoder (scGPT-like): one token per selected gene = gene-identity embedding + an encoding
of its (per-gene standardised) expression value; a CLS token; a Transformer encoder; the CLS
output is projected into the shared space.

Protein encoder: the 10 most abundant proteins of a sample as tokens = protein embedding (from
a user table such as ESM-2 vectors, linearly projected; else a learned table) + value
encoding; a small Transformer; CLS output projected.

Initialising the RNA encoder from a user checkpoint (e.g. converted scGPT weights):
``load_rna_checkpoint(encoder, uri, key_map)`` reads a ``.safetensors`` file (or a torch file
with ``weights_only=True``, never unpickling objects) and renames keys with ``key_map``
(source prefix -> our prefix, longest prefix first), e.g. for scGPT::

    {"encoder.embedding.": "gene_embedding.",      # gene token embedding (rows = our genes)
     "value_encoder.": "value_encoder.",
     "transformer_encoder.": "transformer."}

Gene rows are matched by position: the checkpoint's gene vocabulary must be re-ordered to the
selected genes first. Keys that do not match ours, or shapes that differ, are reported and
skipped; the loader returns the list of loaded keys.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from care_scale.exceptions import CheckpointError
from care_scale.storage import redact

log = logging.getLogger(__name__)


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear into the shared space (CLIP-style projection)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(in_dim, out_dim)
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ValueEncoder(nn.Module):
    """Scalar value -> dim vector (small MLP), as scGPT encodes expression values."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim),
                                 nn.LayerNorm(dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v.unsqueeze(-1))


class _TokenTransformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)
        return self.norm(self.transformer(x)[:, 0])


class RNAEncoder(_TokenTransformer):
    """Transformer over gene tokens. Input: expression (B, G), standardised per gene."""

    def __init__(self, n_genes: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 out_dim: int = 128):
        super().__init__(dim, layers, heads)
        self.gene_embedding = nn.Embedding(n_genes, dim)
        self.value_encoder = ValueEncoder(dim)
        self.proj = ProjectionHead(dim, out_dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(values.shape[1], device=values.device)
        tokens = self.gene_embedding(ids)[None] + self.value_encoder(values)
        return self.proj(self.encode_tokens(tokens))


class ProteinEncoder(_TokenTransformer):
    """Transformer over the top-k protein tokens. Input: ids (B, k) and values (B, k)."""

    def __init__(self, n_proteins: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 out_dim: int = 128, pretrained: np.ndarray | None = None):
        super().__init__(dim, layers, heads)
        if pretrained is not None:
            # Frozen user-supplied vectors (e.g. ESM-2), adapted by a learned projection.
            self.register_buffer("protein_table", torch.as_tensor(pretrained, dtype=torch.float32))
            self.protein_proj = nn.Linear(pretrained.shape[1], dim)
            self.protein_embedding = None
        else:
            self.protein_table = None
            self.protein_proj = None
            self.protein_embedding = nn.Embedding(n_proteins, dim)
        self.value_encoder = ValueEncoder(dim)
        self.proj = ProjectionHead(dim, out_dim)

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.protein_embedding is not None:
            emb = self.protein_embedding(ids)
        else:
            emb = self.protein_proj(self.protein_table[ids])
        return self.proj(self.encode_tokens(emb + self.value_encoder(values)))


def _read_state(uri: str, storage_options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch file (weights-only; the model zoo's reader)."""
    import fsspec

    from care_scale.models.checkpoints import _load_safetensors, _load_torch
    from care_scale.storage import to_fsspec

    try:
        with fsspec.open(uri, "rb", **to_fsspec(storage_options, uri)) as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"{redact(uri)}: no such checkpoint file") from None
    if str(uri).endswith(".safetensors"):
        return _load_safetensors(data, uri)[0]
    return _load_torch(data, uri)


def load_rna_checkpoint(encoder: nn.Module, uri: str, key_map: dict[str, str] | None = None, *,
                        storage_options: dict[str, Any] | None = None) -> list[str]:
    """Initialise ``encoder`` from a user checkpoint with a key mapping (see module doc)."""
    state = _read_state(uri, storage_options)
    prefixes = sorted((key_map or {}).items(), key=lambda kv: -len(kv[0]))
    own = encoder.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for src, dst in prefixes:
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        renamed[new] = value
    loaded, skipped = [], []
    for key, value in renamed.items():
        if key in own and tuple(own[key].shape) == tuple(value.shape):
            own[key] = value.to(own[key].dtype)
            loaded.append(key)
        else:
            skipped.append(key)
    if not loaded:
        raise CheckpointError(
            f"{redact(uri)}: no key matches the RNA encoder after the key mapping "
            f"(checkpoint keys e.g. {list(state)[:3]}, ours e.g. {list(own)[:3]})")
    encoder.load_state_dict(own)
    log.info("RNA encoder: %d tensors loaded from %s, %d skipped (e.g. %s)", len(loaded),
             redact(uri), len(skipped), skipped[:3])
    return loaded
