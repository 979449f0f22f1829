"""Classifier two-sample test: can a small CNN tell real H&E tiles from synthetic ones?

A fixed recipe (architecture, epochs, learning rate, seed) is trained from scratch on half of each set
and scored on the other half, then the halves swap (two-fold), so every tile is scored once by a
classifier that never saw it. Held-out accuracy 0.5 means the sets are indistinguishable to this
classifier; 1.0 means every tile is told apart. The two sets are first cut to the same number of tiles,
so chance is exactly 0.5, and the 95 % interval is Wilson's score interval on the held-out predictions.

Sanity rows the caller should measure in the same run (see ``bench/realism.py``): two disjoint sets of
real tiles (must be near 0.5) and real tiles against a crude fake such as blurred real tiles (near 1.0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import DataError

__all__ = ["TwoSampleConfig", "TwoSampleResult", "RealFakeCNN", "two_sample_test", "wilson_interval",
           "blur_tiles"]


@dataclass(frozen=True)
class TwoSampleConfig:
    """The classifier's fixed recipe (change it and results are no longer comparable)."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    width: int = 16  # channels of the first block; doubled per block up to 4 x width
    seed: int = 0


@dataclass(frozen=True)
class TwoSampleResult:
    """Held-out accuracy of the real-vs-synthetic classifier (0.5 = indistinguishable)."""

    accuracy: float
    ci_low: float
    ci_high: float
    n_per_set: int  # tiles used from each set (the larger set is cut to the smaller's size)
    n_scored: int  # held-out predictions (= 2 x n_per_set)
    tile_size: int
    epochs: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] "
                f"({self.n_per_set} + {self.n_per_set} tiles of {self.tile_size} px)")


class RealFakeCNN(nn.Module):
    """Five stride-2 conv blocks, global average pool, one logit. Any tile size >= 32 px.

    Input (B, 3, H, W) float in [-1, 1]; output (B,) logits (> 0: "second set").
    """

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [3] + [width * min(2 ** i, 4) for i in range(5)]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion correct / n."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def blur_tiles(tiles: Sequence[np.ndarray], sigma: float = 2.0) -> list[np.ndarray]:
    """Gaussian-blurred copies of uint8 RGB tiles: the crude fake of the sanity row."""
    import cv2

    return [cv2.GaussianBlur(np.ascontiguousarray(t), (0, 0), sigma) for t in tiles]


def _stack(tiles: Sequence[np.ndarray], what: str) -> np.ndarray:
    arrs = [np.asarray(t) for t in tiles]
    if not arrs:
        raise DataError(f"two-sample test: no {what} tiles")
    shape = arrs[0].shape
    if len(shape) != 3 or shape[2] != 3 or shape[0] != shape[1] or shape[0] < 32:
        raise DataError(f"two-sample test: {what} tiles must be square RGB of at least 32 px, got {shape}")
    if any(a.shape != shape for a in arrs):
        raise DataError(f"two-sample test: {what} tiles differ in size; cut them to one size first")
    return np.stack(arrs).astype(np.uint8)


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random flip and quarter turn per batch (orientation carries no realism)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if int(torch.randint(0, 2, (1,), generator=gen)):
        x = x.flip(3)
    return torch.rot90(x, k, dims=(2, 3))


def _fit_and_score(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   cfg: TwoSampleConfig, seed: int) -> np.ndarray:
    """Train a fresh classifier on (train_x, train_y); boolean predictions (> 0.5) for test_x."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RealFakeCNN(cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    n = len(train_x)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(model(_augment(train_x[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(test_x[i : i + 64]) for i in range(0, len(test_x), 64)])
    return (logits > 0).numpy()


def two_sample_test(first: Sequence[np.ndarray], second: Sequence[np.ndarray],
                    config: TwoSampleConfig = TwoSampleConfig()) -> TwoSampleResult:
    """Two-fold classifier two-sample test between two sets of tiles.

    Args:
        first, second: uint8 RGB tiles (S, S, 3), one size for all, at least 4 per set (e.g. real and
            synthetic). The larger set is cut (seeded draw) to the size of the smaller one.
        config: the classifier's recipe; its seed fixes the draw, the split and the training.
    Returns:
        TwoSampleResult: accuracy of the held-out predictions over both folds, with its 95 % interval.
    """
    a, b = _stack(first, "first"), _stack(second, "second")
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"two-sample test: the sets' tiles differ in size ({a.shape[1]} and {b.shape[1]} px)")
    n = min(len(a), len(b))
    if n < 4:
        raise DataError(f"two-sample test: needs at least 4 tiles per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(config.seed)
    a = a[rng.permutation(len(a))[:n]]
    b = b[rng.permutation(len(b))[:n]]
    half = n // 2
    folds = [(np.arange(half), np.arange(half, n)), (np.arange(half, n), np.arange(half))]
    correct = scored = 0
    for k, (tr, te) in enumerate(folds):
        x = _to_tensor(np.concatenate([a[tr], b[tr]]))
        y = torch.cat([torch.zeros(len(tr)), torch.ones(len(tr))])
        pred = _fit_and_score(x, y, _to_tensor(np.concatenate([a[te], b[te]])), config,
                              seed=config.seed * 101 + k)
        truth = np.concatenate([np.zeros(len(te), bool), np.ones(len(te), bool)])
        correct += int((pred == truth).sum())
        scored += len(truth)
    lo, hi = wilson_interval(correct, scored)
    return TwoSampleResult(accuracy=correct / scored, ci_low=lo, ci_high=hi, n_per_set=n, n_scored=scored,
                           tile_size=int(a.shape[1]), epochs=config.epochs, seed=config.seed)
