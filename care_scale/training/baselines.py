"""Baselines a slide encoder must beat, measured in the same run as the encoder itself.

- :func:`mean_pool`: the average patch feature of each slide (what a user gets for free);
- :class:`ABMIL`: gated-attention multiple-instance learning (Ilse et al. 2018) trained on the
  labels themselves, an upper reference for what supervised pooling of single patches reaches
  (it sees the labels; the encoders under test never do);
- :func:`ridge_retrieval`: molecular profiles predicted from mean features by ridge regression
  (fit on training slides), then retrieved among held-out pairs by cosine similarity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from care_scale.training.data import SlideFeatures


def mean_pool(slides: list[SlideFeatures]) -> np.ndarray:
    """(S, D) mean patch feature of every slide."""
    return np.stack([s.features.mean(0) for s in slides]).astype(np.float32)


class ABMIL(nn.Module):
    """Gated attention pooling over a slide's patches, then a linear classifier."""

    def __init__(self, in_dim: int, hidden: int = 64, n_classes: int = 2):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.v, self.u = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.w = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, N, hidden)
        a = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        a = torch.softmax(a.masked_fill(~valid, -1e9), dim=-1)
        return self.head((a[..., None] * h).sum(1))


def _padded(slides: list[SlideFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in slides)
    x = torch.zeros(len(slides), n, slides[0].features.shape[1])
    valid = torch.zeros(len(slides), n, dtype=torch.bool)
    for i, s in enumerate(slides):
        x[i, :len(s)] = torch.from_numpy(s.features)
        valid[i, :len(s)] = True
    return x, valid


def abmil_predict(train: list[SlideFeatures], train_y: np.ndarray, test: list[SlideFeatures],
                  *, seed: int = 0, epochs: int = 100, lr: float = 2e-3) -> np.ndarray:
    """Train ABMIL on ``train`` (full batch, Adam, fixed epochs: no peeking at the test fold)
    and return its class predictions for ``test``. One intra-op thread: the model is tiny, and
    more threads only contend with the Ray workers of the same run (5x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _abmil_fit_predict(train, train_y, test, seed=seed, epochs=epochs, lr=lr)
    finally:
        torch.set_num_threads(threads)


def _abmil_fit_predict(train: list[SlideFeatures], train_y: np.ndarray,
                       test: list[SlideFeatures], *, seed: int, epochs: int, lr: float
                       ) -> np.ndarray:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x, valid = _padded(train)
        mu, sd = x[valid].mean(0), x[valid].std(0) + 1e-6
        model = ABMIL(x.shape[-1], n_classes=int(train_y.max()) + 1)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        y = torch.as_tensor(train_y, dtype=torch.long)
        xs = (x - mu) * valid[..., None]
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(model(xs / sd, valid), y).backward()
            opt.step()
        tx, tvalid = _padded(test)
        with torch.no_grad():
            return model(((tx - mu) * tvalid[..., None]) / sd, tvalid).argmax(-1).numpy()


def ridge_retrieval(train_x: np.ndarray, train_profiles: np.ndarray, test_x: np.ndarray,
                    test_profiles: np.ndarray, *, ks: tuple[int, ...] = (1, 5)
                    ) -> dict[int, float]:
    """Top-k retrieval of held-out profiles from ridge predictions of them (alpha by
    leave-one-out on the training slides; inputs and profiles standardised on training
    statistics only)."""
    from sklearn.linear_model import RidgeCV

    from care_scale.training.evaluate import retrieval_topk

    mx, sx = train_x.mean(0), train_x.std(0) + 1e-6
    mp, sp = train_profiles.mean(0), train_profiles.std(0) + 1e-6
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit((train_x - mx) / sx,
                                                        (train_profiles - mp) / sp)
    pred = ridge.predict((test_x - mx) / sx)
    return retrieval_topk(pred, (test_profiles - mp) / sp, ks=ks)
