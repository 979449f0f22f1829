"""Calibrating the guidance scale w of an image model against real images.

Classifier-free guidance scales how dark the synthetic nuclei are: at the paper's w = 2 a model trained
for less long than the paper's draws nuclei much starker than real ones, and pairs that are easier than
real tiles teach a segmenter less (docs/benchmarks.md §6k). The w at which synthetic nuclei stand out as
much as real ones depends on the model, so it is measured, not fixed:

1. take n real tiles (with nuclei) of the sampling size from a labeled folder, e.g. the training data;
2. synthesize an image for each tile's own label map at every w of a grid, with the same seeds;
3. nucleus contrast (``engine.quality.appearance_stats``: median background grey minus median nucleus
   grey) of the real tiles and of the synthetic images at each w, averaged over the tiles;
4. the recommended w is where the synthetic contrast, interpolated linearly between grid points, equals
   the real one (clamped to the grid).

Comparing each synthetic image with the real tile whose layout it was given makes the comparison like for
like. The result is stored in the image model's JSON record under ``"guidance"`` (the weights are not
touched), read back by :func:`recommended_w` and offered by the CLI (``--w recommended``) and the studio.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.checkpoint import GUIDANCE_KEY, checkpoint_paths, read_record, recommended_w
from engine.errors import CheckpointError, DataError, NuDiffError
from engine.fileio import atomic_write_bytes

__all__ = ["GuidanceCalibration", "calibrate_guidance", "match_w", "recommended_w", "store_calibration",
           "DEFAULT_GRID", "DEFAULT_TILES", "RECORD_KEY", "resolve_w"]

DEFAULT_GRID = (0.0, 1.0, 2.0, 3.0)
DEFAULT_TILES = 8
RECORD_KEY = GUIDANCE_KEY  # the image checkpoint's record field (read by engine.checkpoint.recommended_w)


@dataclass
class GuidanceCalibration:
    """Result of :func:`calibrate_guidance`.

    w: recommended guidance scale (rounded to 0.05); real_contrast: mean nucleus contrast of the real
    tiles (grey levels, 0..255); contrast_by_w: {w: mean nucleus contrast of the synthetic images};
    reference: name of the real folder; n_tiles, size, sampler, steps, seed: how it was measured.
    """

    w: float
    real_contrast: float
    contrast_by_w: dict[float, float]
    reference: str
    n_tiles: int
    size: int
    sampler: str
    steps: int
    seed: int
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["contrast_by_w"] = {f"{w:g}": c for w, c in self.contrast_by_w.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuidanceCalibration":
        d = dict(data)
        d["contrast_by_w"] = {float(w): float(c) for w, c in d.get("contrast_by_w", {}).items()}
        return cls(**d)

    def summary(self) -> str:
        grid = ", ".join(f"w {w:g}: {c:.1f}" for w, c in sorted(self.contrast_by_w.items()))
        return (f"recommended w = {self.w:g}: synthetic nuclei then stand out as much as real ones "
                f"(nucleus contrast, grey levels: real {self.real_contrast:.1f}; {grid}; "
                f"{self.n_tiles} tiles of {self.size} px from {self.reference}, {self.sampler} {self.steps} steps)")


def match_w(ws: Sequence[float], contrasts: Sequence[float], target: float) -> float:
    """The w where the piecewise-linear curve through (ws, contrasts) first reaches target.

    ws ascending; clamped to [ws[0], ws[-1]] when target is outside the curve's range. Where no segment
    brackets the target (a non-monotonic curve with the target outside every segment), the grid w whose
    contrast is nearest.
    """
    w = np.asarray(ws, np.float64)
    c = np.asarray(contrasts, np.float64)
    if w.ndim != 1 or w.size == 0 or w.shape != c.shape or np.any(np.diff(w) <= 0):
        raise ValueError("ws must be ascending and as many as contrasts")
    if not np.all(np.isfinite(c)) or not np.isfinite(target):
        raise ValueError("contrasts and target must be finite")
    if target <= c.min() and c[0] == c.min():
        return float(w[0])
    if target >= c.max() and c[-1] == c.max():
        return float(w[-1])
    for i in range(w.size - 1):
        lo, hi = c[i], c[i + 1]
        if min(lo, hi) <= target <= max(lo, hi):
            if hi == lo:
                return float(w[i])
            return float(w[i] + (target - lo) / (hi - lo) * (w[i + 1] - w[i]))
    return float(w[np.argmin(np.abs(c - target))])


def _tiles_with_nuclei(real: Any, size: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n real (image, inst) tiles of size x size with at least one nucleus, evenly spaced over the folder."""
    from engine.quality import load_pairs, real_tiles

    pairs = load_pairs(real, "real pairs")
    small = [p for p in pairs if p[1].shape[0] < size or p[1].shape[1] < size]
    if small:
        raise DataError(f"real images must be at least {size} px on each side for this model; "
                        f"one is {small[0][1].shape[1]}x{small[0][1].shape[0]}")
    tiles = [t for t in real_tiles(pairs, size, 10**6) if t[1].max() > 0]
    if not tiles:
        raise DataError("no real tile with nuclei to calibrate against")
    keep = np.unique(np.linspace(0, len(tiles) - 1, min(n, len(tiles))).round().astype(int))
    return [tiles[i] for i in keep]


