"""Training data: slides of patch features, sub-WSIs, views and batches.

Sources (one per run, see :class:`~care_scale.training.config.DataConfig`): feature files
(CLAM/TRIDENT h5, Parquet, CARE .npy through ``care_scale.models.read_patch_features``), the
``patches`` Delta table the embedding job can keep, or the generated known-answer cohort.

Stage I splits every slide into sub-WSIs of at most ``max_patches`` patches, as the paper does:
DBSCAN on the grid coordinates gives the tissue pieces, and pieces that are still too large are
cut in half along their longer side, recursively (deterministic, spatially coherent halves).

Every worker holds the (small) list of sub-WSIs and draws batches with :class:`StepSampler`,
whose indices depend only on (seed, step, rank): a resumed run sees exactly the batches the
killed run would have seen.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import logging
from typing import Any

import numpy as np
import torch

from care_scale.exceptions import TrainingDataError
from care_scale.storage import redact, url_to_fs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SlideFeatures:
    slide_id: str
    features: np.ndarray  # (N, D) float32
    grid: np.ndarray  # (N, 2) int64 integer grid positions (x, y)
    patch_types: np.ndarray | None = None  # ground truth, generated cohort only
    label: int | None = None  # the cohort's primary label, generated cohort only
    labels: dict[str, int] = dataclasses.field(default_factory=dict)  # every named label

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, idx: np.ndarray, suffix: str = "") -> SlideFeatures:
        return SlideFeatures(
            slide_id=self.slide_id + suffix, features=self.features[idx], grid=self.grid[idx],
            patch_types=None if self.patch_types is None else self.patch_types[idx],
            label=self.label, labels=self.labels)


# ----------------------------------------------------------------------------- loading


def _expand_uris(uris: list[str], storage_options: dict[str, Any] | None) -> list[str]:
    """Directories and glob patterns -> sorted feature-file URIs."""

    from care_scale.storage import is_remote

    out: list[str] = []
    exts = (".h5", ".hdf5", ".parquet", ".npy")
    for uri in uris:
        if is_remote(uri):
            fs, path = url_to_fs(uri, storage_options)
            proto = uri.split("://", 1)[0]
            matches = fs.glob(path) if any(c in path for c in "*?[") else (
                fs.find(path) if fs.isdir(path) else [path])
            out.extend(f"{proto}://{m}" for m in sorted(matches) if m.lower().endswith(exts))
        else:
            import os

            if os.path.isdir(uri):
                out.extend(sorted(os.path.join(uri, f) for f in os.listdir(uri)
                                  if f.lower().endswith(exts)))
            elif any(c in uri for c in "*?["):
                out.extend(sorted(_glob.glob(uri)))
            else:
                out.append(uri)
    if not out:
        raise TrainingDataError(f"no feature files found in {[redact(u) for u in uris]}")
    return out


def _from_features(slide_id: str, features: np.ndarray, coords: np.ndarray,
                   step: int | None = None) -> SlideFeatures:
    from care_scale.models import coords_to_grid

    grid, _ = coords_to_grid(np.asarray(coords, np.int64), step)
    return SlideFeatures(slide_id=slide_id, features=np.asarray(features, np.float32),
                         grid=np.asarray(grid, np.int64))


def load_feature_files(uris: list[str], *, storage_options: dict[str, Any] | None = None
                       ) -> list[SlideFeatures]:
    from care_scale.models import read_patch_features
    from care_scale.models.features import file_step

    slides = []
    for uri in _expand_uris(uris, storage_options):
        pf = read_patch_features(uri, storage_options=storage_options)
        slides.append(_from_features(pf.slide_id, pf.features, pf.coords, file_step(pf)))
    return slides


def load_patches_table(uri: str, *, model_version: str | None = None,
                       storage_options: dict[str, Any] | None = None) -> list[SlideFeatures]:
    """Patch features of the embedding job's ``patches`` Delta table, grouped by slide."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from care_scale.exceptions import TableError
    from care_scale.storage import to_delta

    try:
        dt = DeltaTable(uri, storage_options=to_delta(storage_options, uri) or None)
    except TableNotFoundError:
        raise TableError(redact(uri), "no Delta table here (run the embedding job with "
                         "patch features kept)") from None
    table = dt.to_pyarrow_table()
    names = set(table.column_names)
    feat_col = next((c for c in ("feature", "features", "embedding") if c in names), None)
    need = {"slide_id", "x", "y"}
    if feat_col is None or not need <= names:
        raise TableError(redact(uri), f"not a patches table: needs slide_id, x, y and a feature "
                         f"column; has {sorted(names)}")
    if "model_version" in names:
        versions = sorted(set(table.column("model_version").to_pylist()))
        if model_version is None and len(versions) > 1:
            raise TrainingDataError(
                f"{redact(uri)} holds {len(versions)} model versions {versions[:3]}; set "
                "data.model_version")
        if model_version is not None:
            table = table.filter(pc.equal(table.column("model_version"), model_version))
    if table.num_rows == 0:
        raise TableError(redact(uri), "no patch rows (for this model version)")
    slide_ids = np.asarray(table.column("slide_id").to_pylist())
    feats = np.asarray(table.column(feat_col).to_pylist(), dtype=np.float32)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], 1)
    slides = []
    for sid in sorted(set(slide_ids.tolist())):
        sel = slide_ids == sid
        order = np.lexsort((coords[sel, 0], coords[sel, 1]))
        slides.append(_from_features(str(sid), feats[sel][order], coords[sel][order]))
    return slides


