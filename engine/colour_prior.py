"""A tile's mean colour, supplied where an eps-predicting model cannot see it.

At the start of sampling the signal in x_t is far below the noise: under the linear schedule
(abar_999 ~ 4e-5) the mean colour of a 128 px tile moves x_t's spatial mean by sqrt(abar_t) * m, while
the noise's own spatial mean varies by 1 / 128. An eps-prediction loss barely penalises a wrong x0 there
(an x0 error d costs an eps error sqrt(abar_t / (1 - abar_t)) * d), so a briefly trained model answers
with the noise's chance mean, amplified: the demo image model's images are 50 L* units darker than its
training tiles on average and as bright or dark as their seed's noise happens to be (docs/benchmarks.md
§13). This is the non-zero terminal SNR flaw of common schedules (Lin et al., WACV 2024) met in a small
model.

The correction leaves the model and the schedule as trained. While the signal-to-noise ratio
abar_t / (1 - abar_t) is below :data:`SNR_MAX`, each sample's predicted x0 gets, channel by channel, the
spatial mean of a *target* colour: the mean colour of a training tile drawn by the sample's seed (so a
sample still depends on its seed alone, and the images are as varied in brightness and stain as the
training tiles). When the training tiles' labels are known, the tile is drawn among those whose nucleus
area is closest to the sample's layout (:data:`MATCH_SHARE` of them): a tile with more nuclei is darker
(r = -0.56 between foreground fraction and mean grey over MoNuSeg's 128 px training tiles), and a dense
layout given a sparse tile's colour looks washed out. The noise prediction handed to the sampler is the
one that x0 implies. Afterwards the model alone decides. Opt-in: the paper's recipe has no such step.

Targets come from :func:`tile_mean_colours` of the training images (and labels), stored in an image
checkpoint as the tensor :data:`COLOUR_KEY` (``export-model --reference DIR``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = ["COLOUR_KEY", "SNR_MAX", "MAX_COLOURS", "MATCH_SHARE", "tile_mean_colours", "colour_targets",
           "correct_eps"]

#: checkpoint tensor: (K, 3) float32 mean RGB of training tiles in [-1, 1], or (K, 4) with each tile's
#: foreground fraction in [0, 1] as the fourth column
COLOUR_KEY = "reference.colour"
#: t >= 590 of the linear 1000-step schedule (DDIM 20: the first 9 steps). A 128 px tile's mean colour
#: becomes observable in x_t near SNR 1.5e-3 (1 / (128 ** 2 * 0.2 ** 2), 0.2 the spread of training tiles'
#: mean colours), but a model trained on the eps loss only follows it later: on the demo image model the
#: images' mean brightness with SNR_MAX 3e-2 is within 0.3 L* of correcting at every step down to SNR 3,
#: and 3e-3 gives a fifth less of the shift (docs/benchmarks.md §13).
SNR_MAX = 3e-2
MAX_COLOURS = 512
#: a sample's layout is matched with this share of the stored tiles, those of the nearest foreground
#: fraction (on MoNuSeg validation layouts, 128 px, demo image model: each image's L* 8.1 from its real
#: tile's against 12.2 for a draw among all tiles; bench/colour_match.py, docs/benchmarks.md §13)
MATCH_SHARE = 0.1


def _positions(length: int, size: int, stride: int) -> list[int]:
    from engine.data import tile_positions

    return tile_positions(length, size, stride) if size <= length else [0]  # smaller than a tile: one tile


def tile_mean_colours(images: Iterable[np.ndarray], size: int, stride: int | None = None,
                      max_colours: int = MAX_COLOURS, labels: Iterable[np.ndarray] | None = None) -> np.ndarray:
    """Mean RGB of every size x size tile (stride default size / 2, on the project's tile grid,
    engine.data.tile_positions) of (H, W, 3) uint8 images -> (K, 3) float32 in [-1, 1]; with ``labels``
    ((H, W) instance or binary maps, one per image, in the same order) (K, 4), the tile's foreground
    fraction in [0, 1] as the fourth column. K <= max_colours (an even subsample, in a fixed order). An
    image smaller than a tile counts as one tile. Each image is read once, in order (generators keep one
    image and label in memory)."""
    stride = int(stride or max(1, size // 2))
    out = []
    pairs = zip(images, labels, strict=True) if labels is not None else ((im, None) for im in images)
    for image, label in pairs:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) RGB images, got shape {img.shape}")
        h, w = img.shape[:2]
        if label is not None and np.shape(label) != (h, w):
            raise ValueError(f"label of shape {np.shape(label)} for an image of {h}x{w} px")
        for y in _positions(h, size, stride):
            for x in _positions(w, size, stride):
                row = list(img[y:y + size, x:x + size].reshape(-1, 3).astype(np.float64).mean(0) / 127.5 - 1.0)
                if label is not None:
                    row.append(float((np.asarray(label)[y:y + size, x:x + size] > 0).mean()))
                out.append(row)
    if not out:
        raise ValueError("no images to take tile colours from")
    colours = np.asarray(out)
    if len(colours) > max_colours:
        colours = colours[np.linspace(0, len(colours) - 1, max_colours).round().astype(int)]
    return colours.astype(np.float32)


def colour_targets(colours: np.ndarray | torch.Tensor, seeds: Sequence[int],
                   foreground: Sequence[float] | None = None, share: float = MATCH_SHARE) -> torch.Tensor:
    """One target colour per sample, (B, 3) float32: a row of ``colours`` drawn from the sample's seed.

    colours: (K, 3), or (K, 4) with the tiles' foreground fractions; foreground: each sample's layout's
    foreground fraction in [0, 1]. With both, the draw is among the ``share`` x K rows (at least one) whose
    fraction is nearest the sample's; otherwise among all rows."""
    table = np.asarray(colours, np.float32)
    if table.ndim != 2 or table.shape[1] not in (3, 4) or len(table) == 0:
        raise ValueError(f"colours must be a (K, 3) or (K, 4) array, got shape {table.shape}")
    if foreground is not None and len(foreground) != len(seeds):
        raise ValueError(f"{len(foreground)} foreground fractions for {len(seeds)} seeds")
    matched = foreground is not None and table.shape[1] == 4
    n = max(1, int(round(len(table) * share))) if matched else len(table)
    picks = []
    for i, s in enumerate(seeds):
        rows = np.argsort(np.abs(table[:, 3] - float(foreground[i])), kind="stable")[:n] if matched \
            else np.arange(len(table))
        picks.append(int(rows[int(np.random.default_rng([int(s), 0xC010]).integers(n))]))
    return torch.from_numpy(np.ascontiguousarray(table[picks, :3]))


def correct_eps(eps: torch.Tensor, x: torch.Tensor, abar_t: float, targets: torch.Tensor,
                snr_max: float = SNR_MAX) -> torch.Tensor:
    """The noise prediction whose x0 has each sample's target mean colour, where the SNR is below snr_max.

    eps, x: (B, 3, H, W) float32 at a step with cumulative alpha ``abar_t``; targets: (B, 3) in [-1, 1].
    Returns eps unchanged at higher SNR. x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) is shifted per sample
    and channel so its spatial mean is the target, and clipped to [-1, 1] like the samplers' own x0.
    """
    abar = float(abar_t)
    if abar / (1.0 - abar) >= snr_max:
        return eps
    a, s = abar ** 0.5, (1.0 - abar) ** 0.5
    x0 = (x - s * eps) / a
    x0 = (x0 - x0.mean(dim=(2, 3), keepdim=True) + targets.to(x0)[:, :, None, None]).clamp(-1, 1)
    return (x - a * x0) / s
