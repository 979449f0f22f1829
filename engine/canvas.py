"""One sample of any size: the canvas plan (padding, windows, memory) and the sampling call.

A canvas no larger than the model's tile is denoised in one pass, padded up to a multiple of the U-Net's
downsampling factor if needed. A larger canvas is denoised as overlapping windows whose noise predictions
are fused every step (engine.tiling). Padding of a condition is background (semantic -1, distance maps 0);
padded pixels are cropped off the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.config import DiffusionConfig, UNetConfig
from engine.errors import NuDiffError
from engine.memory import Plan, plan_windows
from engine.samplers import sample
from engine.tiling import DEFAULT_OVERLAP_FRACTION, TiledDenoiser, TilingOptions, WindowGrid

__all__ = ["CanvasPlan", "plan_canvas", "sample_canvas", "pad_condition", "MAX_SIDE"]

MAX_SIDE = 65536  # a side beyond this is refused outright, whatever the budget


def _down_factor(cfg: UNetConfig) -> int:
    return 2 ** (len(cfg.channels) - 1)


def _round_up(v: int, f: int) -> int:
    return -(-int(v) // f) * f


@dataclass(frozen=True)
class CanvasPlan:
    """How one (height, width) canvas is sampled: padded size, window grid (None: one pass), memory plan."""

    height: int
    width: int
    padded: tuple[int, int]
    grid: WindowGrid | None
    memory: Plan

    @property
    def tiled(self) -> bool:
        return self.grid is not None

    @property
    def windows(self) -> int:
        return len(self.grid) if self.grid is not None else 1

    def units_per_step(self) -> int:
        """Progress units (window batches) of one denoising step."""
        return -(-self.windows // self.memory.window_batch) if self.tiled else 1

    def describe(self, steps: int) -> str:
        if not self.tiled:
            return f"{self.height}x{self.width} px in one window, {steps} steps"
        g = self.grid
        return (f"{self.height}x{self.width} px as {self.windows} windows of {g.tile} px (overlap {g.overlap}) "
                f"x {steps} steps, {self.memory.window_batch} windows per pass, {self.memory.describe()}")

    def meta(self) -> dict:
        """Provenance fields of a tiled canvas (empty for a single pass)."""
        if not self.tiled:
            return {}
        return {"tile": self.grid.tile, "overlap": self.grid.overlap, "windows": self.windows}


def plan_canvas(cfg: UNetConfig, default_tile: int, height: int, width: int, *, guided: bool,
                options: TilingOptions | None = None, watershed: bool = False, what: str = "canvas",
                device=None) -> CanvasPlan:
    """Plan one canvas of (height, width) px for a model `cfg` whose sampling tile is `default_tile`.

    device: where the model sits (a GPU caps the memory budget: engine.memory.plan_windows).

    NuDiffError for a size the model cannot take; engine.memory.MemoryBudgetError when even one window
    per pass does not fit the budget.
    """
    opt = options or TilingOptions()
    f = _down_factor(cfg)
    height, width = int(height), int(width)
    if min(height, width) < 8:
        raise NuDiffError(f"{'an' if what[0] in 'aeiou' else 'a'} {what} must be at least 8 px on each side, "
                          f"got {height}x{width}")
    if max(height, width) > MAX_SIDE:
        raise NuDiffError(f"a {height}x{width} px {what} is beyond the largest side of {MAX_SIDE} px")
    tile = int(opt.tile or default_tile)
    if tile < f or tile % f:
        raise NuDiffError(f"tile {tile} px does not fit this model: use a multiple of {f}")
    if height <= tile and width <= tile:
        padded = (_round_up(height, f), _round_up(width, f))
        mem = plan_windows(cfg, padded, padded, guided=guided, max_window_batch=1, budget_gb=opt.max_memory_gb,
                           watershed=watershed, what=what, device=device)
        return CanvasPlan(height, width, padded, None, mem)
    overlap = int(opt.overlap if opt.overlap is not None else round(tile * DEFAULT_OVERLAP_FRACTION))
    if not 0 <= overlap < tile:
        raise NuDiffError(f"overlap ({overlap} px) must be smaller than the tile ({tile} px)")
    padded = (max(height, tile), max(width, tile))
    grid = WindowGrid(padded[0], padded[1], tile, overlap)
    mem = plan_windows(cfg, padded, (tile, tile), guided=guided, max_window_batch=opt.max_window_batch,
                       budget_gb=opt.max_memory_gb, watershed=watershed, what=what, device=device)
    return CanvasPlan(height, width, padded, grid, mem)


def pad_condition(cond: np.ndarray, padded: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) structure padded at the bottom/right with background to `padded` (semantic -1, maps 0)."""
    h, w = cond.shape[:2]
    if (h, w) == tuple(padded):
        return cond
    out = np.zeros((*padded, 3), np.float32)
    out[..., 0] = -1.0
    out[:h, :w] = cond
    return out


def sample_canvas(model: torch.nn.Module, plan: CanvasPlan, *, channels: int, seed: int, sampler: str, steps: int,
                  diffusion: DiffusionConfig, cond: np.ndarray | None = None, w: float = 0.0,
                  progress: Callable[[], None] | None = None,
                  cancel: Callable[[], bool] | None = None, autocast: bool = True,
                  colour_target: torch.Tensor | None = None) -> np.ndarray:
    """Sample one canvas -> (height, width, channels) float32 in [-1, 1].

    cond: (height, width, 3) structure for an image model (guided with scale w), None for a structure
    model. progress() is called once per unit of plan.units_per_step() per step; cancel() is polled
    before every window batch. autocast: bf16 where it is fast (engine.samplers.sample). colour_target: (3,)
    mean colour for the canvas while it is unobservable (engine.colour_prior), or None.
    """
    dev = next(model.parameters()).device
    ph, pw = plan.padded
    c = None
    if cond is not None:
        c = torch.from_numpy(np.ascontiguousarray(pad_condition(cond.astype(np.float32), plan.padded)))
        c = c.permute(2, 0, 1)[None].to(dev)
    denoiser = None
    step_cb = None
    if plan.tiled:
        denoiser = TiledDenoiser(model, plan.grid, window_batch=plan.memory.window_batch, on_batch=progress,
                                 cancel=cancel, cache_bytes=plan.memory.cache_bytes)
    elif progress is not None:
        step_cb = lambda i, n: progress()  # noqa: E731
    x = sample(model, (1, channels, ph, pw), sampler=sampler, steps=steps, seeds=[int(seed)], cond=c, w=float(w),
               diffusion=diffusion, progress=step_cb, cancel=cancel, denoiser=denoiser, autocast=autocast,
               cache_bytes=plan.memory.cache_bytes,
               colour_targets=None if colour_target is None else colour_target[None])
    return x[0, :, :plan.height, :plan.width].permute(1, 2, 0).float().cpu().numpy()