def synthetic_slides(data: Any, *, embed_dim: int) -> tuple[list[SlideFeatures], Any]:
    """The known-answer cohort of a ``DataConfig`` as training slides (and the cohort, for its
    molecular tables). ``label`` is the cohort's primary label, ``labels`` all of them."""
    from care_scale.synthetic import COHORTS

    cohort = COHORTS[data.synthetic_cohort](data.synthetic_slides, embed_dim=embed_dim,
                                            seed=data.synthetic_seed)
    named = {"dominant_type": cohort.labels, **cohort.label_sets}
    slides = [SlideFeatures(s.slide_id, s.features, s.grid, s.patch_types, s.dominant_type,
                            labels={k: int(v[i]) for k, v in named.items()})
              for i, s in enumerate(cohort.slides)]
    return slides, cohort


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, holdout) index split."""
    perm = np.random.default_rng([seed, 12345]).permutation(n)
    n_hold = round(n * fraction)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# ----------------------------------------------------------------------------- sub-WSIs


def _bisect(idx: np.ndarray, grid: np.ndarray, max_patches: int) -> list[np.ndarray]:
    if len(idx) <= max_patches:
        return [idx]
    pts = grid[idx]
    axis = int(np.argmax(pts.max(0) - pts.min(0)))
    order = idx[np.lexsort((pts[:, 1 - axis], pts[:, axis]))]  # stable, deterministic
    half = len(order) // 2
    return _bisect(order[:half], grid, max_patches) + _bisect(order[half:], grid, max_patches)


def split_sub_wsis(slide: SlideFeatures, *, max_patches: int = 360, eps: float = 1.5,
                   min_patches: int = 8) -> list[SlideFeatures]:
    """DBSCAN pieces of the slide, cut further so none exceeds ``max_patches`` patches.

    ``eps`` is in grid steps (1.5 connects the 8 neighbours). Pieces smaller than
    ``min_patches`` are dropped (specks carry no context for a slide encoder).
    """
    from sklearn.cluster import DBSCAN

    if len(slide) == 0:
        return []
    labels = DBSCAN(eps=eps, min_samples=1).fit_predict(slide.grid.astype(np.float64))
    pieces: list[np.ndarray] = []
    for lab in np.unique(labels):
        idx = np.nonzero(labels == lab)[0]
        pieces.extend(_bisect(idx, slide.grid, max_patches))
    out = []
    for i, idx in enumerate(p for p in pieces if len(p) >= min_patches):
        out.append(slide.subset(np.sort(idx), suffix=f"#{i}"))
    return out


# ----------------------------------------------------------------------------- views


@dataclasses.dataclass
class ViewParams:
    crop_scale: tuple[float, float] = (0.6, 1.0)
    feature_noise: float = 0.5
    feature_dropout: float = 0.1
    global_shift: float = 1.0
    shift_basis: np.ndarray | None = None
    shift_mix: bool = False  # draw each view's shift strength uniformly in [0, global_shift]
    min_patches: int = 8
    max_patches: int | None = None  # larger crops are cut to this many contiguous patches


def crop_indices(grid: np.ndarray, rng: np.random.Generator, scale: tuple[float, float],
                 min_patches: int = 8) -> np.ndarray:
    """Indices of a random axis-aligned window of the grid (side = scale x extent)."""
    lo, hi = grid.min(0), grid.max(0) + 1
    extent = hi - lo
    for _ in range(10):
        s = rng.uniform(*scale, size=2)
        size = np.maximum(1, np.round(extent * np.sqrt(s[0] * s[1]) * np.array([1, 1])))
        start = lo + np.floor(rng.uniform(0, 1, 2) * (extent - size + 1)).astype(np.int64)
        inside = np.all((grid >= start) & (grid < start + size), axis=1)
        idx = np.nonzero(inside)[0]
        if len(idx) >= min(min_patches, len(grid)):
            return idx
    return np.arange(len(grid))


def augment_features(x: np.ndarray, rng: np.random.Generator, *, scale: float, noise: float,
                     dropout: float, shift: float, shift_basis: np.ndarray | None = None,
                     shift_mix: bool = False) -> np.ndarray:
    """Feature-space augmentation: patch noise, feature dropout, one offset for the view.

    ``scale`` is the cohort's within-slide feature std, so noise is relative. The offset
    imitates stain / scanner shifts that move every patch of a slide the same way. With
    ``shift_basis`` (see :func:`shift_directions`) the view's position along those directions
    is *replaced* by a random draw with the cohort's between-slide std (times ``shift``), so
    two views of one slide share nothing along them; without a basis an isotropic offset of
    std ``shift * scale`` is added.
    """
    out = x + rng.standard_normal(x.shape).astype(np.float32) * (noise * scale)
    if shift > 0:
        # shift_mix: uniform strength in [0, shift], so some views are nearly unshifted (an
        # early signal to learn from) and some as shifted as real slides (invariance).
        strength = shift * (rng.uniform() if shift_mix else 1.0)
        if shift_basis is not None and len(shift_basis):
            dirs, std = shift_basis[:, :-1], shift_basis[:, -1]
            current = dirs @ out.mean(0)
            target = rng.standard_normal(len(dirs)) * std * strength
            offset = (target - current) @ dirs
        else:
            offset = rng.standard_normal(x.shape[1]) * (strength * scale)
        out = out + offset.astype(np.float32)
    if dropout > 0:
        out = out * (rng.uniform(size=x.shape) >= dropout) / (1 - dropout)
    return out.astype(np.float32)


def shift_directions(slides: list[SlideFeatures], rank: int) -> np.ndarray:
    """(rank, D + 1): the top principal directions of per-slide mean features (orthonormal,
    first D columns) and the std of slide means along each (last column). Moving views along
    them imitates the slide-to-slide (stain, scanner, site) variation of the cohort, so the
    encoder learns to look past it."""
    dim = slides[0].features.shape[1] if slides else 0
    if rank <= 0 or len(slides) < 2:
        return np.zeros((0, dim + 1), np.float32)
    means = np.stack([s.features.mean(0) for s in slides]).astype(np.float64)
    means -= means.mean(0)
    _, sv, vt = np.linalg.svd(means, full_matrices=False)
    k = min(rank, len(sv))
    std = sv[:k] / np.sqrt(len(slides) - 1)
    return np.concatenate([vt[:k], std[:, None]], 1).astype(np.float32)


def nearest_indices(grid: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Indices of the ``n`` patches nearest a random patch: a spatially contiguous piece, so a
    crop of a large slide keeps the neighbourhoods region construction works on (a random
    subset of a 20,000-patch slide would leave most kept patches without a kept neighbour)."""
    centre = grid[rng.integers(len(grid))]
    d = np.abs(grid - centre).sum(1) + rng.uniform(0, 0.5, len(grid))
    return np.sort(np.argsort(d, kind="stable")[:n])


