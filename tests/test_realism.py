"""Realism measures: the classifier two-sample test and the anti-copying check (issue 21)."""

import numpy as np
import pytest

from engine.copying import copy_check, thumbnails, training_tiles
from engine.errors import DataError
from engine.synthetic import make_tile
from engine.two_sample import TwoSampleConfig, blur_tiles, two_sample_test, wilson_interval

FAST = TwoSampleConfig(epochs=25, batch_size=8, width=8, seed=0)


def _tiles(n, size=64, seed=0):
    """n procedural H&E-like tiles (uint8 RGB)."""
    return [make_tile(size, seed=seed + i)[0] for i in range(n)]


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(100, 100)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9630, abs=1e-3)


def test_blurred_tiles_are_told_apart():
    real = _tiles(24)
    res = two_sample_test(real[:12], blur_tiles(real[12:], 2.0), FAST)
    assert res.n_per_set == 12 and res.n_scored == 24 and res.tile_size == 64
    assert res.accuracy >= 0.85, res
    assert res.ci_low <= res.accuracy <= res.ci_high


def test_same_distribution_is_near_chance():
    real = _tiles(32, seed=100)
    res = two_sample_test(real[:16], real[16:], FAST)
    assert 0.25 <= res.accuracy <= 0.75, res
    assert res.ci_low < 0.5 < res.ci_high


def test_two_sample_is_deterministic_and_balances_sets():
    a, b = _tiles(10, seed=1), blur_tiles(_tiles(6, seed=50))
    r1, r2 = two_sample_test(a, b, FAST), two_sample_test(a, b, FAST)
    assert r1 == r2 and r1.n_per_set == 6


@pytest.mark.parametrize("first, second, match", [
    ([], [np.zeros((64, 64, 3), np.uint8)] * 4, "no first tiles"),
    ([np.zeros((64, 64, 3), np.uint8)] * 3, [np.zeros((64, 64, 3), np.uint8)] * 3, "at least 4"),
    ([np.zeros((64, 64, 3), np.uint8)] * 4, [np.zeros((32, 32, 3), np.uint8)] * 4, "differ in size"),
    ([np.zeros((64, 48, 3), np.uint8)] * 4, [np.zeros((64, 48, 3), np.uint8)] * 4, "square RGB"),
])
def test_two_sample_bad_input(first, second, match):
    with pytest.raises(DataError, match=match):
        two_sample_test(first, second, FAST)


def test_copy_check_flags_a_turned_copy_and_not_new_tiles():
    train = [make_tile(256, seed=s)[0] for s in range(3)]
    tiles, boxes = training_tiles(train, 64)
    assert len(tiles) == len(boxes) == 3 * 49
    copy = np.rot90(tiles[20], 1).copy()  # a training tile handed back, turned
    noisy_copy = np.clip(tiles[70].astype(int) + np.random.default_rng(0).integers(-3, 4, tiles[70].shape),
                         0, 255).astype(np.uint8)
    new = [make_tile(64, seed=1000 + i)[0] for i in range(4)]  # unseen tissue
    res = copy_check([new[0], copy, new[1], noisy_copy, new[2], new[3]], tiles, boxes, size=64)
    assert res.flagged == [1, 3], res.summary_line()
    assert res.nearest[1] == 20 and res.nearest[3] == 70
    assert res.distance[1] < 1e-6 < res.threshold
    d = res.to_dict()
    assert d["n_flagged"] == 2 and d["n_training_tiles"] == len(tiles)
    assert "2 of 6 synthetic tiles flagged" in res.summary_line()


def test_copy_check_reference_ignores_overlapping_tiles():
    """Overlapping crops of one image share pixels: with boxes they are not each other's neighbours, so
    the threshold is not driven to ~0 by them (without boxes it is)."""
    train = [make_tile(128, seed=s)[0] for s in range(2)]
    tiles, boxes = training_tiles(train, 64, stride=4)
    with_boxes = copy_check([tiles[0]], tiles, boxes, size=64)
    without = copy_check([tiles[0]], tiles, None)
    assert with_boxes.threshold > 1.5 * without.threshold
    assert with_boxes.real_nn["min"] > 0


