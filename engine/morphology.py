"""Shape measures of the nuclei in an instance map, shared by the layout filter (engine.curate) and the
quality report (engine.quality): one reading of the nuclei (``skimage.measure.regionprops``), per-tile
counts, and per-nucleus solidity that never fails on a degenerate hull.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from engine.errors import DataError, NuDiffError

__all__ = ["nuclei", "tile_measures", "solidity", "solidities"]


def nuclei(inst: Any, error: type[NuDiffError] = DataError) -> tuple[np.ndarray, list]:
    """(the instance map as an array, its regionprops, one per nucleus); `error` unless it is an (H, W)
    integer array."""
    from skimage.measure import regionprops

    inst = np.asarray(inst)
    if inst.ndim != 2 or not np.issubdtype(inst.dtype, np.integer):
        raise error(f"instance maps must be (H, W) integer arrays, got {inst.shape} {inst.dtype}")
    return inst, regionprops(inst.astype(np.int32, copy=False))


def tile_measures(inst: np.ndarray, regions: list) -> tuple[int, float, float]:
    """(nuclei, nuclei per 100 x 100 px, foreground fraction) of an instance map and its regions."""
    n = len(regions)
    return n, n * 1.0e4 / max(1, inst.size), float(np.count_nonzero(inst)) / max(1, inst.size)


def solidity(region: Any) -> float:
    """Solidity, or 1.0 where the convex hull is degenerate (single row / column of pixels)."""
    try:
        value = float(region.solidity)
    except Exception:  # noqa: BLE001 - qhull fails on collinear pixels
        return 1.0
    return value if np.isfinite(value) else 1.0


def solidities(regions: list) -> np.ndarray:
    """(n,) float64 solidity of each region (qhull's warnings on tiny nuclei silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([solidity(r) for r in regions], np.float64)
