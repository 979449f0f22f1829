"""Synthetic-set quality: morphology statistics and distances, alignment scores, report, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli import main
from engine.errors import DataError
from engine.quality import (APPEARANCE, PER_NUCLEUS, PER_TILE, alignment_score, appearance_distance,
                            appearance_stats, format_quality_markdown, hematoxylin_alignment, morphology_distance,
                            morphology_stats, quality_report)
from engine.synthetic import make_tile, write_folder


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_tile(64, seed=i) for i in range(5)]


def test_morphology_stats_on_known_shapes():
    inst = np.zeros((100, 100), np.int32)
    inst[10:20, 10:20] = 3  # 10 x 10 square
    inst[50:54, 30:46] = 9  # 4 x 16 bar
    stats = morphology_stats([inst, np.zeros((50, 50), np.int32)])
    np.testing.assert_array_equal(stats["nuclei_per_tile"], [2, 0])
    np.testing.assert_allclose(stats["density"], [2.0, 0.0])
    np.testing.assert_allclose(stats["fg_fraction"], [164 / 1e4, 0.0])
    np.testing.assert_array_equal(stats["area"], [100, 64])
    assert stats["eccentricity"][0] == pytest.approx(0.0, abs=1e-9) and stats["eccentricity"][1] > 0.9
    np.testing.assert_allclose(stats["solidity"], [1.0, 1.0])
    with pytest.raises(DataError):
        morphology_stats([np.zeros((4, 4), np.float32)])


def test_identical_sets_have_zero_distance_and_different_ones_do_not(tiles):
    insts = [t[1] for t in tiles]
    same = morphology_distance(insts, [i.copy() for i in insts])
    for key in (*PER_TILE, *PER_NUCLEUS):
        assert same[key]["wasserstein"] == 0.0 and same[key]["normalised"] == 0.0
    assert same["mean_normalised"] == 0.0
    # nuclei grown by a 2 px dilation: larger area and foreground, same count
    from scipy import ndimage

    grown = [ndimage.grey_dilation(i, size=(5, 5)) for i in insts]
    diff = morphology_distance(insts, grown)
    assert diff["area"]["wasserstein"] > 10 and diff["fg_fraction"]["wasserstein"] > 0.05
    assert diff["mean_normalised"] > 0.2


def test_appearance_stats_on_known_images():
    inst = np.zeros((32, 32), np.int32)
    inst[8:16, 8:16] = 1
    flat = np.full((32, 32, 3), 200, np.uint8)
    flat[inst > 0] = 80  # grey 200 background, grey 80 nucleus
    noisy = np.clip(flat + np.random.default_rng(0).normal(0, 10, flat.shape[:2])[..., None], 0, 255).astype(np.uint8)
    blank = np.zeros((32, 32), np.int32)
    stats = appearance_stats([flat, noisy, flat], [inst, inst, blank])
    assert stats["contrast"][0] == pytest.approx(120, abs=0.5)
    assert stats["nucleus_texture"][0] == pytest.approx(0, abs=0.5)
    assert stats["background_texture"][0] == pytest.approx(0, abs=0.5)
    assert stats["contrast"][1] == pytest.approx(120, abs=5)  # medians ignore the noise
    assert 8 < stats["nucleus_texture"][1] < 12 and 8 < stats["background_texture"][1] < 12
    assert stats["sharpness"][1] > stats["sharpness"][0] > 0  # only the edges of the square in the flat image
    assert np.isnan(stats["contrast"][2]) and np.isnan(stats["nucleus_texture"][2])  # no nuclei: nan, not 0
    assert stats["background_texture"][2] > 0  # the unlabelled dark square is background texture
    with pytest.raises(DataError):
        appearance_stats([flat], [inst[:16]])


def test_appearance_distance_sees_starker_smoother_images(tiles):
    import cv2

    images, insts = [t[0] for t in tiles], [t[1] for t in tiles]
    real = appearance_stats(images, insts)
    same = appearance_distance(real, appearance_stats([i.copy() for i in images], insts))
    assert all(same[k]["wasserstein"] == 0.0 for k in APPEARANCE)
    darker, blurred = [], []  # nuclei darkened (starker); the whole image blurred (smoother)
    for im, inst in tiles:
        dark = im.astype(np.float32)
        dark[inst > 0] *= 0.6
        darker.append(dark.astype(np.uint8))
        blurred.append(cv2.GaussianBlur(im, (0, 0), 1.0))
    starker = appearance_distance(real, appearance_stats(darker, insts))
    assert starker["contrast"]["synthetic_mean"] > starker["contrast"]["real_mean"] + 10
    assert starker["contrast"]["normalised"] > 0.5
    smoother = appearance_distance(real, appearance_stats(blurred, insts))
    assert smoother["sharpness"]["synthetic_mean"] < 0.5 * smoother["sharpness"]["real_mean"]
    assert smoother["sharpness"]["normalised"] > 0.5


def test_aligned_procedural_pairs_score_high_and_mismatched_low(tiles):
    aligned = alignment_score([t[0] for t in tiles], [t[1] for t in tiles])
    assert aligned["n"] == 5 and len(aligned["per_image"]) == 5
    assert aligned["hematoxylin_dice"] > 0.75 and aligned["darker_fraction"] > 0.9
    shuffled = alignment_score([t[0] for t in tiles], [tiles[(i + 1) % 5][1] for i in range(5)])
    assert shuffled["hematoxylin_dice"] < aligned["hematoxylin_dice"] - 0.3
    assert shuffled["darker_fraction"] < 0.8
    flat = hematoxylin_alignment(np.full((16, 16, 3), 200, np.uint8), tiles[0][1][:16, :16])
    assert 0.0 <= flat["hematoxylin_dice"] <= 1.0


class _Oracle:
    """Stand-in segmenter that returns a given label for each image (keyed by its bytes)."""

    def __init__(self, pairs):
        self.table = {im.tobytes(): inst for im, inst in pairs}

    def predict(self, image):
        return self.table[np.asarray(image).tobytes()]


def test_alignment_with_a_segmenter(tiles):
    out = alignment_score([t[0] for t in tiles], [t[1] for t in tiles], segmenter=_Oracle(tiles))
    assert out["segmenter_dice"] == 1.0 and out["segmenter_aji"] == 1.0 and out["segmenter_pq"] == 1.0
    with pytest.raises(DataError):
        alignment_score([t[0] for t in tiles], [t[1] for t in tiles[:2]])


def test_report_for_a_basket_and_a_real_folder(tiles, labeled_folder):
    basket = [(im, inst, {"seed": i}) for i, (im, inst) in enumerate(tiles)]
    report = quality_report(basket, labeled_folder)
    json.dumps(report)  # serialisable for the studio
    assert report["n_synthetic"] == 5 and report["n_real_tiles"] == 3 and report["tile_size"] == 64
    assert len(report["per_pair"]) == 5 and report["per_pair"][0]["n_nuclei"] == int(tiles[0][1].max())
    assert set(report["alignment"]) == {"synthetic", "real"}
    assert set(report["morphology"]) == {"synthetic", "real", "distance"}
    assert set(report["appearance"]) == {"synthetic", "real", "distance"}
    assert report["appearance"]["synthetic"]["contrast"]["n"] == 5
    md = format_quality_markdown(report)
    assert "| Hematoxylin Dice (no model) |" in md and "| area |" in md and "Wasserstein" in md
    assert "| Nucleus contrast (background - nucleus) |" in md
    alone = quality_report(basket)  # no real data: alignment and statistics only
    assert "real" not in alone["alignment"] and "distance" not in alone["morphology"]
    assert "distance" not in alone["appearance"]
    assert "| area |" in format_quality_markdown(alone) and "| Fine texture" in format_quality_markdown(alone)
    with pytest.raises(DataError):
        quality_report([])


def test_report_notes_pairs_starker_than_real(tiles):
    real = [(im, inst) for im, inst in tiles]
    starker = []
    for im, inst in tiles:
        im = im.copy()
        im[inst > 0] //= 2  # nuclei twice as dark
        starker.append((im, inst))
    notes = quality_report(starker, real)["notes"]
    note = next(n for n in notes if n.startswith("synthetic nuclei stand out more than in real images"))
    assert "guidance scale w sets it" in note and "calibrate-w" in note
    fainter = [(np.where((inst > 0)[..., None], 255 - (255 - im) // 3, im).astype(np.uint8), inst)
               for im, inst in tiles]
    note = next(n for n in quality_report(fainter, real)["notes"] if "stand out" in n)
    assert note.startswith("synthetic nuclei stand out less") and "calibrated w" in note
    assert not any("stand out" in n for n in quality_report([(im.copy(), inst) for im, inst in tiles], real)["notes"])


def test_quality_cli(labeled_folder, tmp_path, capsys):
    synth = write_folder(tmp_path / "synth", n_images=2, size=64, seed=30)
    rc = main(["quality", "--synthetic", str(synth), "--real", str(labeled_folder), "--json",
               str(tmp_path / "q.json")])
    assert rc == 0
    assert "Hematoxylin Dice" in capsys.readouterr().out
    assert json.loads((tmp_path / "q.json").read_text())["n_synthetic"] == 2
    rc = main(["quality", "--synthetic", str(tmp_path / "missing")])
    assert rc == 2 and "not found" in capsys.readouterr().err
