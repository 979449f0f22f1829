"""Tiled diffusion for canvases larger than the model's tile (MultiDiffusion, Bar-Tal et al. 2023).

A canvas of any size is denoised as overlapping windows of the model's tile size. At every step each
window's noise prediction is computed (with the window's crop of the SPADE condition, guided per window
as usual) and the predictions are fused into one canvas-wide prediction by a weighted average over the
overlaps; the scheduler then steps the whole canvas at once. Since every window sees the same fused
canvas at the next step, neighbouring windows agree on their overlap and the result is one seamless
image, not a mosaic. The weights fall off linearly towards a window's inner edges (never to zero), so a
window's border pixels, where its receptive field is cut, count least.

Windows are evaluated ``window_batch`` at a time, so peak memory depends on that batch and on the
tile, not on the canvas (the canvas itself costs a few float32 copies: 48 MB per 2000 x 2000 x 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.diffusion import guided_eps, prepare_condition
from engine.errors import NuDiffError
from engine.unet import ConditionMaps

__all__ = ["window_positions", "WindowGrid", "TiledDenoiser", "TilingOptions", "DEFAULT_OVERLAP_FRACTION",
           "seam_score"]

#: default overlap between neighbouring windows, as a fraction of the tile side
DEFAULT_OVERLAP_FRACTION = 0.25


@dataclass(frozen=True)
class TilingOptions:
    """How a sampling call treats canvases larger than one window, and its memory budget.

    tile: window side in px (default: the model's sampling size; a multiple of its downsampling factor).
    overlap: px shared by neighbouring windows (default tile // 4; 0 = naive stitching, for comparison).
    max_window_batch: windows per forward at most (lowered to fit the budget).
    max_memory_gb: the call's memory budget in GiB (default engine.memory.default_budget_gb()).
    """

    tile: int | None = None
    overlap: int | None = None
    max_window_batch: int = 8
    max_memory_gb: float | None = None

    def __post_init__(self):
        if self.tile is not None and int(self.tile) < 8:
            raise NuDiffError(f"tile must be at least 8 px, got {self.tile}")
        if self.overlap is not None and int(self.overlap) < 0:
            raise NuDiffError(f"overlap must be 0 or more px, got {self.overlap}")
        if self.tile is not None and self.overlap is not None and int(self.overlap) >= int(self.tile):
            raise NuDiffError(f"overlap ({self.overlap} px) must be smaller than the tile ({self.tile} px)")
        if int(self.max_window_batch) < 1:
            raise NuDiffError(f"window batch must be at least 1, got {self.max_window_batch}")
        if self.max_memory_gb is not None and not float(self.max_memory_gb) > 0:
            raise NuDiffError(f"memory budget must be a positive number of GiB, got {self.max_memory_gb}")


def window_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Window origins along one axis of `length` px: stride tile - overlap, the last flush with the end.

    A side not longer than the tile has one window at 0 (the caller pads the canvas to the tile).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    pos = list(range(0, length - tile, stride))
    pos.append(length - tile)
    return pos


def _ramp(n: int, overlap: int) -> torch.Tensor:
    """1-D window weight: rises linearly over `overlap` px from each edge, > 0 everywhere, 1 inside."""
    i = torch.arange(n, dtype=torch.float32)
    if overlap <= 0:
        return torch.ones(n)
    return torch.minimum(torch.ones(n), torch.minimum(i + 0.5, n - i - 0.5) / overlap)


@dataclass(frozen=True)
class WindowGrid:
    """The windows covering an (height, width) canvas: tile x tile px each, `overlap` px shared."""

    height: int
    width: int
    tile: int
    overlap: int

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) top-left corners, row-major."""
        return [(y, x) for y in window_positions(self.height, self.tile, self.overlap)
                for x in window_positions(self.width, self.tile, self.overlap)]

    def __len__(self) -> int:
        return len(self.origins)

    def weight(self) -> torch.Tensor:
        """(tile, tile) float32 blending weight of one window."""
        r = _ramp(self.tile, self.overlap)
        return r[:, None] * r[None, :]

    def edges(self) -> tuple[list[int], list[int]]:
        """Rows and columns where a window begins or ends inside the canvas (where seams would show).

        An edge at e lies between pixels e - 1 and e."""
        t = self.tile
        ys = sorted({e for y, _ in self.origins for e in (y, y + t) if 0 < e < self.height})
        xs = sorted({e for _, x in self.origins for e in (x, x + t) if 0 < e < self.width})
        return ys, xs


def seam_score(image, rows: list[int], cols: list[int]) -> float:
    """Mean absolute grey-level step across the given edges / the same across all other pixel pairs.

    image: (H, W) or (H, W, C) array. rows / cols: edges (between pixels e - 1 and e), e.g.
    WindowGrid.edges(). About 1.0 means the edges are invisible; a stitched mosaic scores well above.
    """
    import numpy as np

    a = np.asarray(image, np.float64)
    g = a.mean(-1) if a.ndim == 3 else a
    dy = np.abs(np.diff(g, axis=0))  # dy[e - 1] is the step between rows e - 1 and e
    dx = np.abs(np.diff(g, axis=1))
    on_r = np.zeros(dy.shape[0], bool)
    on_r[[e - 1 for e in rows]] = True
    on_c = np.zeros(dx.shape[1], bool)
    on_c[[e - 1 for e in cols]] = True
    border = np.concatenate([dy[on_r].ravel(), dx[:, on_c].ravel()])
    inner = np.concatenate([dy[~on_r].ravel(), dx[:, ~on_c].ravel()])
    if border.size == 0 or inner.size == 0 or inner.mean() == 0:
        return float("nan")
    return float(border.mean() / inner.mean())


class TiledDenoiser:
    """Callable (x, t, cond, w) -> fused guided noise prediction over a :class:`WindowGrid`.

    x: (B, C, H, W) canvases; t: (B,) timesteps; cond: (B, 3, H, W) structures or None. Windows of all
    canvases in the batch are evaluated ``window_batch`` at a time (each a guided pass: a conditional
    and an unconditional half when w > 0). ``on_batch()`` is called after each window batch (progress),
    ``cancel()`` polled before each. A grid with overlap 0 is naive stitching (each pixel takes its one
    window's prediction), kept for comparison (bench/large_fields.py).
    """

    def __init__(self, model: nn.Module, grid: WindowGrid, *, window_batch: int = 4,
                 on_batch: Callable[[], None] | None = None, cancel: Callable[[], bool] | None = None,
                 cache_bytes: int = 0):
        if window_batch < 1:
            raise ValueError("window_batch must be at least 1")
        self.model, self.grid, self.window_batch = model, grid, int(window_batch)
        self.on_batch, self.cancel = on_batch, cancel
        self.cache_bytes = int(cache_bytes)  # for the windows' SPADE modulation, shared equally by the batches
        self._weight: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None
        self._maps: tuple[torch.Tensor, float, dict[int, ConditionMaps]] | None = None  # (cond, w, per batch)

    def batches_per_step(self, canvases: int = 1) -> int:
        return -(-len(self.grid) * canvases // self.window_batch)

    def _weights(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weight is None or self._weight.device != torch.device(device):
            g, t = self.grid, self.grid.tile
            w = g.weight().to(device)
            norm = torch.zeros(g.height, g.width, device=device)
            for y, x in g.origins:
                norm[y:y + t, x:x + t] += w
            self._weight, self._norm = w, norm
        return self._weight, self._norm

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w: float) -> torch.Tensor:
        from engine.samplers import Cancelled  # samplers calls this object; imported late to keep one direction

        b, _, h, wd = x.shape
        if (h, wd) != (self.grid.height, self.grid.width):
            raise ValueError(f"canvas {h}x{wd} does not match the window grid {self.grid.height}x{self.grid.width}")
        weight, norm = self._weights(x.device)
        tile = self.grid.tile
        items = [(i, y, xx) for i in range(b) for y, xx in self.grid.origins]
        out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        for start in range(0, len(items), self.window_batch):
            if self.cancel is not None and self.cancel():
                raise Cancelled("cancelled")
            chunk = items[start:start + self.window_batch]
            xs = torch.stack([x[i, :, y:y + tile, xx:xx + tile] for i, y, xx in chunk])
            ts = torch.stack([t[i] for i, _, _ in chunk])
            eps = guided_eps(self.model, xs, ts, self._condition(cond, w, chunk, start, len(items)), w).float()
            for e, (i, y, xx) in zip(eps, chunk):
                out[i, :, y:y + tile, xx:xx + tile] += e * weight
            if self.on_batch is not None:
                self.on_batch()
        return out / norm

    def _condition(self, cond: torch.Tensor | None, w: float, chunk: list[tuple[int, int, int]], start: int,
                   n_items: int) -> torch.Tensor | ConditionMaps | None:
        """The windows' structures for guided_eps; with a cache, kept (with their SPADE modulation) for the
        later steps of the same sampling run, i.e. while the same condition tensor and w are passed."""
        if cond is None:
            return None
        if self.cache_bytes > 0:
            if self._maps is None or self._maps[0] is not cond or self._maps[1] != w:
                self._maps = (cond, w, {})
            if start in self._maps[2]:
                return self._maps[2][start]
        tile = self.grid.tile
        windows = torch.stack([cond[i, :, y:y + tile, xx:xx + tile] for i, y, xx in chunk])
        if self.cache_bytes <= 0:
            return windows
        share = self.cache_bytes // -(-n_items // self.window_batch)
        self._maps[2][start] = prepare_condition(windows, w, share)
        return self._maps[2][start]
