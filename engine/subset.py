"""The paper's labeled subset: tiles clustered by their features (KMeans), then the tiles nearest each
cluster's centre taken round-robin across clusters until a fraction of all nuclei is reached."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.data import Tile
from engine.errors import DataError

__all__ = ["SubsetSelection", "plan_subset", "select_subset"]

@dataclass
class SubsetSelection:
    """Result of plan_subset."""

    indices: list[int]  # into the tiles, in selection order (round-robin, nearest centre first)
    feature_kind: str  # "resnet50" | "handcrafted"
    clusters: np.ndarray  # (n_tiles,) int cluster of every tile
    n_nuclei_selected: int
    n_nuclei_total: int
    fraction_requested: float = 0.0

    @property
    def fraction_reached(self) -> float:
        """Selected share of all nuclei instances (counted per tile), in [0, 1]."""
        return self.n_nuclei_selected / self.n_nuclei_total if self.n_nuclei_total else 1.0


def _round_robin(order: list[list[int]], counts: np.ndarray, target: float,
                 n_needed: int) -> list[int]:
    """Take the next-nearest tile of each cluster in turn until ``target`` nuclei (or, with no
    nuclei at all, ``n_needed`` tiles) are selected."""
    chosen: list[int] = []
    total = 0
    queues = [list(q) for q in order]
    while any(queues):
        for queue in queues:
            if not queue:
                continue
            index = queue.pop(0)
            chosen.append(index)
            total += int(counts[index])
            if (target > 0 and total >= target - 1e-9) or (target <= 0 and len(chosen) >= n_needed):
                return chosen
    return chosen


def plan_subset(tiles: Sequence[Tile], fraction: float, n_clusters: int = 6, seed: int = 0,
                feature_kind: str | None = None) -> SubsetSelection:
    """Select tiles as in the NuDiff paper: features -> KMeans -> tiles nearest their cluster
    centre, taken round-robin across clusters, until ``fraction`` of all nuclei instances (summed
    over tiles) is reached. Deterministic for a given seed.

    ``feature_kind`` None uses ResNet50 when available locally, else the handcrafted descriptor.
    """
    from sklearn.cluster import KMeans

    from engine.features import tile_features

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not tiles:
        raise DataError("no tiles to select a subset from")
    counts = np.array([int(t.inst.max()) for t in tiles], dtype=np.int64)
    feats, kind = tile_features([t.image for t in tiles], [t.inst for t in tiles], feature_kind)
    k = max(1, min(n_clusters, len(np.unique(feats.round(12), axis=0))))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(feats)
    distance = km.transform(feats)[np.arange(len(tiles)), km.labels_]
    order = [sorted(np.nonzero(km.labels_ == c)[0].tolist(), key=lambda i: (distance[i], i))
             for c in range(k)]
    total = int(counts.sum())
    chosen = _round_robin(order, counts, fraction * total, math.ceil(fraction * len(tiles)))
    return SubsetSelection(indices=chosen, feature_kind=kind, clusters=km.labels_.astype(int),
                           n_nuclei_selected=int(counts[chosen].sum()), n_nuclei_total=total,
                           fraction_requested=fraction)


def select_subset(tiles: Sequence[Tile], fraction: float, n_clusters: int = 6,
                  seed: int = 0) -> list[int]:
    """Indices (into ``tiles``, selection order) of the paper-style subset; see plan_subset."""
    return plan_subset(tiles, fraction, n_clusters, seed).indices
