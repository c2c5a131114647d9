"""The "arrangement" cohort: slide labels that need region structure, so pooling cannot solve them.

A feature-level cohort (no pixels) like :mod:`care_scale.synthetic.cohort`, built so that the
answer lives in *where* patches are, not in *which* patches a slide has on average.

Tissue types (patch feature = ``prototype[type] + patch_noise * N(0, I) + slide offset``; the
feature of a patch depends on its own type only, never on its position or neighbours):

- 0 stroma, 1 normal epithelium: the background, irregular coherent blobs;
- 2 tumour: a share ``q ~ U(0.15, 0.25)`` of every slide's patches;
- 3 immune focus (F) and 4 its companion (M), or 5 and 6 (A, B): ``n_f = f * N`` patches each,
  ``f ~ U(0.04, 0.07)``. The prototypes satisfy ``p_M = p_A + p_B - p_F`` exactly.

Two binary labels per slide, each exactly balanced over the cohort and independent:

- ``arrangement``: 1 = the tumour patches form ONE coherent focus (the n_T tissue patches
  nearest a random centre), 0 = the same number of tumour patches scattered uniformly;
- ``focus``: 1 = a small coherent focus of F (n_f patches nearest a centre) plus n_f scattered
  M patches, 0 = n_f scattered A and n_f scattered B patches.

Why mean pooling scores 0.5 balanced accuracy by construction: a slide's mean feature is
``sum_k n_k p_k / N + mean noise + offset``. For ``arrangement`` the counts n_k have the same
distribution in both classes and features ignore position, so the two classes' mean features
(indeed, the multisets of patch features) are identically distributed: no function of them,
mean pooling or attention pooling (ABMIL), beats chance; only a model that uses the grid
can. For ``focus`` the multiset differs (F/M vs A/B patches), but the mean does not:
``n_f (p_F + p_M) = n_f (p_A + p_B)``, so the mean is again identically distributed, while a
model that weighs single patches (ABMIL, an upper reference) can find the focus. The batch
offset (a few fixed "stain" directions) is drawn independently of both labels.

Molecular profiles come from region-level content, so stage II has something spatial to align
to: with ``comp`` the share of each type and ``coh`` the share of the slide covered by each
type's largest 8-connected component, ``rna = base + 3 A comp + 3 B coh + noise`` and
``protein = base + 1.5 (C comp + D coh) + noise`` (A, B, C, D fixed random maps). Both labels
are thus molecular-dependent: ``coh[tumour]`` is large only for a coherent tumour focus and
``comp[F]`` is non-zero only for focus slides.

Fixed by ``seed`` and never tuned to a model's results: the parameters above were chosen before
any training run measured on this cohort.
"""

from __future__ import annotations

import numpy as np

from care_scale.synthetic.cohort import PATCH_STEP, CohortSlide, FeatureCohort

N_TYPES = 7
TUMOUR, FOCUS, COMPANION, ALT_A, ALT_B = 2, 3, 4, 5, 6
LABELS = ("arrangement", "focus")