def calibrate_guidance(
    model: Any,
    real: Any,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    n: int = DEFAULT_TILES,
    size: int | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> GuidanceCalibration:
    """Measure the w at which an image model's nuclei are as dark against their background as real ones.

    model: an image engine.pipeline.LoadedModel. real: labeled folder (images/ + labels/) or a list of
    (image uint8 (H, W, 3), inst int32 (H, W)) pairs; images larger than the sampling size are cut into
    tiles of it. grid: guidance scales to try, at least two, each in [0, 50]. n: real tiles used (at most).
    Cost: len(grid) * n synthesized images. Reproducible from seed.
    """
    from engine import pipeline  # (imported here: reading a calibrated w needs none of the sampling code)
    from engine.quality import appearance_stats
    from engine.samplers import SAMPLERS

    if model.kind != "image":
        raise CheckpointError(f"{model.path.name} is a {model.kind} model; guidance is calibrated for image models")
    ws = sorted({float(w) for w in grid})
    if len(ws) < 2 or ws[0] < 0 or ws[-1] > 50:
        raise NuDiffError(f"the w grid needs at least two values in [0, 50], got {list(grid)}")
    if n < 1:
        raise NuDiffError("calibration needs at least one real tile")
    size = int(size or model.image_size)
    pipeline.plan_image_canvas(model, (size, size), max(ws))  # a readable error before reading any tile
    steps = int(steps or (SAMPLERS[sampler].steps if sampler in SAMPLERS else 20))  # (synthesize refuses others)
    tiles = _tiles_with_nuclei(real, size, n)
    insts = [inst for _, inst in tiles]
    real_c = float(np.nanmean(appearance_stats([im for im, _ in tiles], insts)["contrast"]))
    per_w = steps * -(-len(insts) // batch_size)
    contrast: dict[float, float] = {}
    for k, w in enumerate(ws):
        step_progress = None if progress is None else (lambda i, _t, k=k: progress(k * per_w + i, len(ws) * per_w))
        images = pipeline.synthesize(model, insts, w=w, sampler=sampler, steps=steps, seed=seed,
                                     batch_size=batch_size, progress=step_progress, cancel=cancel)
        contrast[w] = float(np.nanmean(appearance_stats(images, insts)["contrast"]))
    best = match_w(ws, [contrast[w] for w in ws], real_c)
    name = Path(real).name if isinstance(real, (str, os.PathLike)) else "given pairs"
    return GuidanceCalibration(w=round(best * 20) / 20, real_contrast=real_c, contrast_by_w=contrast,
                               reference=name, n_tiles=len(insts), size=size, sampler=sampler, steps=steps,
                               seed=seed, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def store_calibration(checkpoint: str | os.PathLike, calibration: GuidanceCalibration) -> Path:
    """Write the calibration into an image checkpoint's JSON record (atomically; weights untouched)."""
    _, record = read_record(checkpoint, kind="image")
    record[RECORD_KEY] = calibration.to_dict()
    path = checkpoint_paths(checkpoint)[1]
    atomic_write_bytes(path, json.dumps(record, indent=2, default=str).encode())
    return path


def resolve_w(w: float | str, recommended: float | None, name: str = "this image model") -> float:
    """A number (or its text), or 'recommended' -> the model's calibrated w; NuDiffError when it has none."""
    if isinstance(w, str) and w.strip().lower() == "recommended":
        if recommended is None:
            raise NuDiffError(f"{name} has no calibrated w: run `python -m engine calibrate-w --checkpoint "
                              f"{name} --real DIR` first, or give w as a number")
        return float(recommended)
    try:
        return float(w)
    except ValueError:
        raise NuDiffError(f"w must be a number or 'recommended', got {w!r}") from None
