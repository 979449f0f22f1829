"""Anti-copying check: does a generator hand back the training images it was trained on?

Distance: every tile is shrunk to a 32 x 32 RGB thumbnail (area average, values in [0, 1]) and two
tiles are compared by the root-mean-square difference of their thumbnails, minimised over the eight
flips and quarter turns of the synthetic tile (training augments with them, so a memorised tile may
come back turned).

Reference: for each training tile, its nearest training tile that does not overlap it (another image,
or a disjoint part of the same image). A synthetic tile is flagged as a near-copy when it lies closer to
its nearest training tile than ``quantile`` (default 1 %) of the real tiles lie to theirs: closer than
almost any two distinct pieces of real tissue are to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from engine.errors import DataError

__all__ = ["THUMB", "CopyCheck", "thumbnails", "copy_check", "training_tiles"]

THUMB = 32  # thumbnail side in px


@dataclass
class CopyCheck:
    """Result of :func:`copy_check`. Distances are RMS differences of thumbnails, in [0, 1]."""

    nearest: list[int]  # per synthetic tile: index of its nearest training tile
    distance: list[float]  # per synthetic tile: distance to it
    threshold: float  # flag below this (the `quantile` of the real nearest-neighbour distances)
    real_nn: dict  # summary of the real tiles' own nearest-neighbour distances (min, q01, median)
    flagged: list[int] = field(default_factory=list)  # indices of synthetic near-copies
    n_training_tiles: int = 0
    quantile: float = 0.01

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["synthetic_nn"] = _summary(np.asarray(self.distance))
        d["n_flagged"] = len(self.flagged)
        return d

    def summary_line(self) -> str:
        s = _summary(np.asarray(self.distance))
        return (f"{len(self.flagged)} of {len(self.distance)} synthetic tiles flagged as near-copies "
                f"(nearest training tile: median {s['median']:.3f}, min {s['min']:.3f}; real tiles among "
                f"themselves: median {self.real_nn['median']:.3f}, 1st percentile {self.threshold:.3f})")


def _summary(d: np.ndarray) -> dict:
    if d.size == 0:
        return {"min": float("nan"), "q01": float("nan"), "median": float("nan")}
    return {"min": float(d.min()), "q01": float(np.quantile(d, 0.01)), "median": float(np.median(d))}


def thumbnails(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 32, 32, 3) float32 in [0, 1]: area-averaged thumbnails of uint8 RGB tiles of any size."""
    import cv2

    th = np.empty((len(tiles), THUMB, THUMB, 3), np.float32)  # filled in place: no list, stack or second copy
    for k, t in enumerate(tiles):
        t = np.asarray(t)
        if t.ndim != 3 or t.shape[2] != 3 or min(t.shape[:2]) < 1:
            raise DataError(f"copy check: tiles must be RGB images, got shape {t.shape}")
        th[k] = cv2.resize(np.ascontiguousarray(t), (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    th /= 255.0
    return th


def _dihedral(th: np.ndarray) -> list[np.ndarray]:
    views = []
    for flip in (False, True):
        v = th[:, :, ::-1] if flip else th
        for k in range(4):
            views.append(np.ascontiguousarray(np.rot90(v, k, axes=(1, 2))))
    return views


def training_tiles(images: Sequence[np.ndarray], size: int, stride: int | None = None
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Tiles of size x size (stride size/2) of the training images, and their boxes (N, 3): image, y, x."""
    from engine.data import tile_positions

    stride = stride or max(1, size // 2)
    tiles, boxes = [], []
    for k, im in enumerate(images):
        h, w = im.shape[:2]
        if h < size or w < size:
            continue
        for y in tile_positions(h, size, stride):
            for x in tile_positions(w, size, stride):
                tiles.append(im[y : y + size, x : x + size])
                boxes.append((k, y, x))
    return tiles, np.asarray(boxes, np.int64).reshape(-1, 3)


MAX_QUERIES = 8192  # training tiles whose own nearest neighbour sets the threshold (evenly spaced)
CHUNK = 128  # query rows per distance block: memory grows with CHUNK x (training tiles), not their square


def _rows_nearest(queries: np.ndarray, ref: np.ndarray, exclude=None,
                  chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``ref`` thumbnail of each query (its exact float64 distance, index), ``chunk`` queries at a time;
    exclude(start, d): sets to inf, in the block d of queries start..start + len(d), the pairs that may not count
    (or None)."""
    dist = np.empty(len(queries))
    index = np.empty(len(queries), np.int64)
    # squared distances as |q|^2 + |r|^2 - 2 q.r in float32, with r's terms made once a call (torch.cdist would copy
    # all of ref into a wider matrix for every block): within ~2e-4 of the exact RMS distance, enough to find
    # the nearest tile, whose distance is then computed exactly
    r = torch.from_numpy(np.ascontiguousarray(ref, np.float32).reshape(len(ref), -1))
    r2, scale = torch.linalg.vector_norm(r, dim=1).square(), 1.0 / r.shape[1]  # no N x D temporary
    for a in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[a:a + chunk], np.float32).reshape(-1, r.shape[1]))
        d = torch.addmm((q * q).sum(1)[:, None] + r2[None], q, r.T, alpha=-2.0).clamp_min_(0).mul_(scale).sqrt_()
        d = d.numpy()
        if exclude is not None:
            exclude(a, d)
        i = d.argmin(axis=1)
        exact = np.sqrt(np.square(queries[a:a + len(d)].astype(np.float64) - ref[i]).reshape(len(d), -1).mean(1))
        index[a:a + len(d)] = i
        dist[a:a + len(d)] = np.where(np.isfinite(d[np.arange(len(d)), i]), exact, np.inf)
    return dist, index


def copy_check(synthetic: Sequence[np.ndarray], train_tiles: Sequence[np.ndarray], boxes: np.ndarray | None = None,
               size: int | None = None, quantile: float = 0.01, max_queries: int = MAX_QUERIES,
               chunk: int = CHUNK) -> CopyCheck:
    """Nearest training tile of every synthetic tile, against the real tiles' own nearest neighbours.

    Args:
        synthetic: uint8 RGB tiles (any size; compared through thumbnails).
        train_tiles: uint8 RGB tiles of the training images, e.g. from :func:`training_tiles`.
        boxes: (N, 3) int: source image index, y, x of each training tile, so that overlapping tiles
            are not counted as each other's neighbours (None: every pair of tiles counts as distinct).
        size: side of the training tiles (for the overlap test; default: that of the first tile).
        quantile: flag synthetic tiles closer than this quantile of the real nearest-neighbour distances.
        max_queries: the real nearest-neighbour distances are those of every training tile when there are
            at most this many, else of this many evenly spaced ones (each against all N tiles); synthetic
            tiles are always compared with all N.
        chunk: distances are computed ``chunk`` rows at a time, so memory is O(chunk * N): the whole N x N
            matrix of many small tiles of large images would not fit (10 MoNuSeg fields in 32 px tiles:
            37,000 tiles, 11 GB).
    """
    if not len(synthetic):
        raise DataError("copy check: no synthetic tiles")
    if len(train_tiles) < 2:
        raise DataError("copy check: needs at least two training tiles")
    if not 0 < quantile < 1:
        raise DataError(f"copy check: quantile must be in (0, 1), got {quantile}")
    ref = thumbnails(train_tiles)
    size = size or int(np.asarray(train_tiles[0]).shape[0])
    n = len(ref)
    queries = np.arange(n) if n <= max_queries else np.unique(np.linspace(0, n - 1, max_queries).round().astype(int))
    b = None if boxes is None else np.asarray(boxes, np.int64)
    of_image = {} if b is None else {k: np.flatnonzero(b[:, 0] == k) for k in np.unique(b[:, 0])}

    def not_itself_nor_overlapping(a: int, d: np.ndarray) -> None:
        """Each query tile and the tiles of its own image that overlap it: compared within that image only."""
        q = queries[a:a + len(d)]
        d[np.arange(len(q)), q] = np.inf
        if b is None:
            return
        for k in np.unique(b[q, 0]):
            rows, cols = np.flatnonzero(b[q, 0] == k), of_image[k]
            near = (np.abs(b[q[rows], None, 1] - b[None, cols, 1]) < size) & \
                (np.abs(b[q[rows], None, 2] - b[None, cols, 2]) < size)
            r, c = np.nonzero(near)
            d[rows[r], cols[c]] = np.inf

    real_nn, _ = _rows_nearest(ref[queries], ref, not_itself_nor_overlapping, chunk)
    real_nn = real_nn[np.isfinite(real_nn)]
    if real_nn.size == 0:
        raise DataError("copy check: the training tiles all overlap each other; give more training images")
    threshold = float(np.quantile(real_nn, quantile))
    syn = thumbnails(synthetic)
    views = np.concatenate(_dihedral(syn))  # the 8 flips / turns of every tile, in one call: ref's norms once
    dists, indices = (a.reshape(8, len(syn)) for a in _rows_nearest(views, ref, None, chunk))  # (8, Ns)
    best, rows = dists.argmin(axis=0), np.arange(len(syn))  # per synthetic tile: its flip / turn nearest to any
    dist, nearest = dists[best, rows], indices[best, rows]
    flagged = [int(i) for i in np.flatnonzero(dist < threshold)]
    return CopyCheck(nearest=[int(i) for i in nearest], distance=[float(x) for x in dist], threshold=threshold,
                     real_nn=_summary(real_nn), flagged=flagged, n_training_tiles=n, quantile=quantile)
