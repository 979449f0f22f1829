"""engine.metrics: hand-computed cases, a loop-based reference, edge conventions (speed: bench/engine_speed.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.metrics import aji, aji_plus, dice, pq, relabel
from engine.synthetic import make_tile


def row(*values: int) -> np.ndarray:
    """A (1, W) instance map from a list of ids."""
    return np.array([values], dtype=np.int32)


def approx(x: float):
    return pytest.approx(x, abs=1e-9)


# ----------------------------------------------------------------------------- hand-computed


def test_perfect_match():
    true = row(1, 1, 0, 2, 2, 2)
    # identical maps: every score is 1
    assert dice(true, true) == approx(1.0)
    assert aji(true, true) == approx(1.0)
    assert aji_plus(true, true) == approx(1.0)
    assert pq(true, true) == (approx(1.0), approx(1.0), approx(1.0))


def test_empty_prediction():
    true = row(1, 1, 1, 1, 0)
    pred = row(0, 0, 0, 0, 0)
    # dice = 2*0 / (4 + 0) = 0; aji: nothing paired -> 0 / 4 = 0
    assert dice(true, pred) == 0.0
    assert aji(true, pred) == 0.0
    assert aji_plus(true, pred) == 0.0
    # tp=0, fn=1 -> dq = 0 / (0 + 0.5) = 0, sq = 0
    assert pq(true, pred) == (0.0, 0.0, 0.0)


def test_empty_truth():
    true = row(0, 0, 0, 0, 0)
    pred = row(0, 5, 5, 5, 0)
    # dice = 0 / (0 + 3) = 0; aji = 0 / 3 = 0; tp=0, fp=1 -> dq = 0
    assert dice(true, pred) == 0.0
    assert aji(true, pred) == 0.0
    assert aji_plus(true, pred) == 0.0
    assert pq(true, pred) == (0.0, 0.0, 0.0)


def test_both_empty_conventions():
    empty = np.zeros((4, 4), np.int32)
    # HoVer-Net divides 0 by 0 here; documented convention: a perfect (empty) prediction
    assert dice(empty, empty) == 1.0
    assert aji(empty, empty) == 1.0
    assert aji_plus(empty, empty) == 1.0
    assert pq(empty, empty) == (1.0, 1.0, 1.0)


def test_split_one_true_into_two_predictions():
    true = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])  # one nucleus, 8 px
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])  # split into two halves of 4 px
    # foreground identical -> dice 1
    assert dice(true, pred) == approx(1.0)
    # IoU(t1, p1) = IoU(t1, p2) = 4/8; tie -> first prediction (p1): inter 4, union 8;
    # unpaired p2 adds 4 to the union -> 4 / 12
    assert aji(true, pred) == approx(1 / 3)
    assert aji_plus(true, pred) == approx(1 / 3)
    # IoU 0.5 is not > 0.5: no match; tp=0, fp=2, fn=1 -> (0, 0, 0)
    assert pq(true, pred) == (0.0, 0.0, 0.0)
    # match_iou 0.4 (Hungarian path): one match of IoU 0.5; tp=1, fp=1, fn=0
    # dq = 1 / (1 + 0.5) = 2/3, sq = 0.5, pq = 1/3
    dq, sq, pq_ = pq(true, pred, match_iou=0.4)
    assert (dq, sq, pq_) == (approx(2 / 3), approx(0.5), approx(1 / 3))


def test_merge_two_true_into_one_prediction():
    true = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])  # two nuclei of 4 px
    pred = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])  # merged into one of 8 px
    # AJI pairs both true nuclei with p1 (re-use allowed): inter 4+4, union 8+8 -> 0.5
    assert aji(true, pred) == approx(0.5)
    # AJI+ pairs one-to-one: (t1, p1) inter 4, union 8; unpaired t2 adds 4 -> 4 / 12
    assert aji_plus(true, pred) == approx(1 / 3)
    # no IoU > 0.5: tp=0, fp=1, fn=2 -> (0, 0, 0)
    assert pq(true, pred) == (0.0, 0.0, 0.0)


def test_partial_overlap_with_non_consecutive_ids():
    true = row(7, 7, 7, 7, 0, 0, 42, 42, 42, 0)
    pred = row(3, 3, 3, 0, 0, 100, 100, 100, 100, 0)
    # dice: |T| = 7, |P| = 7, |T & P| = 3 + 3 = 6 -> 12 / 14
    assert dice(true, pred) == approx(6 / 7)
    # (t7, p3): inter 3, union 4; (t42, p100): inter 3, union 4 -> AJI = 6 / 8
    assert aji(true, pred) == approx(0.75)
    assert aji_plus(true, pred) == approx(0.75)
    # both IoU 0.75 > 0.5: tp=2, fp=fn=0 -> dq 1, sq 0.75
    assert pq(true, pred) == (approx(1.0), approx(0.75), approx(0.75))


def test_unmatched_false_positive_and_false_negative():
    true = row(1, 1, 1, 1, 0, 2, 2, 0, 0, 0, 0)
    pred = row(1, 1, 1, 1, 0, 0, 0, 0, 9, 9, 9)
    # dice: |T & P| = 4, |T| + |P| = 6 + 7 -> 8 / 13
    assert dice(true, pred) == approx(8 / 13)
    # t1-p1 perfect (4/4); unpaired t2 (2 px) and p9 (3 px) join the union -> 4 / 9
    assert aji(true, pred) == approx(4 / 9)
    assert aji_plus(true, pred) == approx(4 / 9)
    # tp=1, fp=1, fn=1 -> dq = 1 / 2, sq = 1, pq = 0.5
    assert pq(true, pred) == (approx(0.5), approx(1.0), approx(0.5))


def test_aji_tie_broken_like_hovernet():
    # t1 = cols 0-3 (4 px); p1 = col 0 (1 px): IoU 1/4; p2 = cols 2-7 (6 px): IoU 2/8 = 1/4.
    # HoVer-Net's IoU uses union + 1e-6, so 2/(8+eps) > 1/(4+eps) and p2 wins:
    # inter 2, union 8, unpaired p1 adds 1 -> 2 / 9 (choosing p1 would give 1 / 10)
    true = row(1, 1, 1, 1, 0, 0, 0, 0)
    pred = row(1, 0, 2, 2, 2, 2, 2, 2)
    assert aji(true, pred) == approx(2 / 9)
    assert aji_plus(true, pred) == approx(2 / 9)


def test_inputs_validated():
    with pytest.raises(ValueError):
        aji(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError):
        dice(np.full((2, 2), -1), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        pq(np.full((2, 2), 0.5), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        pq(np.zeros((2, 2), int), np.zeros((2, 2), int), match_iou=-0.1)
    # integral floats and bools are accepted
    assert aji(np.ones((2, 2), float), np.ones((2, 2), bool)) == approx(1.0)


def test_relabel_keeps_order_and_handles_huge_ids():
    inst = np.array([[0, 50, 50], [7, 0, 2**40]], dtype=np.int64)
    np.testing.assert_array_equal(relabel(inst), [[0, 2, 2], [1, 0, 3]])
    assert relabel(inst).dtype == np.int32


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_relabel_equals_its_definition_and_skimage_on_random_maps(dtype):
    """relabel (scikit-image's relabel_sequential, then int32) is: the k-th smallest positive id becomes k."""
    from skimage.segmentation import relabel_sequential

    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    top = min(int(np.iinfo(dtype).max), 2**40)
    for i in range(40):
        inst = rng.integers(0, [6, 300, top][i % 3], (int(rng.integers(1, 25)), int(rng.integers(1, 25))))
        inst[rng.random(inst.shape) < rng.random()] = 0
        inst = inst.astype(dtype)
        want = np.zeros(inst.shape, np.int32)
        for k, v in enumerate(sorted(set(inst.ravel().tolist()) - {0}), start=1):
            want[inst == v] = k
        got = relabel(inst)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, relabel_sequential(inst)[0])
    assert relabel(np.zeros((0, 4), dtype)).shape == (0, 4)
    np.testing.assert_array_equal(relabel(np.array([[True, False]])), [[1, 0]])


