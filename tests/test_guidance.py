"""Guidance calibration (engine.guidance) on the tiny test-preset image model, with real files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import pipeline
from engine.checkpoint import export_inference, load_checkpoint
from engine.data import load_folder
from engine.errors import NuDiffError
from engine.guidance import calibrate_guidance, match_w, recommended_w, resolve_w, store_calibration
from engine.quality import appearance_stats

ROOT = Path(__file__).resolve().parents[1]


def test_match_w_interpolates_and_clamps():
    ws, c = [0, 1, 2, 3], [40.0, 60.0, 100.0, 120.0]
    assert match_w(ws, c, 80.0) == pytest.approx(1.5)
    assert match_w(ws, c, 60.0) == pytest.approx(1.0)
    assert match_w(ws, c, 45.0) == pytest.approx(0.25)
    assert match_w(ws, c, 10.0) == 0.0  # real nuclei fainter than even unguided ones
    assert match_w(ws, c, 500.0) == 3.0  # starker than the grid reaches
    # non-monotonic: the first crossing; no crossing at all: the nearest grid point
    assert match_w([0, 1, 2], [50.0, 90.0, 70.0], 80.0) == pytest.approx(0.75)
    assert match_w([0, 1, 2], [50.0, 90.0, 70.0], 95.0) == 1.0
    with pytest.raises(ValueError):
        match_w([1, 0], [1.0, 2.0], 1.5)
    with pytest.raises(ValueError):
        match_w([0, 1], [1.0, float("nan")], 1.5)


@pytest.fixture(scope="module")
def image_model(tiny_checkpoints):
    return pipeline.load_model(tiny_checkpoints[1], kind="image")


@pytest.fixture(scope="module")
def layouts(labeled_folder):
    """Four 32 px label maps with nuclei, cut from the procedural folder."""
    from engine.quality import load_pairs, real_tiles

    tiles = [t for t in real_tiles(load_pairs(labeled_folder), 32, 100) if t[1].max() > 0]
    assert len(tiles) >= 4
    return [inst for _, inst in tiles[:4]]


@pytest.mark.parametrize("true_w", [1.0, 2.0])
def test_calibration_finds_the_w_that_made_the_reference(image_model, layouts, true_w):
    # "Real" tiles made by the model itself at a known w, with the seeds the calibration uses: its contrast
    # curve passes exactly through theirs at that w, so the answer must be that w.
    images = pipeline.synthesize(image_model, layouts, w=true_w, steps=5, seed=3, batch_size=4)
    cal = calibrate_guidance(image_model, list(zip(images, layouts)), grid=[0, 1, 2, 3], n=4, steps=5, seed=3)
    assert cal.w == pytest.approx(true_w)
    assert cal.real_contrast == pytest.approx(float(np.nanmean(appearance_stats(images, layouts)["contrast"])))
    assert cal.contrast_by_w[true_w] == pytest.approx(cal.real_contrast)
    assert sorted(cal.contrast_by_w) == [0.0, 1.0, 2.0, 3.0] and cal.n_tiles == 4 and cal.size == 32
    other = pipeline.synthesize(image_model, layouts, w=0.0, steps=5, seed=3, batch_size=4)
    assert cal.contrast_by_w[0.0] == pytest.approx(float(np.nanmean(appearance_stats(other, layouts)["contrast"])))


def test_calibration_rejects_bad_requests(image_model, tiny_checkpoints, labeled_folder):
    with pytest.raises(NuDiffError, match="at least two"):
        calibrate_guidance(image_model, labeled_folder, grid=[2.0])
    structure = pipeline.load_model(tiny_checkpoints[0], kind="structure")
    with pytest.raises(NuDiffError, match="image models"):
        calibrate_guidance(structure, labeled_folder)
    empty = [(np.full((32, 32, 3), 200, np.uint8), np.zeros((32, 32), np.int32))]
    with pytest.raises(NuDiffError, match="no real tile with nuclei"):
        calibrate_guidance(image_model, empty, steps=2)
    with pytest.raises(NuDiffError, match="no calibrated w"):
        resolve_w("recommended", None, "m.safetensors")
    with pytest.raises(NuDiffError, match="a number or 'recommended'"):
        resolve_w("strong", 1.0)
    assert resolve_w("recommended", 1.25) == 1.25 and resolve_w(2, None) == 2.0


def test_stored_calibration_reaches_the_model_and_keeps_the_weights(tmp_path, tiny_checkpoints, labeled_folder):
    dst = export_inference(tiny_checkpoints[1], tmp_path / "image", half=False)
    model = pipeline.load_model(dst, kind="image")
    assert model.recommended_w is None
    cal = calibrate_guidance(model, labeled_folder, grid=[0, 2], n=3, steps=3)
    assert cal.reference == labeled_folder.name and 0 <= cal.w <= 2
    store_calibration(dst, cal)
    ck = load_checkpoint(dst, kind="image")  # verifies the weights against the record's SHA-256
    assert recommended_w(ck.record) == cal.w and ck.record["guidance"]["contrast_by_w"].keys() == {"0", "2"}
    assert pipeline.load_model(dst, kind="image").recommended_w == cal.w


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_calibrates_stores_and_synthesizes_at_the_recommended_w(tmp_path, tiny_checkpoints, labeled_folder):
    ckpt = export_inference(tiny_checkpoints[1], tmp_path / "image", half=False)
    labels = str(labeled_folder / "labels")
    r = _cli("synthesize", "--checkpoint", str(ckpt), "--labels", labels, "--w", "recommended", "--steps", "2",
             "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "no calibrated w" in r.stderr and "Traceback" not in r.stderr
    r = _cli("synthesize", "--checkpoint", str(ckpt), "--labels", labels, "--w", "strong", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "expected a number or 'recommended'" in r.stderr
    r = _cli("calibrate-w", "--checkpoint", str(ckpt), "--real", str(labeled_folder), "--grid", "0,1.5,3", "--n", "3",
             "--steps", "3", "--no-save")
    assert r.returncode == 0, r.stderr
    assert "recommended w =" in r.stdout and "guidance" not in json.loads(Path(ckpt).read_text())
    r = _cli("calibrate-w", "--checkpoint", str(ckpt), "--real", str(labeled_folder), "--grid", "0,1.5,3", "--n", "3",
             "--steps", "3")
    assert r.returncode == 0, r.stderr
    g = json.loads(Path(ckpt).read_text())["guidance"]
    assert g["n_tiles"] == 3 and g["steps"] == 3 and set(g["contrast_by_w"]) == {"0", "1.5", "3"}
    assert f"recommended w = {g['w']:g}" in r.stdout
    r = _cli("synthesize", "--checkpoint", str(ckpt), "--labels", labels, "--w", "recommended", "--steps", "2",
             "--out", str(tmp_path / "syn"))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "syn" / "manifest.csv") as f:
        assert {float(row["w"]) for row in csv.DictReader(f)} == {g["w"]}
    assert len(load_folder(tmp_path / "syn")[0]) == len(list(Path(labels).iterdir()))


def test_cli_export_model_with_reference_calibrates_an_image_model(tmp_path, tiny_checkpoints, labeled_folder):
    r = _cli("export-model", str(tiny_checkpoints[1]), str(tmp_path / "exported"), "--reference", str(labeled_folder))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "exported.json").read_text())
    assert rec["guidance"]["reference"] == labeled_folder.name and rec["guidance"]["n_tiles"] >= 1
    assert "recommended w" in r.stdout


def test_cli_export_model_keep_w_adds_colours_to_a_calibrated_model(tmp_path, tiny_checkpoints, labeled_folder):
    """--keep-w: the colours are added, the source's calibration and weights are kept, nothing is sampled."""
    import torch

    src = export_inference(tiny_checkpoints[1], tmp_path / "calibrated", half=False)
    cal = {"w": 3.25, "real_contrast": 60.0, "contrast_by_w": {"0": 20.0, "4": 70.0}, "reference": "elsewhere"}
    src.write_text(json.dumps({**json.loads(src.read_text()), "guidance": cal}))
    assert "reference.colour" not in load_checkpoint(src).tensors
    r = _cli("export-model", str(src), str(tmp_path / "kept"), "--fp32", "--reference", str(labeled_folder),
             "--keep-w")
    assert r.returncode == 0, r.stderr
    assert "recommended w" not in r.stdout
    assert json.loads((tmp_path / "kept.json").read_text())["guidance"] == cal
    a, b = load_checkpoint(src), load_checkpoint(tmp_path / "kept.json")
    assert b.tensors["reference.colour"].shape[1] == 4  # colours with the tiles' foreground fractions
    assert set(a.tensors) | {"reference.colour"} == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
