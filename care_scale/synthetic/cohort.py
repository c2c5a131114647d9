"""A feature-level cohort with a known answer, for training tests and demos.

No pixels: each slide is a grid of patch *features*, so a cohort of a hundred slides is made
in well under a second. What is known about every slide:

- the tissue type of every patch: K types laid out as irregular, spatially coherent blobs
  (nearest-seed partition of the tissue under a randomly warped distance);
- its tissue composition (share of each type) and dominant type (the probe label);
- paired molecular profiles derived from the composition: RNA = a fixed random linear map of
  the composition plus noise (named genes), protein abundance likewise (named proteins).

Patch features are ``prototype[type] + noise + slide_offset``. The slide offset lives in a few
fixed "batch effect" directions and is large: a random (untrained) slide encoder is dominated
by it, while an encoder trained with feature-space augmentations that imitate it (stage I) or
with molecular pairing (stage II) learns to look past it. That is what the tests measure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

# Level-0 pixel step between neighbouring patches (256 px patches at level 0).
PATCH_STEP = 256


@dataclasses.dataclass
class CohortSlide:
    """One generated slide: features, coordinates and its ground truth."""

    slide_id: str
    sample_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64 level-0 top-left pixels (x, y)
    patch_types: np.ndarray  # (N,) int64 ground-truth tissue type per patch
    composition: np.ndarray  # (K,) float64, sums to 1
    dominant_type: int

    @property
    def grid(self) -> np.ndarray:
        return self.coords // PATCH_STEP


@dataclasses.dataclass
class FeatureCohort:
    """A generated cohort; ``rna`` / ``protein`` are sample x feature tables (pandas)."""

    slides: list[CohortSlide]
    rna: Any  # pandas.DataFrame, index = sample_id, columns = gene names
    protein: Any  # pandas.DataFrame, index = sample_id, columns = protein ids
    gene_names: list[str]
    protein_names: list[str]
    n_types: int
    embed_dim: int
    seed: int
    # Named binary slide labels besides the dominant type (the arrangement cohort's).
    label_sets: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.dominant_type for s in self.slides], dtype=np.int64)

    @property
    def compositions(self) -> np.ndarray:
        return np.stack([s.composition for s in self.slides])

    def mapping(self) -> Any:
        import pandas as pd

        return pd.DataFrame(
            {"slide_id": [s.slide_id for s in self.slides],
             "sample_id": [s.sample_id for s in self.slides]}
        )

    def write(self, out_dir: str | Path, *, feature_format: str = "h5") -> dict[str, str]:
        """Write feature files (CLAM-style h5), rna.csv, protein.csv, mapping.csv, labels.csv,
        a GMT gene-set file and a protein-embedding table; returns their paths by name."""
        import h5py
        import pandas as pd

        out = Path(out_dir)
        (out / "features").mkdir(parents=True, exist_ok=True)
        if feature_format != "h5":
            raise ValueError(f"feature_format {feature_format!r}: only 'h5' is written")
        for s in self.slides:
            with h5py.File(out / "features" / f"{s.slide_id}.h5", "w") as fh:
                fh.create_dataset("features", data=s.features)
                ds = fh.create_dataset("coords", data=s.coords)
                ds.attrs["patch_size"] = PATCH_STEP
                ds.attrs["patch_level"] = 0
        paths = {
            "features_dir": str(out / "features"),
            "rna": str(out / "rna.csv"),
            "protein": str(out / "protein.csv"),
            "mapping": str(out / "mapping.csv"),
            "labels": str(out / "labels.csv"),
            "gmt": str(out / "genesets.gmt"),
            "protein_embeddings": str(out / "protein_embeddings.csv"),
        }
        self.rna.rename_axis("sample_id").to_csv(paths["rna"])
        self.protein.rename_axis("sample_id").to_csv(paths["protein"])
        self.mapping().to_csv(paths["mapping"], index=False)
        comp = self.compositions
        labels = pd.DataFrame({"slide_id": [s.slide_id for s in self.slides],
                               "dominant_type": self.labels})
        for k in range(self.n_types):
            labels[f"share_type{k}"] = comp[:, k]
        labels.to_csv(paths["labels"], index=False)
        # Two gene sets in MSigDB GMT layout (name, description, genes...); each also names a
        # gene the table lacks, as real GMT files do.
        half = len(self.gene_names) // 2
        with open(paths["gmt"], "w") as fh:
            fh.write("\t".join(["SET_A", "http://example.org/A", *self.gene_names[:half],
                                "NOT_MEASURED_1"]) + "\n")
            fh.write("\t".join(["SET_B", "http://example.org/B", *self.gene_names[half:],
                                "NOT_MEASURED_2"]) + "\n")
        rng = np.random.default_rng(self.seed + 7)
        emb = pd.DataFrame(rng.standard_normal((len(self.protein_names), 16)).astype(np.float32),
                           index=pd.Index(self.protein_names, name="protein_id"))
        emb.to_csv(paths["protein_embeddings"])
        return paths


def _blob_types(
    rng: np.random.Generator, h: int, w: int, n_types: int, dominant: int, n_seeds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue mask and per-patch type for an h x w grid: irregular coherent blobs."""
    yy, xx = np.mgrid[0:h, 0:w]
    # Tissue outline: a jittered ellipse, so slides have irregular borders and varying N.
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 2 * np.pi)) + 0.1 * np.cos(
        5 * ang + rng.uniform(0, 2 * np.pi))
    r = np.sqrt(((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2)
    mask = r <= 1.05 * wobble
    # Seeds of blobs; the dominant type gets about half of the seeds.
    seeds = np.stack([rng.uniform(0, h, n_seeds), rng.uniform(0, w, n_seeds)], 1)
    probs = np.full(n_types, 0.5 / max(n_types - 1, 1))
    probs[dominant] = 0.5
    seed_types = rng.choice(n_types, size=n_seeds, p=probs)
    seed_types[0] = dominant
    weights = rng.uniform(0.6, 1.6, n_seeds)  # some blobs grow larger than others
    # Warped distance: smooth random displacement fields make blob borders irregular.
    fy = 1.5 * np.sin(xx / rng.uniform(2, 4) + rng.uniform(0, 6)) * rng.uniform(0.5, 1.5)
    fx = 1.5 * np.cos(yy / rng.uniform(2, 4) + rng.uniform(0, 6)) * rng.uniform(0.5, 1.5)
    py, px = yy + fy, xx + fx
    d = np.sqrt((py[..., None] - seeds[:, 0]) ** 2 + (px[..., None] - seeds[:, 1]) ** 2)
    owner = np.argmin(d / weights, axis=-1)
    return mask, seed_types[owner]


def make_feature_cohort(
    n_slides: int = 96,
    *,
    embed_dim: int = 32,
    n_types: int = 4,
    grid_range: tuple[int, int] = (8, 13),
    n_genes: int = 200,
    n_proteins: int = 40,
    patch_noise: float = 1.0,
    prototype_scale: float = 0.5,
    batch_effect_dims: int = 8,
    batch_effect_scale: float = 15.0,
    rna_noise: float = 0.05,
    protein_noise: float = 0.05,
    separate_sample_ids: bool = True,
    seed: int = 0,
) -> FeatureCohort:
    """Generate ``n_slides`` slides of patch features with a known answer (see module doc).

    Fixed across the cohort (from ``seed``): type prototypes, batch-effect directions, the
    composition -> RNA and composition -> protein maps. Per slide: grid size, blobs, noise,
    batch-effect offset. ``separate_sample_ids`` gives molecular samples their own ids (so a
    mapping file is needed); otherwise sample id == slide id.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((n_types, embed_dim)) * prototype_scale
    batch_dirs = np.linalg.qr(rng.standard_normal((embed_dim, batch_effect_dims)))[0].T
    rna_map = rng.standard_normal((n_genes, n_types))
    rna_base = rng.uniform(2.0, 6.0, n_genes)
    prot_map = rng.standard_normal((n_proteins, n_types))
    prot_base = rng.uniform(3.0, 5.0, n_proteins)
    gene_names = [f"GENE{i:04d}" for i in range(n_genes)]
    protein_names = [f"PROT{i:03d}" for i in range(n_proteins)]

    slides: list[CohortSlide] = []
    rna_rows, prot_rows = [], []
    for i in range(n_slides):
        srng = np.random.default_rng([seed, i])
        h, w = (int(v) for v in srng.integers(grid_range[0], grid_range[1] + 1, 2))
        dominant = int(srng.integers(n_types))
        mask, types = _blob_types(srng, h, w, n_types, dominant, int(srng.integers(4, 9)))
        ys, xs = np.nonzero(mask)
        ptypes = types[ys, xs].astype(np.int64)
        comp = np.bincount(ptypes, minlength=n_types) / len(ptypes)
        offset = (srng.standard_normal(batch_effect_dims) * batch_effect_scale) @ batch_dirs
        feats = (prototypes[ptypes] + patch_noise * srng.standard_normal((len(ptypes), embed_dim))
                 + offset)
        coords = np.stack([xs, ys], 1).astype(np.int64) * PATCH_STEP
        slide_id = f"slide-{i:04d}"
        sample_id = f"sample-{i:04d}" if separate_sample_ids else slide_id
        slides.append(CohortSlide(
            slide_id=slide_id, sample_id=sample_id, features=feats.astype(np.float32),
            coords=coords, patch_types=ptypes, composition=comp,
            dominant_type=int(np.argmax(comp)),
        ))
        rna_rows.append(rna_base + 2.0 * (rna_map @ comp) + rna_noise * srng.standard_normal(n_genes))
        prot_rows.append(prot_base + 1.5 * (prot_map @ comp)
                         + protein_noise * srng.standard_normal(n_proteins))
    sample_ids = [s.sample_id for s in slides]
    rna = pd.DataFrame(np.asarray(rna_rows, np.float32), index=sample_ids, columns=gene_names)
    protein = pd.DataFrame(np.asarray(prot_rows, np.float32), index=sample_ids,
                           columns=protein_names)
    return FeatureCohort(slides=slides, rna=rna, protein=protein, gene_names=gene_names,
                         protein_names=protein_names, n_types=n_types, embed_dim=embed_dim,
                         seed=seed)
