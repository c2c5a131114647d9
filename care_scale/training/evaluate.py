"""Measurements of what a slide encoder learned (used by the demos and the tests).

- ``probe_accuracy``: logistic regression on standardised slide embeddings, fit on training
  slides, scored on held-out slides (a quick form of the paper's linear probe; the
  classifiers are ``care_scale.evaluation.classifiers``'s, which ``care-scale probe`` runs
  with the full protocol);
- ``knn_accuracy``: cosine k-nearest-neighbour vote;
- ``retrieval_topk`` / ``molecular_retrieval``: slide -> molecular profile retrieval among
  held-out pairs (chance 1/n);
- ``region_purity``: share of patches whose adaptive region's majority ground-truth type is
  their own type (1.0 = every region is one tissue type).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from care_scale.training.data import SlideFeatures, collate


def _classifier(kind: str, *, n_train: int, seed: int = 0):
    """The two fixed classifiers every figure here uses: "probe" = standardised logistic
    regression (C = 1; the full protocol with its C grid is ``care-scale probe``), "knn" =
    cosine 5-nearest-neighbour vote on raw embeddings."""
    from care_scale.evaluation.classifiers import knn, logistic

    if kind == "probe":
        return logistic(C=1.0, max_iter=3000, standardize=True, seed=seed)
    return knn(k=min(5, n_train), metric="cosine", standardize=False)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, *, seed: int = 0) -> float:
    """Held-out accuracy of the "probe" classifier."""
    clf = _classifier("probe", n_train=len(train_y), seed=seed).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray) -> float:
    """Held-out accuracy of the "knn" classifier."""
    clf = _classifier("knn", n_train=len(train_y)).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def retrieval_topk(queries: np.ndarray, targets: np.ndarray, *, ks: tuple[int, ...] = (1, 5)
                   ) -> dict[int, float]:
    """Share of pairs i whose target i is among the k most cosine-similar targets of query i."""
    q = F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=-1)
    t = F.normalize(torch.as_tensor(np.asarray(targets), dtype=torch.float32), dim=-1)
    sim = q @ t.t()
    rank = (sim > sim.diagonal()[:, None]).sum(1)  # how many targets beat the true one
    return {k: float((rank < k).float().mean()) for k in ks}


def region_purity(regions: list[np.ndarray], patch_types: list[np.ndarray]) -> float:
    """Patch-weighted share of patches that carry their region's majority type."""
    agree = total = 0
    for reg, typ in zip(regions, patch_types):
        for r in np.unique(reg[reg >= 0]):
            counts = np.bincount(typ[reg == r])
            agree += int(counts.max())
            total += int(counts.sum())
    return agree / max(total, 1)


@torch.no_grad()
def molecular_retrieval(model: Any, meta: dict[str, Any], holdout: list[SlideFeatures],
                        cohort: Any, *, ks: tuple[int, ...] = (1, 5)
                        ) -> dict[str, dict[int, float]]:
    """Held-out slide -> RNA / protein top-k retrieval with a stage II aligner (``load_aligner``)
    on the generated cohort's profiles, normalised with the statistics the run stored."""
    mapping = dict(zip(cohort.mapping()["slide_id"], cohort.mapping()["sample_id"]))
    samples = [mapping[s.slide_id] for s in holdout]
    views = [{"features": s.features, "augmented": s.features, "grid": s.grid - s.grid.min(0)}
             for s in holdout]
    zs = torch.cat([model.embed_slides(collate(views[i:i + 8]))[0]
                    for i in range(0, len(views), 8)])
    out: dict[str, dict[int, float]] = {}
    if model.rna is not None:
        raw = cohort.rna.loc[samples, meta["genes"]].to_numpy(np.float32)
        z = (raw - np.asarray(meta["rna_mean"])) / np.asarray(meta["rna_std"])
        zm = model.embed_molecular("rna", {"rna": torch.as_tensor(z, dtype=torch.float32)})
        out["rna"] = retrieval_topk(zs.numpy(), zm.numpy(), ks=ks)
    if model.protein is not None:
        vals = cohort.protein.loc[samples, meta["proteins"]].to_numpy(np.float32)
        ids = np.argsort(-vals, axis=1, kind="stable")[:, :int(meta["n_proteins"])]
        v = (np.take_along_axis(vals, ids, 1) - meta["protein_mean"]) / meta["protein_std"]
        zp = model.embed_molecular("protein", {
            "protein_ids": torch.as_tensor(ids),
            "protein_values": torch.as_tensor(v, dtype=torch.float32)})
        out["protein"] = retrieval_topk(zs.numpy(), zp.numpy(), ks=ks)
    return out


def window_purity(slides: list[SlideFeatures], k: int) -> float:
    """Region purity of fixed k x k windows of the grid (what CARE's regions start from)."""
    regions = []
    for s in slides:
        g = (s.grid - s.grid.min(0)) // k
        regions.append(np.unique(g, axis=0, return_inverse=True)[1].reshape(-1))
    return region_purity(regions, [s.patch_types for s in slides])


def cv_balanced_accuracy(x: np.ndarray, y: np.ndarray, *, classifier: str, folds: int = 5,
                         seed: int = 0) -> float:
    """Balanced accuracy of out-of-fold predictions, stratified ``folds``-fold CV.

    ``classifier``: "probe" (standardised logistic regression, C = 1) or "knn" (cosine, k = 5).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from care_scale.evaluation.metrics import balanced_accuracy

    clf = _classifier(classifier, n_train=len(y) - len(y) // folds, seed=seed)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return balanced_accuracy(y, cross_val_predict(clf, x, y, cv=cv))


@torch.no_grad()
def encode_for_eval(encoder: torch.nn.Module, slides: list[SlideFeatures], *,
                    batch_size: int = 8) -> dict[str, Any]:
    """Slide and ROI embeddings (S, H), each slide's region_of_patch, and the slides' mean
    expected candidate rank (what the RSL pulls toward E*)."""
    encoder.eval()
    slide, roi, regions, ranks = [], [], [], []
    for i in range(0, len(slides), batch_size):
        chunk = slides[i:i + batch_size]
        b = collate([{"features": s.features, "augmented": s.features,
                      "grid": s.grid - s.grid.min(0)} for s in chunk])
        out = encoder(b["features"], b["num_valid"], b["grid"])
        slide.append(out.slide_embedding.float().numpy())
        roi.append(out.roi_embedding.float().numpy())
        regions.extend(out.region_of_patch[j, :len(s)].numpy() for j, s in enumerate(chunk))
        ranks.append(out.expected_rank.float().numpy())
    return {"slide": np.concatenate(slide), "roi": np.concatenate(roi), "regions": regions,
            "expected_rank": float(np.concatenate(ranks).mean())}


def slide_metrics(encoder: torch.nn.Module, train: list[SlideFeatures],
                  holdout: list[SlideFeatures]) -> dict[str, Any]:
    """Probe / kNN on the dominant type (held-out slides) and region purity (held-out)."""
    tr_x = encode_for_eval(encoder, train)["slide"]
    te = encode_for_eval(encoder, holdout)
    te_x, te_regions = te["slide"], te["regions"]
    tr_y = np.array([s.label for s in train])
    te_y = np.array([s.label for s in holdout])
    return {
        "probe_accuracy": probe_accuracy(tr_x, tr_y, te_x, te_y),
        "knn_accuracy": knn_accuracy(tr_x, tr_y, te_x, te_y),
        "region_purity": region_purity(te_regions, [s.patch_types for s in holdout]),
        "majority_baseline": float(np.bincount(te_y).max() / len(te_y)),
    }
