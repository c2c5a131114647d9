"""Measurements of what a slide encoder learned (used by the demos and the tests).

- ``probe_accuracy``: logistic regression on standardised slide embeddings, fit on training
  slides, scored on held-out slides (a quick form of the paper's linear probe; the
  classifiers are ``care_scale.evaluation.classifiers``'s, which ``care-scale probe`` runs
  with the full protocol);
- ``knn_accuracy``: cosine k-nearest-neighbour vote;
- ``retrieval_top1``: slide -> molecular profile retrieval among held-out pairs, with its
  chance level 1/n;
- ``region_purity``: share of patches whose adaptive region's majority ground-truth type is
  their own type (1.0 = every region is one tissue type).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from care_scale.training.data import SlideFeatures, collate


@torch.no_grad()
def run_encoder(encoder: torch.nn.Module, slides: list[SlideFeatures], *, batch_size: int = 8
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide embeddings (S, H) and each slide's region_of_patch, inference mode."""
    encoder.eval()
    embs, regions = [], []
    for i in range(0, len(slides), batch_size):
        chunk = slides[i:i + batch_size]
        views = [{"features": s.features, "augmented": s.features,
                  "grid": s.grid - s.grid.min(0)} for s in chunk]
        b = collate(views)
        out = encoder(b["features"], b["num_valid"], b["grid"])
        embs.append(out.slide_embedding.float().numpy())
        for j, s in enumerate(chunk):
            regions.append(out.region_of_patch[j, :len(s)].numpy())
    return np.concatenate(embs), regions


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, *, seed: int = 0) -> float:
    """Accuracy of the standardised logistic regression (C = 1; the full protocol with its C
    grid is ``care-scale probe``, ``care_scale.evaluation``)."""
    from care_scale.evaluation.classifiers import logistic

    clf = logistic(C=1.0, max_iter=3000, standardize=True, seed=seed).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, k: int = 5) -> float:
    """Accuracy of a cosine k-nearest-neighbour majority vote on raw embeddings."""
    from care_scale.evaluation.classifiers import knn

    clf = knn(k=min(k, len(train_y)), metric="cosine", standardize=False).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def retrieval_top1(slide_emb: np.ndarray, mol_emb: np.ndarray) -> tuple[float, float]:
    """Top-1 accuracy of retrieving pair i's molecular embedding from slide i; and chance."""
    s = F.normalize(torch.as_tensor(slide_emb, dtype=torch.float32), dim=-1)
    m = F.normalize(torch.as_tensor(mol_emb, dtype=torch.float32), dim=-1)
    hits = (s @ m.t()).argmax(1) == torch.arange(len(s))
    return float(hits.float().mean()), 1.0 / len(s)


def region_purity(regions: list[np.ndarray], patch_types: list[np.ndarray]) -> float:
    """Patch-weighted share of patches that carry their region's majority type."""
    agree = total = 0
    for reg, typ in zip(regions, patch_types):
        for r in np.unique(reg[reg >= 0]):
            counts = np.bincount(typ[reg == r])
            agree += int(counts.max())
            total += int(counts.sum())
    return agree / max(total, 1)


def slide_metrics(encoder: torch.nn.Module, train: list[SlideFeatures],
                  holdout: list[SlideFeatures]) -> dict[str, Any]:
    """Probe / kNN on the dominant type (held-out slides) and region purity (held-out)."""
    tr_x, _ = run_encoder(encoder, train)
    te_x, te_regions = run_encoder(encoder, holdout)
    tr_y = np.array([s.label for s in train])
    te_y = np.array([s.label for s in holdout])
    return {
        "probe_accuracy": probe_accuracy(tr_x, tr_y, te_x, te_y),
        "knn_accuracy": knn_accuracy(tr_x, tr_y, te_x, te_y),
        "region_purity": region_purity(te_regions, [s.patch_types for s in holdout]),
        "majority_baseline": float(np.bincount(te_y).max() / len(te_y)),
    }