# ----------------------------------------------------------------------------- properties


def _reference(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, tuple]:
    """Loop-over-instances AJI, AJI+ and PQ written straight from the definitions."""
    from scipy.optimize import linear_sum_assignment

    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros_like(inter)
    for a, t in enumerate(t_ids):
        tm = true == t
        for b, p in enumerate(p_ids):
            pm = pred == p
            inter[a, b] = np.logical_and(tm, pm).sum()
            union[a, b] = np.logical_or(tm, pm).sum()
    t_area = [(true == t).sum() for t in t_ids]
    p_area = [(pred == p).sum() for p in p_ids]

    def aggregate(pairs):
        i = sum(inter[a, b] for a, b in pairs)
        u = sum(union[a, b] for a, b in pairs)
        u += sum(t_area[a] for a in range(len(t_ids)) if a not in {x for x, _ in pairs})
        u += sum(p_area[b] for b in range(len(p_ids)) if b not in {y for _, y in pairs})
        return i / u

    score = inter / (union + 1e-6)
    aji_pairs = [(a, int(np.argmax(score[a]))) for a in range(len(t_ids))
                 if score[a].max() > 0]
    rows, cols = linear_sum_assignment(-score)
    plus_pairs = [(a, b) for a, b in zip(rows, cols) if score[a, b] > 0]
    iou = np.where(inter > 0, inter / np.maximum(union, 1), 0)
    matched = iou[iou > 0.5]
    tp, fp, fn = len(matched), len(p_ids) - len(matched), len(t_ids) - len(matched)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = matched.mean() if tp else 0.0
    return aggregate(aji_pairs), aggregate(plus_pairs), (dq, sq, dq * sq)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_loop_reference(seed):
    _, true = make_tile(64, seed=seed, density=0.35)
    # prediction: shifted truth, one merge, one split, one dropped and one spurious nucleus
    shifted = np.roll(true, (1, -1), axis=(0, 1))
    pred = np.where(shifted > 0, shifted * 3 + 11, 0)  # non-consecutive ids
    ids = [i for i in np.unique(pred) if i]
    pred[pred == ids[1]] = ids[0]
    pred[pred == ids[2]] = 0
    ys, xs = np.nonzero(pred == ids[3])
    pred[ys[: len(ys) // 2], xs[: len(xs) // 2]] = 999
    pred[60:64, 0:4] = 5000
    ref_aji, ref_plus, ref_pq = _reference(true, pred)
    assert aji(true, pred) == approx(ref_aji)
    assert aji_plus(true, pred) == approx(ref_plus)
    assert pq(true, pred) == tuple(approx(v) for v in ref_pq)
    assert 0.0 < aji(true, pred) < 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_identical_maps_with_permuted_ids_score_one(seed):
    rng = np.random.default_rng(seed)
    _, true = make_tile(96, seed=seed)
    n = int(true.max())
    new_ids = np.concatenate([[0], rng.permutation(n) * 1000 + 17])  # non-consecutive, shuffled
    pred = new_ids[true]
    assert aji(true, pred) == approx(1.0)
    assert aji_plus(true, pred) == approx(1.0)
    assert dice(true, pred) == approx(1.0)
    assert pq(true, pred) == (approx(1.0), approx(1.0), approx(1.0))


def _grid_map(cell: int = 50, gap: int = 4, size: int = 1000) -> np.ndarray:
    """size x size map of (size / cell)^2 square instances of side cell - gap, ids row-major from 1."""
    idx = np.arange(size) // cell
    inst = (idx[:, None] * (size // cell) + idx[None, :] + 1).astype(np.int32)
    inside = np.arange(size) % cell >= gap
    return np.where(inside[:, None] & inside[None, :], inst, 0)


def test_large_map_hand_computed():
    # 1000 x 1000, 400 squares of 46 x 46 px; prediction shifted 3 px right (cut at the right border)
    true = _grid_map()
    pred = np.zeros_like(true)
    pred[:, 3:] = true[:, :-3]
    side, shift, n, last = 46, 3, 400, 20  # 20 squares in the rightmost column lose 3 columns
    inter = n * side * (side - shift)
    union = (n - last) * side * (side + shift) + last * side * side
    assert aji(true, pred) == approx(inter / union)
    assert aji_plus(true, pred) == approx(inter / union)  # one-to-one pairs
    t_area, p_area = n * side * side, (n - last) * side * side + last * side * (side - shift)
    assert dice(true, pred) == approx(2 * inter / (t_area + p_area))
    iou_inner, iou_last = (side - shift) / (side + shift), (side - shift) / side
    dq, sq, pq_value = pq(true, pred)
    assert dq == approx(1.0)
    assert sq == approx(((n - last) * iou_inner + last * iou_last) / n)
    assert pq_value == approx(sq)
