"""Nuclei structure: conventions of instances_to_structure and the watershed round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.metrics import aji
from engine.structure import instances_to_structure, relabel, structure_to_instances
from engine.synthetic import make_tile

REAL_LABELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg" / "train" / "labels"


def test_structure_conventions_on_a_rectangle():
    inst = np.zeros((12, 14), np.int32)
    inst[2:7, 3:10] = 42  # 5 rows x 7 cols, centre at row 4, col 6
    s = instances_to_structure(inst)
    assert s.shape == (12, 14, 3) and s.dtype == np.float32
    assert s.min() >= -1 and s.max() <= 1
    assert (s[..., 0][inst > 0] == 1).all() and (s[..., 0][inst == 0] == -1).all()
    assert (s[..., 1:][inst == 0] == 0).all()
    h, v = s[..., 1], s[..., 2]
    # horizontal: -1 at the left column, +1 at the right, 0 at the centre column, increasing
    np.testing.assert_allclose(h[4, 3:10], [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1], atol=1e-6)
    np.testing.assert_allclose(v[2:7, 6], [-1, -0.5, 0, 0.5, 1], atol=1e-6)
    # each row of the horizontal map is the same (offset depends on the column only)
    assert np.allclose(h[2:7, 3:10], h[4, 3:10][None])


def test_structure_handles_noncontiguous_ids_and_asymmetric_sides():
    inst = np.zeros((10, 10), np.int64)
    inst[1:4, 1:3] = 1000
    inst[5, 2:9] = 7
    inst[6, 2:4] = 7  # centre of mass pulled left: sides normalised separately
    s = instances_to_structure(inst)
    h = s[..., 1][inst == 7]
    assert np.isclose(h.min(), -1) and np.isclose(h.max(), 1)
    with pytest.raises(ValueError):
        instances_to_structure(np.zeros((2, 2, 2), int))


def test_relabel_consecutive():
    a = np.array([[0, 5, 5], [9, 0, 2]])
    r = relabel(a)
    assert r.dtype == np.int32 and sorted(np.unique(r)) == [0, 1, 2, 3]
    assert (r == 0).sum() == 2


def test_round_trip_procedural():
    scores = []
    for seed in range(6):
        _, inst = make_tile(256, seed=seed)
        back = structure_to_instances(instances_to_structure(inst))
        assert back.dtype == np.int32
        assert sorted(np.unique(back)) == list(range(int(back.max()) + 1))  # consecutive ids
        scores.append(aji(inst, back))
    assert np.mean(scores) >= 0.95 and min(scores) >= 0.9


def test_round_trip_separates_touching_squares():
    inst = np.zeros((40, 40), np.int32)
    inst[5:20, 5:20] = 1
    inst[5:20, 20:35] = 2  # touching along a vertical line
    inst[20:35, 5:20] = 3  # touching below
    back = structure_to_instances(instances_to_structure(inst))
    assert back.max() == 3
    assert aji(inst, back) > 0.97


def test_noisy_structure_is_accepted():
    _, inst = make_tile(256, seed=3)
    s = instances_to_structure(inst)
    rng = np.random.default_rng(0)
    noisy = s * 1.1 + 0.05 * rng.standard_normal(s.shape).astype(np.float32)
    noisy[rng.random(s.shape[:2]) < 0.002, 0] = 1.0  # speckle of isolated false positives
    back = structure_to_instances(noisy)
    assert aji(inst, back) >= 0.85
    # channel-first input and NaNs do not crash
    back2 = structure_to_instances(np.moveaxis(np.where(rng.random(s.shape) < 1e-3, np.nan, s), -1, 0))
    assert back2.shape == inst.shape


def test_empty_and_all_background():
    assert structure_to_instances(np.full((16, 16, 3), -1, np.float32)).max() == 0
    s = instances_to_structure(np.zeros((8, 8), np.int32))
    assert (s[..., 0] == -1).all()


@pytest.mark.skipif(not REAL_LABELS.is_dir(), reason="real MoNuSeg data not present")
def test_round_trip_real_tiles():
    from PIL import Image

    scores = []
    for p in sorted(REAL_LABELS.glob("*.png"))[:8]:
        lab = np.array(Image.open(p))
        for y in range(0, 768, 256):
            for x in range(0, 768, 256):
                t = lab[y:y + 256, x:x + 256]
                scores.append(aji(t, structure_to_instances(instances_to_structure(t))))
    assert np.mean(scores) >= 0.95
