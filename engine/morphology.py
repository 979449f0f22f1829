"""Shape measures of the nuclei in an instance map, shared by the layout filter (engine.curate) and the
quality report (engine.quality): one reading of the nuclei (``skimage.measure.regionprops``), per-tile
counts, and per-nucleus solidity that never fails on a degenerate hull; and the one removal of small
objects (``skimage.morphology.remove_small_objects``) for the watershed (engine.structure) and the
procedural tiles (engine.synthetic).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np

from engine.errors import DataError, NuDiffError

__all__ = ["nuclei", "tile_measures", "solidity", "solidities", "remove_small"]


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


def remove_small(objects: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of `objects` without those of fewer than `min_size` pixels: the 8-connected components of a bool
    mask, or the labels of an integer map (each label one object, whatever its shape); same dtype."""
    from skimage.morphology import remove_small_objects

    # scikit-image 0.26 takes max_size (removes <= max_size) and deprecates min_size (removes < min_size)
    size = ({"max_size": max(0, min_size - 1)} if "max_size" in inspect.signature(remove_small_objects).parameters
            else {"min_size": min_size})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Only one label was provided")  # (a map of one nucleus)
        return remove_small_objects(np.asarray(objects), connectivity=2, **size)
