"""assets/: the studio's static files and the example a first-time user can train on and edit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from engine.data import load_folder, read_label
from engine.synthetic import make_tile

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_example_folder_loads_and_has_nuclei():
    items, _ = load_folder(ASSETS / "example")
    assert len(items) == 3
    for it in items:
        assert it.image.shape == (256, 256, 3) and it.image.dtype == np.uint8
        assert it.inst.shape == (256, 256) and it.inst.max() >= 10  # at least ten nuclei per tile
    for p in sorted((ASSETS / "example" / "labels").iterdir()):
        assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # 16-bit label PNGs


def test_example_is_the_procedural_generator_output():
    items, _ = load_folder(ASSETS / "example")
    for k, it in enumerate(sorted(items, key=lambda it: it.stem)):
        image, inst = make_tile(256, seed=k)
        np.testing.assert_array_equal(it.image, image)
        np.testing.assert_array_equal(it.inst > 0, inst > 0)  # (ids are relabelled on reading)


def test_example_label_map_has_nuclei():
    inst = read_label(ASSETS / "example_label.png")
    assert inst.shape == (256, 256) and inst.max() >= 10
    np.testing.assert_array_equal(inst > 0, make_tile(256, seed=3)[1] > 0)


def test_assets_stay_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 1_000_000, f"assets/ holds {total} bytes"


def test_studio_loads_its_css_and_logo_from_assets():
    from nudiff_app import ui

    assert ui.CSS == (ASSETS / "studio.css").read_text() and "image-rendering: pixelated" in ui.CSS
    root = ET.fromstring(ui.LOGO)
    assert root.tag.endswith("svg") and root.get("viewBox") == "0 0 64 64"
    assert ui.EXAMPLE_FOLDER == ASSETS / "example" and ui.EXAMPLE_LABEL.is_file()
