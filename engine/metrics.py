"""Nuclei instance-segmentation metrics: Dice, AJI, AJI+, PQ.

Definitions follow HoVer-Net's ``metrics/stats_utils.py`` (``get_dice_1``, ``get_fast_aji``,
``get_fast_aji_plus``, ``get_fast_pq``) and give the same numbers, computed from one pairwise
intersection matrix (``np.bincount`` over combined ids) instead of per-instance mask loops.

Inputs are (H, W) integer instance maps: 0 = background, any other value one instance. Ids need not
be consecutive; they are relabelled internally. Non-negative integer (or bool / integral float)
arrays only.

Conventions where HoVer-Net divides by zero (it returns nan or raises):

* ``dice``: both maps empty -> 1.0.
* ``aji`` / ``aji_plus``: no true and no predicted instance -> 1.0; exactly one side empty -> 0.0.
* ``pq``: no true and no predicted instance -> (1.0, 1.0, 1.0); no match at all -> (dq, 0.0, 0.0).

Pairing reproduces HoVer-Net exactly, including its ``union + 1e-6`` in the IoU used to choose
pairs for AJI / AJI+ (this breaks IoU ties towards the larger pair). One deliberate difference:
SQ is the exact mean IoU of matched pairs, where HoVer-Net divides by ``tp + 1e-6``; the two differ
by less than 1e-6 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import relabel_sequential

__all__ = ["relabel", "dice", "aji", "aji_plus", "pq"]

_EPS = 1.0e-6  # HoVer-Net's epsilon in the AJI pairing IoU


def _as_integer_map(inst: np.ndarray, name: str = "instance map") -> np.ndarray:
    """Return ``inst`` as a non-negative integer array; ValueError for floats with fractions,
    negative values or other dtypes."""
    a = np.asarray(inst)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} has non-integer values; expected integer instance ids")
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} has dtype {a.dtype}; expected an integer instance map")
    if a.size and np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ValueError(f"{name} has negative values; expected ids >= 0 (0 = background)")
    return a


def _relabel_count(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to consecutive ids 1..N keeping the order of the original ids (scikit-image's
    ``relabel_sequential``). Returns (same-shape int32 array, N)."""
    a = _as_integer_map(inst)
    if a.size == 0:
        return np.zeros(a.shape, np.int32), 0
    out, forward, _ = relabel_sequential(a)
    ids = forward.in_values
    return out.astype(np.int32, copy=False), int(len(ids) - (ids[0] == 0))


def relabel(inst: np.ndarray) -> np.ndarray:
    """(H, W) non-negative integer map -> (H, W) int32 with ids 1..N consecutive, order kept."""
    return _relabel_count(inst)[0]


@dataclass
class _Pairs:
    """Pairwise statistics of true (rows) vs predicted (columns) instances, float64."""

    inter: np.ndarray  # (nt, np) pixel intersections
    union: np.ndarray  # (nt, np) pixel unions (meaningful where inter > 0)
    true_area: np.ndarray  # (nt,)
    pred_area: np.ndarray  # (np,)


def _check_pair(true: np.ndarray, pred: np.ndarray) -> None:
    if np.shape(true) != np.shape(pred):
        raise ValueError(f"true and pred shapes differ: {np.shape(true)} vs {np.shape(pred)}")


def _pairwise(true: np.ndarray, pred: np.ndarray) -> _Pairs:
    _check_pair(true, pred)
    t, nt = _relabel_count(true)
    p, npred = _relabel_count(pred)
    t = t.ravel()
    p = p.ravel()
    true_area = np.bincount(t, minlength=nt + 1)[1:].astype(np.float64)
    pred_area = np.bincount(p, minlength=npred + 1)[1:].astype(np.float64)
    both = (t > 0) & (p > 0)
    combined = (t[both].astype(np.int64) - 1) * npred + (p[both].astype(np.int64) - 1)
    inter = np.bincount(combined, minlength=nt * npred).astype(np.float64).reshape(nt, npred)
    union = true_area[:, None] + pred_area[None, :] - inter
    return _Pairs(inter, union, true_area, pred_area)


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary foreground Dice (HoVer-Net ``get_dice_1``) in [0, 1]; 1.0 when both are empty."""
    _check_pair(true, pred)
    t = _as_integer_map(true, "true") > 0
    p = _as_integer_map(pred, "pred") > 0
    denom = int(t.sum()) + int(p.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(t, p).sum() / denom)


def _aggregate(pairs: _Pairs, rows: np.ndarray, cols: np.ndarray) -> float:
    """AJI ratio of given (true, pred) pairs: paired inter / (paired union + unpaired areas)."""
    overall_inter = pairs.inter[rows, cols].sum()
    overall_union = pairs.union[rows, cols].sum()
    unpaired_true = np.ones(len(pairs.true_area), dtype=bool)
    unpaired_true[rows] = False
    unpaired_pred = np.ones(len(pairs.pred_area), dtype=bool)
    unpaired_pred[cols] = False
    overall_union += pairs.true_area[unpaired_true].sum() + pairs.pred_area[unpaired_pred].sum()
    return float(overall_inter / overall_union)


def _empty_score(pairs: _Pairs) -> float | None:
    """1.0 when both maps are empty, 0.0 when one is, None otherwise."""
    nt, npred = pairs.inter.shape
    if nt == 0 and npred == 0:
        return 1.0
    if nt == 0 or npred == 0:
        return 0.0
    return None


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017; HoVer-Net ``get_fast_aji``) in [0, 1].

    Each true instance is paired with the prediction of highest IoU (a prediction may serve several
    true instances); unpaired instances of either side add their area to the union.
    """
    pairs = _pairwise(true, pred)
    special = _empty_score(pairs)
    if special is not None:
        return special
    iou = pairs.inter / (pairs.union + _EPS)
    best = np.argmax(iou, axis=1)
    best_iou = iou[np.arange(len(best)), best]
    rows = np.nonzero(best_iou > 0.0)[0]
    return _aggregate(pairs, rows, best[rows])


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ (HoVer-Net ``get_fast_aji_plus``) in [0, 1]: AJI with a one-to-one maximal-IoU
    (Hungarian) pairing, which avoids AJI's over-penalisation of merges."""
    pairs = _pairwise(true, pred)
    special = _empty_score(pairs)
    if special is not None:
        return special
    iou = pairs.inter / (pairs.union + _EPS)
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0.0
    return _aggregate(pairs, rows[keep], cols[keep])


def pq(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> tuple[float, float, float]:
    """Panoptic quality (HoVer-Net ``get_fast_pq``): returns (dq, sq, pq), each in [0, 1].

    A true and a predicted instance match when IoU > ``match_iou``; for ``match_iou >= 0.5`` such
    matches are unique, below that a Hungarian one-to-one pairing is used first.
    dq = tp / (tp + fp/2 + fn/2); sq = mean IoU of matches; pq = dq * sq.
    """
    if match_iou < 0.0:
        raise ValueError(f"match_iou must be >= 0, got {match_iou}")
    pairs = _pairwise(true, pred)
    nt, npred = pairs.inter.shape
    if nt == 0 and npred == 0:
        return 1.0, 1.0, 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(pairs.inter > 0, pairs.inter / pairs.union, 0.0)
    if match_iou >= 0.5:
        matched = iou[iou > match_iou]
    else:
        rows, cols = linear_sum_assignment(-iou)
        matched = iou[rows, cols]
        matched = matched[matched > match_iou]
    tp = len(matched)
    fp = npred - tp
    fn = nt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(matched.sum() / tp) if tp else 0.0
    return float(dq), sq, float(dq * sq)
