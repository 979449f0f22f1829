"""Nuclei structure: conventions of instances_to_structure and the watershed round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.metrics import aji
from engine.structure import (dihedral, dihedral_batch, instances_to_structure, merge_fragments, relabel,
                              smooth_outlines, structure_to_instances)
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


def test_remove_small_equals_its_definition_on_random_maps():
    """engine.morphology.remove_small (scikit-image's remove_small_objects) drops exactly the objects of fewer
    than min_size pixels: 8-connected components of a bool mask, labels of an integer map."""
    import warnings

    from scipy import ndimage

    from engine.morphology import remove_small

    rng = np.random.default_rng(0)
    for i in range(60):
        shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        mask = rng.random(shape) < rng.random()
        labels = rng.integers(0, int(rng.integers(2, 20)), shape).astype([np.int32, np.int64, np.uint16][i % 3])
        comps, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        for min_size in (0, 1, 2, 3, 7, 50):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # (nor any warning, e.g. for a map of one label)
                got_mask, got_labels = remove_small(mask, min_size), remove_small(labels, min_size)
            small = np.bincount(comps.ravel()) < min_size
            np.testing.assert_array_equal(got_mask, mask & ~small[comps])
            assert got_mask.dtype == bool
            small = np.bincount(labels.ravel()) < min_size
            np.testing.assert_array_equal(got_labels, np.where(small[labels], 0, labels))
            assert got_labels.dtype == labels.dtype
    one = np.zeros((5, 5), np.int32)
    one[1:3, 1:3] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert remove_small(one, 5).max() == 0 and remove_small(one, 4).sum() == 4


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


def _layout_with_fragments() -> np.ndarray:
    """Four 12x12 nuclei (144 px); a 3x3 fragment on nucleus 1's right edge; a 10 px fragment between
    nuclei 2 and 3 that borders 3 more than 2; an isolated 3x3 nucleus."""
    inst = np.zeros((64, 64), np.int32)
    inst[2:14, 2:14] = 1
    inst[2:14, 30:42] = 2
    inst[18:30, 30:42] = 3
    inst[40:52, 40:52] = 4
    inst[6:9, 14:17] = 5            # fragment touching nucleus 1 only
    inst[14:17, 36:38] = 6          # fragment in the 4-row gap between 2 (ends row 13) and 3 (row 18 on),
    inst[17, 35:39] = 6             # wider at the bottom: 6 boundary pixels in 3, 4 in 2
    inst[50:53, 5:8] = 7            # isolated small nucleus
    return inst


def test_merge_fragments_joins_pieces_to_their_nucleus_and_keeps_isolated_ones():
    inst = _layout_with_fragments()
    out = merge_fragments(inst, below=0.2)   # median area 144 -> fragments under 28.8 px
    assert out.dtype == np.int32 and out.max() == 5
    # the fragment on nucleus 1 now carries nucleus 1's id; the isolated one keeps an id of its own
    assert len(np.unique(out[2:14, 2:14])) == 1 and out[7, 15] == out[5, 5]
    assert out[51, 6] > 0 and out[51, 6] not in (out[5, 5], out[8, 35], out[24, 35], out[45, 45])
    # the fragment between 2 and 3 joins 3, with which it shares more boundary
    assert out[14, 36] == out[17, 35] == out[24, 35] != out[8, 35]
    # nothing but ids changes: the foreground is the same
    np.testing.assert_array_equal(out > 0, inst > 0)
    # off, or a threshold below every fragment: only renumbering
    np.testing.assert_array_equal(merge_fragments(inst, 0.0), relabel(inst))
    np.testing.assert_array_equal(merge_fragments(inst, 0.01), relabel(inst))
    assert merge_fragments(np.zeros((8, 8), np.int32)).max() == 0
    # a chain: the smallest piece joins a bigger fragment, which then joins the nucleus, whole
    chain = inst.copy()
    chain[60:62, 20:22] = 8                 # 4 px, touches only the 9 px piece 9
    chain[57:60, 19:22] = 9                 # 9 px, touches nucleus 10
    chain[45:57, 15:27] = 10
    out = merge_fragments(chain, below=0.2)
    assert out[61, 21] == out[58, 20] == out[50, 20] > 0 and out.max() == 6


def test_structure_to_instances_merges_fragments_on_request():
    inst = _layout_with_fragments()
    s = instances_to_structure(inst)
    tiny = dict(min_size=1, min_marker=1)  # keep even 9 px pieces
    exact = structure_to_instances(s, **tiny)
    assert exact.max() == 7 and aji(inst, exact) == pytest.approx(1.0)   # the exact structure keeps every piece
    merged = structure_to_instances(s, merge_below=0.2, **tiny)
    assert merged.max() == 5
    np.testing.assert_array_equal(merged, merge_fragments(exact, 0.2))


def test_dihedral_batch_equals_dihedral_for_every_transform():
    tiles = [make_tile(40, seed=20 + i) for i in range(8)]
    images = np.stack([t[0] for t in tiles])
    structures = np.stack([instances_to_structure(t[1]) for t in tiles])
    k = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    flip = torch.tensor([False] * 4 + [True] * 4)
    # (B, C, H, W) tensors; uint8 images and float16 structures, as training keeps them
    bi, bs = dihedral_batch(torch.from_numpy(images).permute(0, 3, 1, 2),
                            torch.from_numpy(structures).half().permute(0, 3, 1, 2), k, flip)
    assert bi.dtype == torch.uint8 and bs.dtype == torch.float16
    for b in range(8):
        img, st = dihedral(images[b], structures[b], int(k[b]), bool(flip[b]))
        np.testing.assert_array_equal(bi[b].permute(1, 2, 0).numpy(), img)
        np.testing.assert_allclose(bs[b].permute(1, 2, 0).float().numpy(), st, atol=1e-3)
        # and it is the structure of the transformed instance map
        moved = np.rot90(tiles[b][1][:, ::-1] if flip[b] else tiles[b][1], int(k[b]))
        np.testing.assert_allclose(bs[b].permute(1, 2, 0).float().numpy(),
                                   instances_to_structure(np.ascontiguousarray(moved)), atol=1e-3)
    with pytest.raises(ValueError, match="square"):
        dihedral_batch(torch.zeros(1, 3, 8, 6), torch.zeros(1, 3, 8, 6), k[:1], flip[:1])


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_smooth_outlines_rounds_ragged_nuclei_and_loses_none():
    from scipy import ndimage
    from skimage.measure import regionprops

    rng = np.random.default_rng(0)
    inst = np.zeros((96, 96), np.int32)
    inst[_disc(inst.shape, 24, 24, 12)] = 3                 # ragged below: spurs and notches on the rim
    inst[_disc(inst.shape, 24, 47, 10)] = 7                 # touches nucleus 3
    rim = _disc(inst.shape, 24, 24, 14) & ~_disc(inst.shape, 24, 24, 10) & (inst != 7)
    inst[rim & (rng.random(inst.shape) < 0.35)] = 3
    inst[rim & (rng.random(inst.shape) < 0.25) & (inst == 3)] = 0
    inst[70:72, 70:72] = 9                                  # 4 px: a blur of sigma 2 would erase it
    inst[60:96, 0:6] = 12                                   # cut by the image border (left and bottom)
    out = smooth_outlines(inst, 2.0)
    assert out.dtype == np.int32 and out.max() == 4         # ids 1..4, consecutive, in the input's order
    before, after = regionprops(relabel(inst)), regionprops(out)
    assert after[0].solidity > 0.95 and before[0].solidity < 0.8   # the ragged nucleus is round now
    assert abs(after[0].area - before[0].area) < 0.1 * before[0].area
    assert after[1].solidity > 0.95 and not np.any((out == 1) & (out == 2))
    # each nucleus is one piece; the tiny one keeps its pixels; the border nucleus still meets the border
    assert [ndimage.label(out == k)[1] for k in range(1, 5)] == [1, 1, 1, 1]
    np.testing.assert_array_equal(out[70:72, 70:72], 3)
    assert (out[60:96, 0] == 4).all() and (out[95, 0:6] == 4).all()
    # background further than 3 sigma from every nucleus stays background; sigma 0 only renumbers
    assert not out[ndimage.distance_transform_edt(inst == 0) > 6].any()
    np.testing.assert_array_equal(smooth_outlines(inst, 0), relabel(inst))
    assert smooth_outlines(np.zeros((8, 8), np.int32), 2.0).max() == 0
