"""Tests for engine.synthetic: shapes, determinism, plausibility, folder writing (speed: bench/engine_speed.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed

from engine.data import load_folder
from engine.synthetic import make_tile, write_folder


def test_shapes_dtypes_and_consecutive_ids():
    image, inst = make_tile(256, seed=0)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert inst.shape == (256, 256) and inst.dtype == np.int32
    ids = np.unique(inst)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, inst.max() + 1))
    assert 20 <= inst.max() <= 400


def test_same_seed_same_output_different_seed_differs():
    a_img, a_inst = make_tile(128, seed=7)
    b_img, b_inst = make_tile(128, seed=7)
    c_img, c_inst = make_tile(128, seed=8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_inst, b_inst)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_inst, c_inst)


def test_nuclei_look_like_hematoxylin_on_eosin():
    image, inst = make_tile(256, seed=1)
    fg = inst > 0
    gray = image.mean(axis=2)
    assert gray[fg].mean() < gray[~fg].mean() - 30  # nuclei darker
    hed = rgb2hed(image)
    assert hed[..., 0][fg].mean() > hed[..., 0][~fg].mean()  # more hematoxylin in nuclei
    background = image[~fg].mean(axis=0)
    assert background[0] > background[1] and background[2] > background[1]  # pink / purple
    assert image[~fg].std(axis=0).min() > 5  # textured, not flat


def test_nuclei_sizes_shapes_and_contacts():
    _, inst = make_tile(256, seed=2)
    areas = np.bincount(inst.ravel())[1:]
    assert areas.min() >= 12 and np.median(areas) < np.pi * 12 * 12
    for label, box in enumerate(ndimage.find_objects(inst), start=1):
        _, n_pieces = ndimage.label(inst[box] == label, structure=np.ones((3, 3)))
        assert n_pieces == 1  # every nucleus is one connected region
    right = (inst[:, :-1] > 0) & (inst[:, 1:] > 0) & (inst[:, :-1] != inst[:, 1:])
    assert right.any()  # some nuclei touch


def test_clean_keeps_largest_piece_drops_small_and_relabels_in_order():
    from engine.synthetic import _clean

    raw = np.zeros((12, 12), np.int32)
    raw[0:3, 0:3] = 4  # 9 px ...
    raw[10:12, 10:12] = 4  # ... and a 4 px piece of the same nucleus, dropped
    raw[5, 5] = 2  # 1 px: too small
    raw[6:9, 0:2] = 9  # 6 px
    raw[0:2, 6:9] = 7  # 6 px
    out = _clean(raw, min_area=5)
    assert out.dtype == np.int32
    want = np.zeros_like(raw)
    want[0:3, 0:3] = 1
    want[0:2, 6:9] = 2
    want[6:9, 0:2] = 3
    np.testing.assert_array_equal(out, want)
    assert _clean(raw, min_area=7).max() == 1 and _clean(raw, min_area=1)[5, 5] == 1


def test_density_and_size_parameters():
    _, sparse = make_tile(128, seed=3, density=0.05)
    _, dense = make_tile(128, seed=3, density=0.4)
    assert (sparse > 0).mean() < (dense > 0).mean()
    image, inst = make_tile(96, seed=0)
    assert image.shape == (96, 96, 3) and inst.shape == (96, 96)
    with pytest.raises(ValueError):
        make_tile(8)
    with pytest.raises(ValueError):
        make_tile(64, density=1.5)


@pytest.mark.parametrize("label_format", ["png", "tif", "npy"])
def test_write_folder_round_trips_through_data(tmp_path, label_format):
    folder = write_folder(tmp_path / "set", n_images=2, size=64, seed=5, label_format=label_format)
    items, problems = load_folder(folder)
    assert problems == []
    assert [it.stem for it in items] == ["synth_000", "synth_001"]
    for i, item in enumerate(items):
        image, inst = make_tile(64, seed=5 + i)
        assert np.array_equal(item.image, image)
        assert np.array_equal(item.inst, inst)
        assert item.label_path.suffix == f".{label_format}"


def test_write_folder_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError):
        write_folder(tmp_path, label_format="jpg")
