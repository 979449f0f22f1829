"""Guidance defaults (issue 21, item 5): a calibrated model starts at its calibrated w, in the CLI and in
the studio; a model without one at the paper's w = 2, which stays one flag / click away."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from engine.checkpoint import export_inference
from engine.guidance import GuidanceCalibration, store_calibration

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _calibrated(tmp_path, tiny_checkpoints, w=0.6):
    plain = export_inference(tiny_checkpoints[1], tmp_path / "plain", half=False)
    cal = export_inference(tiny_checkpoints[1], tmp_path / "calibrated", half=False)
    store_calibration(cal, GuidanceCalibration(w=w, real_contrast=50.0, contrast_by_w={0.0: 30.0, 1.0: 70.0},
                                       reference="test", n_tiles=2, size=32, sampler="ddim", steps=2, seed=0))
    return Path(plain), Path(cal)


def _manifest_w(out: Path) -> set[float]:
    with open(out / "manifest.csv") as f:
        return {float(row["w"]) for row in csv.DictReader(f)}


def test_cli_starts_from_the_calibrated_w(tmp_path, tiny_checkpoints, labeled_folder):
    plain, cal = _calibrated(tmp_path, tiny_checkpoints)
    labels = str(labeled_folder / "labels")
    runs = {"cal": (cal, []), "cal-paper": (cal, ["--w", "paper"]), "plain": (plain, []),
            "cal-3": (cal, ["--w", "3"])}
    for name, (ckpt, extra) in runs.items():
        r = _cli("synthesize", "--checkpoint", str(ckpt), "--labels", labels, "--steps", "2", *extra,
                 "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        if name == "cal":
            assert "w = 0.6, the calibrated w of calibrated.safetensors" in r.stderr
    assert _manifest_w(tmp_path / "cal") == {0.6}
    assert _manifest_w(tmp_path / "cal-paper") == {2.0}
    assert _manifest_w(tmp_path / "plain") == {2.0}
    assert _manifest_w(tmp_path / "cal-3") == {3.0}


def test_studio_slider_follows_the_model(tmp_path, tiny_checkpoints):
    from nudiff_app.state import AppContext
    from nudiff_app.synthesize_tab import PAPER_W, starting_w, w_advice

    plain, cal = _calibrated(tmp_path, tiny_checkpoints, w=1.25)
    ctx = AppContext(tmp_path / "work", image_checkpoint=cal)
    assert starting_w(None, ctx) == 1.25  # the default model: its calibrated w
    assert starting_w(str(plain), ctx) == PAPER_W == 2.0
    line, button, w = w_advice(str(cal), ctx)
    assert w == 1.25 and "**1.25**" in line and button["interactive"] is True
    line, button, w = w_advice(str(plain), ctx)
    assert w == 2.0 and "no calibrated w" in line and button["interactive"] is False
    line, _, w = w_advice(str(tmp_path / "missing.json"), ctx)
    assert w == {"__type__": "update"}  # an unreadable choice leaves the slider alone