def _tissue(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) grid positions (x, y) of a wobbly elliptic tissue piece and background types."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 2 * np.pi))
    r = np.sqrt(((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2)
    ys, xs = np.nonzero(r <= 1.05 * wobble)
    pos = np.stack([xs, ys], 1).astype(np.int64)
    n_seeds = int(rng.integers(4, 8))
    seeds = np.stack([rng.uniform(0, w, n_seeds), rng.uniform(0, h, n_seeds)], 1)
    seed_types = rng.integers(0, 2, n_seeds)
    d = np.linalg.norm(pos[:, None, :] - seeds[None], axis=-1)
    return pos, seed_types[np.argmin(d, axis=1)].astype(np.int64)


def _compact(rng: np.random.Generator, pos: np.ndarray, free: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` free patches nearest a random free centre (a coherent focus)."""
    cand = np.nonzero(free)[0]
    centre = pos[rng.choice(cand)]
    d = np.linalg.norm(pos[cand] - centre, axis=1) + rng.uniform(0, 0.3, len(cand))
    return cand[np.argsort(d, kind="stable")[:n]]


def _scatter(rng: np.random.Generator, free: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(np.nonzero(free)[0], n, replace=False)


def largest_component_share(pos: np.ndarray, types: np.ndarray, n_types: int) -> np.ndarray:
    """(n_types,) share of the slide's patches in each type's largest 8-connected component."""
    from scipy.ndimage import label

    lo = pos.min(0)
    shape = tuple((pos.max(0) - lo + 1)[::-1])
    out = np.zeros(n_types)
    for k in range(n_types):
        sel = types == k
        if not sel.any():
            continue
        img = np.zeros(shape, bool)
        p = pos[sel] - lo
        img[p[:, 1], p[:, 0]] = True
        lab, n = label(img, structure=np.ones((3, 3)))
        out[k] = np.bincount(lab.ravel())[1:].max() / len(pos) if n else 0.0
    return out


def _balanced(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % 2).astype(np.int64)


def make_region_cohort(
    n_slides: int = 160,
    *,
    embed_dim: int = 192,
    grid_range: tuple[int, int] = (12, 16),
    n_genes: int = 200,
    n_proteins: int = 40,
    patch_noise: float = 1.0,
    prototype_scale: float = 0.5,
    batch_effect_dims: int = 4,
    batch_effect_scale: float = 2.0,
    rna_noise: float = 0.1,
    protein_noise: float = 0.1,
    seed: int = 0,
) -> FeatureCohort:
    """Generate the arrangement cohort (see the module doc). ``CohortSlide.dominant_type``
    holds the ``arrangement`` label; ``label_sets`` both labels."""
    import pandas as pd

    rng = np.random.default_rng([seed, 2026])
    protos = rng.standard_normal((N_TYPES, embed_dim)) * prototype_scale
    protos[COMPANION] = protos[ALT_A] + protos[ALT_B] - protos[FOCUS]
    batch_dirs = np.linalg.qr(rng.standard_normal((embed_dim, batch_effect_dims)))[0].T
    maps = {k: rng.standard_normal(shape) for k, shape in (
        ("rna_comp", (n_genes, N_TYPES)), ("rna_coh", (n_genes, N_TYPES)),
        ("prot_comp", (n_proteins, N_TYPES)), ("prot_coh", (n_proteins, N_TYPES)))}
    rna_base = rng.uniform(2.0, 6.0, n_genes)
    prot_base = rng.uniform(3.0, 5.0, n_proteins)
    arrangement = _balanced(rng, n_slides)
    focus = _balanced(rng, n_slides)
    gene_names = [f"GENE{i:04d}" for i in range(n_genes)]
    protein_names = [f"PROT{i:03d}" for i in range(n_proteins)]

    slides: list[CohortSlide] = []
    rna_rows, prot_rows = [], []
    for i in range(n_slides):
        srng = np.random.default_rng([seed, i, 7])
        h, w = (int(v) for v in srng.integers(grid_range[0], grid_range[1] + 1, 2))
        pos, types = _tissue(srng, h, w)
        n = len(pos)
        free = np.ones(n, bool)
        n_t = round(srng.uniform(0.15, 0.25) * n)
        idx = _compact(srng, pos, free, n_t) if arrangement[i] else _scatter(srng, free, n_t)
        types[idx], free[idx] = TUMOUR, False
        n_f = round(srng.uniform(0.04, 0.07) * n)
        if focus[i]:
            idx = _compact(srng, pos, free, n_f)
            types[idx], free[idx] = FOCUS, False
            idx = _scatter(srng, free, n_f)
            types[idx], free[idx] = COMPANION, False
        else:
            for k in (ALT_A, ALT_B):
                idx = _scatter(srng, free, n_f)
                types[idx], free[idx] = k, False
        comp = np.bincount(types, minlength=N_TYPES) / n
        coh = largest_component_share(pos, types, N_TYPES)
        offset = (srng.standard_normal(batch_effect_dims) * batch_effect_scale) @ batch_dirs
        feats = protos[types] + patch_noise * srng.standard_normal((n, embed_dim)) + offset
        slide_id, sample_id = f"slide-{i:04d}", f"sample-{i:04d}"
        slides.append(CohortSlide(
            slide_id=slide_id, sample_id=sample_id, features=feats.astype(np.float32),
            coords=pos * PATCH_STEP, patch_types=types, composition=comp,
            dominant_type=int(arrangement[i])))
        rna_rows.append(rna_base + 3.0 * (maps["rna_comp"] @ comp) + 3.0 * (maps["rna_coh"] @ coh)
                        + rna_noise * srng.standard_normal(n_genes))
        prot_rows.append(prot_base + 1.5 * (maps["prot_comp"] @ comp + maps["prot_coh"] @ coh)
                         + protein_noise * srng.standard_normal(n_proteins))
    ids = [s.sample_id for s in slides]
    return FeatureCohort(
        slides=slides,
        rna=pd.DataFrame(np.asarray(rna_rows, np.float32), index=ids, columns=gene_names),
        protein=pd.DataFrame(np.asarray(prot_rows, np.float32), index=ids,
                             columns=protein_names),
        gene_names=gene_names, protein_names=protein_names, n_types=N_TYPES,
        embed_dim=embed_dim, seed=seed,
        label_sets={"arrangement": arrangement, "focus": focus})