def make_view(slide: SlideFeatures, rng: np.random.Generator, p: ViewParams, scale: float
              ) -> dict[str, np.ndarray]:
    """One view: a crop, its features (augmented) and a second augmentation for ARG."""
    idx = crop_indices(slide.grid, rng, p.crop_scale, p.min_patches)
    if p.max_patches is not None and len(idx) > p.max_patches:
        idx = idx[nearest_indices(slide.grid[idx], rng, p.max_patches)]
    x = slide.features[idx]
    grid = slide.grid[idx] - slide.grid[idx].min(0)
    kw = {"scale": scale, "noise": p.feature_noise, "dropout": p.feature_dropout,
              "shift": p.global_shift, "shift_basis": p.shift_basis, "shift_mix": p.shift_mix}
    # "index": each patch's position in ``slide``, so views of one item can be matched patch
    # by patch (stage I's region-level loss).
    view = {"features": augment_features(x, rng, **kw), "grid": grid, "index": idx}
    # "augmented" patch features for ARG's affinity: image-augmented features are not
    # available from stored features, so a lighter feature-space augmentation stands in.
    view["augmented"] = augment_features(view["features"], rng, scale=scale,
                                         noise=p.feature_noise * 0.5, dropout=0.0, shift=0.0)
    return view


def collate(views: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad views to the longest: features/augmented (B,N,D), grid (B,N,2), num_valid (B,);
    plus index (B,N), -1 on padding, when every view has one (see :func:`make_view`)."""
    n = max(len(v["features"]) for v in views)
    d = views[0]["features"].shape[1]
    b = len(views)
    feats = np.zeros((b, n, d), np.float32)
    aug = np.zeros((b, n, d), np.float32)
    grid = np.zeros((b, n, 2), np.int64)
    num = np.zeros(b, np.int64)
    for i, v in enumerate(views):
        k = len(v["features"])
        feats[i, :k], aug[i, :k], grid[i, :k], num[i] = v["features"], v["augmented"], v["grid"], k
    out = {"features": torch.from_numpy(feats), "augmented": torch.from_numpy(aug),
           "grid": torch.from_numpy(grid), "num_valid": torch.from_numpy(num)}
    if all("index" in v for v in views):
        index = np.full((b, n), -1, np.int64)
        for i, v in enumerate(views):
            index[i, :len(v["index"])] = v["index"]
        out["index"] = torch.from_numpy(index)
    return out


def feature_scale(slides: list[SlideFeatures]) -> float:
    """Mean per-dimension std of patch features within slides (augmentation unit)."""
    stds = [s.features.std(0).mean() for s in slides[:256] if len(s) > 1]
    return float(np.mean(stds)) if stds else 1.0


class StepSampler:
    """Batch indices as a pure function of (seed, step, micro-step, rank): resumable.

    Items are visited epoch by epoch in a seeded permutation; the global batch of one
    micro-step is ``batch_size * world_size`` consecutive items of that order, and worker
    ``rank`` takes its slice.
    """

    def __init__(self, n_items: int, *, batch_size: int, world_size: int, rank: int,
                 seed: int, accum: int = 1):
        if n_items == 0:
            raise TrainingDataError("no training items (slides / sub-WSIs) after filtering")
        self.n, self.b, self.w, self.r, self.seed, self.accum = (
            n_items, batch_size, world_size, rank, seed, accum)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int = 0) -> np.ndarray:
        start = ((step * self.accum + micro) * self.w + self.r) * self.b
        pos = np.arange(start, start + self.b)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in pos])

    def rng(self, step: int, micro: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, micro, self.r, 777])


def model_in_dim(model_cfg: Any) -> int:
    """Input feature size of the configured slide encoder (registry entry + overrides)."""
    from care_scale.models.registry import get_slide_encoder_spec

    if "in_dim" in model_cfg.overrides:
        return int(model_cfg.overrides["in_dim"])
    return get_slide_encoder_spec(model_cfg.name).in_dim


def load_slides_for(cfg: Any, *, train_only: bool = True
                    ) -> list[SlideFeatures] | tuple[list[SlideFeatures], list[SlideFeatures]]:
    """Slides of a stage config's data source; ``train_only`` drops the held-out ones,
    otherwise returns (train, holdout)."""
    d = cfg.data
    opts = d.storage_options or None
    if d.synthetic:
        slides, _ = synthetic_slides(d, embed_dim=model_in_dim(cfg.model))
    elif d.patches_table:
        slides = load_patches_table(d.patches_table, model_version=d.model_version,
                                    storage_options=opts)
    else:
        slides = load_feature_files(d.feature_uris, storage_options=opts)
    dims = {s.features.shape[1] for s in slides}
    want = model_in_dim(cfg.model)
    if dims != {want}:
        raise TrainingDataError(
            f"patch features have dimension(s) {sorted(dims)}, but slide encoder "
            f"{cfg.model.name!r} expects {want}")
    train_idx, hold_idx = split_holdout(len(slides), d.holdout_fraction, d.synthetic_seed)
    train = [slides[i] for i in train_idx]
    if train_only:
        return train
    return train, [slides[i] for i in hold_idx]