def _brute_force(synthetic, tiles, boxes, size, queries):
    """The copy check's figures from whole distance matrices (what copy_check computes in blocks)."""
    from engine.copying import _dihedral

    ref = thumbnails(tiles).reshape(len(tiles), -1).astype(np.float64)
    rms = lambda q: np.sqrt(((q[:, None, :] - ref[None]) ** 2).mean(-1))  # noqa: E731
    d_rr = rms(ref[queries])
    b = np.asarray(boxes)
    same = (b[queries, None, 0] == b[None, :, 0]) & (np.abs(b[queries, None, 1] - b[None, :, 1]) < size) & \
        (np.abs(b[queries, None, 2] - b[None, :, 2]) < size)
    d_rr[same | (queries[:, None] == np.arange(len(ref))[None])] = np.inf
    syn = thumbnails(synthetic)
    d = np.min(np.stack([rms(v.reshape(len(v), -1).astype(np.float64)) for v in _dihedral(syn)]), axis=0)
    return float(np.quantile(d_rr.min(1), 0.01)), d.min(1), d.argmin(1)


def test_copy_check_in_blocks_gives_the_whole_matrix_figures():
    """Distances come a block of rows at a time (memory O(chunk * N), not N^2), and beyond max_queries the
    threshold comes from evenly spaced training tiles: the same figures as whole matrices of those rows."""
    train = [make_tile(192, seed=s)[0] for s in range(2)]
    tiles, boxes = training_tiles(train, 48)  # 2 x 49 tiles, overlapping at stride 24
    synthetic = [np.rot90(tiles[30]).copy(), *_tiles(4, size=48, seed=500)]
    n = len(tiles)
    for max_queries, queries in ((n, np.arange(n)), (10, np.unique(np.linspace(0, n - 1, 10).round().astype(int)))):
        threshold, dist, nearest = _brute_force(synthetic, tiles, boxes, 48, queries)
        res = copy_check(synthetic, tiles, boxes, size=48, max_queries=max_queries, chunk=7)
        assert res.threshold == pytest.approx(threshold, abs=1e-6)
        assert np.allclose(res.distance, dist, atol=1e-6) and list(res.nearest) == list(nearest)
        assert res.flagged == [0] and res.n_training_tiles == n
    assert copy_check(synthetic, tiles, boxes, size=48).threshold != \
        copy_check(synthetic, tiles, boxes, size=48, max_queries=10).threshold  # the subsample is used


def test_thumbnails_and_bad_input():
    th = thumbnails([np.full((100, 80, 3), 255, np.uint8)])
    assert th.shape == (1, 32, 32, 3) and th.dtype == np.float32 and np.allclose(th, 1.0)
    with pytest.raises(DataError, match="RGB"):
        thumbnails([np.zeros((10, 10), np.uint8)])
    with pytest.raises(DataError, match="no synthetic"):
        copy_check([], _tiles(3), None)
    with pytest.raises(DataError, match="two training tiles"):
        copy_check(_tiles(1), _tiles(1), None)


def test_quality_report_carries_both_measures(tmp_path):
    """engine.quality: the two-sample test against the real folder, the copy check against the training
    folder, both in the JSON report and its markdown (the CLI `quality` and the Export tab print it)."""
    from engine.quality import format_quality_markdown, quality_report
    from engine.synthetic import write_folder

    real = write_folder(tmp_path / "real", n_images=2, size=128, seed=0)
    synthetic = [make_tile(64, seed=500 + i) for i in range(8)]
    train_tiles = [make_tile(64, seed=900 + i) for i in range(3)]
    synthetic[3] = train_tiles[1]  # a training tile handed back
    report = quality_report(synthetic, real, realism=True, training=train_tiles)
    ts, cp = report["two_sample"], report["copying"]
    assert ts["n_per_set"] == 8 and ts["tile_size"] == 64 and 0 <= ts["accuracy"] <= 1
    assert cp["flagged"] == [3] and cp["n_training_tiles"] == 3
    md = format_quality_markdown(report)
    assert "**Classifier two-sample test:**" in md and f"**{ts['accuracy']:.3f}**" in md
    assert "**Copy check:** 1 of 8 synthetic tiles are near-copies of a training tile (#3)" in md
    assert any("near-copies of training tiles (#3)" in n for n in report["notes"])
    plain = quality_report(synthetic, real)
    assert "two_sample" not in plain and "copying" not in plain
