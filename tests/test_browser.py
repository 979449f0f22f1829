"""A pathologist's session in a real Chromium: train, sample, edit by hand, synthesize, curate, download.

Set NUDIFF_SCREENSHOTS=1 to also save a screenshot of each tab to docs/screenshots/<tab>.png.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
TIMEOUT = 180_000  # ms; CPU sampling on a busy 2-core machine
STEPS = 20 if os.environ.get("NUDIFF_SCREENSHOTS") == "1" else 4  # denoising steps
TRAIN_STEPS = 60 if os.environ.get("NUDIFF_SCREENSHOTS") == "1" else 6  # a loss curve worth a picture


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_checkpoints):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    pytest.importorskip("playwright.sync_api")
    from nudiff_app import build_app, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("studio_browser")
    models = tiny_checkpoints
    if os.environ.get("NUDIFF_SCREENSHOTS") == "1":  # nicer pictures: the shipped demo models, or these
        override = os.environ.get("NUDIFF_SCREENSHOT_CHECKPOINTS")  # "structure.json:image.json"
        if override:
            models = tuple(override.split(":", 1))
        else:
            from engine.demo import default_checkpoints

            models = default_checkpoints()
    from engine.checkpoint import export_inference, read_record, sample_size

    image = Path(models[1])  # a copy: the session calibrates its guidance, which writes to its record
    image = export_inference(image, work / "models" / image.with_suffix("").name, half=False)
    tile = sample_size(read_record(image)[1])  # the image model's window: 32 px (tiny), 128 px (demo)
    demo = build_app(work, structure_checkpoint=models[0], image_checkpoint=image)
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", work, tile
    finally:
        demo.nudiff.close()
        demo.close()


@pytest.fixture
def page(studio):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--no-first-run"])
        tall = os.environ.get("NUDIFF_SCREENSHOTS") == "1"
        ctx = browser.new_context(viewport={"width": 1360, "height": 1640 if tall else 1000}, accept_downloads=True)
        pg = ctx.new_page()
        pg.set_default_timeout(TIMEOUT)
        try:
            yield pg
        finally:
            ctx.close()
            browser.close()


def expect(locator):
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def _shot(page, name: str) -> None:
    if os.environ.get("NUDIFF_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(600)  # let images finish painting
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SHOTS / f"{name}.png"))  # viewport: the editor canvas misses full-page shots


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _text(page, elem_id: str, needle: str) -> str:
    loc = page.locator(f"#{elem_id}")
    loc.filter(has_text=needle).wait_for()
    return loc.inner_text()


def test_full_session_in_browser(studio, page, labeled_folder, tmp_path):
    url, work, _ = studio
    page.goto(url)
    page.locator("#st-sample").wait_for()
    tab_names = [t.inner_text().strip() for t in page.get_by_role("tab").all()]
    assert tab_names[:5] == ["Train", "Structures", "Edit", "Synthesize", "Export"]

    # --- Train: inspect a folder, train a tiny structure model in the background, follow it live
    _tab(page, "Train")
    page.locator("#train-folder textarea, #train-folder input").first.fill(str(labeled_folder))
    page.get_by_role("radio", name="test").check()
    page.get_by_role("button", name="Inspect folder").click()
    assert "3 images" in _text(page, "train-status", "images")
    page.locator("#train-run textarea, #train-run input").first.fill("browser-run")
    _set_number(page, "train-steps", TRAIN_STEPS)
    _set_number(page, "train-batch", 2)
    page.get_by_role("button", name="Train structure model").click()
    _text(page, "train-status", "Started structure training")
    page.reload()  # the job's state lives on the server: a reload still shows it
    page.locator("#st-sample").wait_for()
    _tab(page, "Train")
    job = _text(page, "train-job", "finished")
    assert "browser-run" in job and f"step {TRAIN_STEPS} / {TRAIN_STEPS}" in job
    assert f"Preview layouts (step {TRAIN_STEPS}," in job and "training tiles:" in job, job
    # the folder chosen before the reload is still there: inspect it again beside the finished run
    page.get_by_role("button", name="Inspect folder").click()
    assert "3 images" in _text(page, "train-status", "images")
    _shot(page, "train")

    # --- Structures: sample, select one, send to Edit
    _tab(page, "Structures")
    _set_number(page, "st-n", 4)
    _set_number(page, "st-steps", STEPS)
    _set_number(page, "st-oversample", 2)  # realism filter: sample 8, keep the 4 most like the training data
    _set_number(page, "st-outline", 3)  # outlines rounded after the watershed
    page.locator("#st-sample").click()
    status = _text(page, "st-status", "structures from")
    assert "4 structures" in status and "kept the 4 of 8 sampled layouts" in status
    assert "Outlines smoothed (σ 3 px)" in status
    thumbs = page.locator("#st-gallery button.thumbnail-item, #st-gallery .thumbnail-item")
    assert thumbs.count() >= 4
    thumbs.nth(1).click()
    expect(page.locator("#st-index input[type=number]").first).to_have_value("1")
    _shot(page, "structures")
    page.locator("#st-to-edit").click()

    # --- Edit: draw one nucleus with mouse strokes at the tile centre, apply
    before = _text(page, "ed-info", "nuclei")
    assert "sampled structure" in before
    canvas = page.locator("#ed-editor canvas").first
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    bb = canvas.bounding_box()
    cx, cy = bb["x"] + bb["width"] / 2, bb["y"] + bb["height"] / 2
    # one closed outline (the editor fills it); few pointer moves, as each one repaints the canvas
    for attempt in range(3):  # the canvas may still be loading its background on a busy machine
        page.mouse.move(cx + 48, cy)
        page.mouse.down()
        for t in range(30, 391, 30):
            page.mouse.move(cx + 48 * math.cos(math.radians(t)), cy + 48 * math.sin(math.radians(t)))
        page.mouse.up()
        page.locator("#ed-apply").click()
        status = page.locator("#ed-status")
        status.filter(has_text="Applied").or_(status.filter(has_text="Nothing drawn")).wait_for()
        if "Applied" in status.inner_text():
            break
        page.wait_for_timeout(1000)
    assert "Applied" in status.inner_text()
    assert "edited by hand" in page.locator("#ed-info").inner_text()
    _shot(page, "edit")
    # clicking a nucleus in the label map deletes it; Undo brings it back
    n_after = page.locator("#ed-info").inner_text().split(" nuclei")[0].split()[-1]
    page.locator("#ed-labels img").click()  # the centre: the nucleus just drawn
    _text(page, "ed-status", "Deleted a nucleus")
    page.locator("#ed-undo").click()
    _text(page, "ed-status", "Undone")
    assert f"{n_after} nuclei" in page.locator("#ed-info").inner_text()
    page.locator("#ed-to-synth").click()

    # --- Synthesize: one variant, few steps, add it to the basket
    assert "edited by hand" in _text(page, "sy-info", "Conditioning")
    _set_number(page, "sy-steps", STEPS)
    _set_number(page, "sy-variants", 1)
    page.locator("#sy-run").click()
    _text(page, "sy-status", "image(s) from")
    page.locator("#sy-gallery .thumbnail-item").first.click()
    page.locator("#sy-add").click()
    assert "pair_0001" in _text(page, "sy-status", "Added")
    _shot(page, "synthesize")

    # --- calibrate w for this image model on the labeled folder: stored, and the slider follows
    # (not with the demo models of a screenshot run: minutes on a CPU at their 128 px tiles)
    assert "calibrated w" in page.locator("#sy-wrec").inner_text().lower()
    if os.environ.get("NUDIFF_SCREENSHOTS") != "1":
        page.locator("#sy-calibrate").get_by_role("button", name="Calibrate w for this model").click()
        page.locator("#sy-cal-real textarea, #sy-cal-real input").first.fill(str(labeled_folder))
        _set_number(page, "sy-cal-n", 2)
        page.locator("#sy-cal-run").click()
        status = _text(page, "sy-status", "Calibrated")
        w = float(re.search(r"w = ([0-9.]+) \(nucleus contrast", status).group(1))
        assert float(page.locator("#sy-w input[type=number]").first.input_value()) == pytest.approx(w)
        assert f": {w:g} (its nuclei" in _text(page, "sy-wrec", "starts at the calibrated w of")

    # --- Export: accept, build the zip, download it
    _tab(page, "Export")
    _text(page, "ex-info", "pair_0001")
    page.locator("#ex-accept").click()
    _text(page, "ex-status", "accepted")
    page.locator("#ex-build").click()
    _text(page, "ex-status", "1 pairs (1 edited by hand)")
    _shot(page, "export")
    with page.expect_download() as dl:
        page.locator("#ex-download").click()
    path = tmp_path / "download.zip"
    dl.value.save_as(path)

    # the basket lives on the server: a reload finds it again
    page.reload()
    page.locator("#st-sample").wait_for()
    _tab(page, "Export")
    assert "accepted" in _text(page, "ex-info", "pair_0001")

    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert {"images/pair_0001.png", "labels/pair_0001.tif", "hovernet/pair_0001.npy",
                "geojson/pair_0001.geojson", "coco.json", "manifest.csv"} <= names
        image = cv2.imdecode(np.frombuffer(zf.read("images/pair_0001.png"), np.uint8), cv2.IMREAD_COLOR)
        label = tifffile.imread(io.BytesIO(zf.read("labels/pair_0001.tif")))
        hv = np.load(io.BytesIO(zf.read("hovernet/pair_0001.npy")))
        coco = json.loads(zf.read("coco.json"))
        gj = json.loads(zf.read("geojson/pair_0001.geojson"))
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    assert image.shape[:2] == label.shape and label.dtype == np.uint16
    n = int(label.max())
    assert n >= 1 and np.array_equal(np.unique(label), np.arange(n + 1))
    assert np.array_equal(hv[..., 3], label) and np.array_equal(hv[..., 2::-1].astype(np.uint8), image)
    assert sorted(a["instance_id"] for a in coco["annotations"]) == list(range(1, n + 1))
    assert sorted(f["properties"]["instance_id"] for f in gj["features"]) == list(range(1, n + 1))
    for a in coco["annotations"]:
        assert a["area"] == int((label == a["instance_id"]).sum())
    assert len(rows) == 1 and rows[0]["edited"] == "true" and int(rows[0]["n_nuclei"]) == n
    # the nucleus drawn at the tile centre is there: one compact nucleus covering the centre pixel
    h, w = label.shape
    k = int(label[h // 2, w // 2])
    assert k > 0
    ys, xs = np.nonzero(label == k)
    assert 5 <= ys.size <= 0.1 * h * w
    assert ys.min() < h // 2 < ys.max() and xs.min() < w // 2 < xs.max()


def test_a_field_larger_than_the_tile_is_edited_synthesized_and_exported_full_size(studio, page, tmp_path):
    """Upload a label map several windows wide (3 x 4 of the image model's tile: 96 x 128 px at the tiny
    models' 32 px, 384 x 512 px at the 128 px of the demo models of a screenshot run), synthesize, export."""
    from engine.structure import relabel
    from engine.synthetic import make_tile

    url, _, tile = studio
    h, w = 4 * tile, 3 * tile
    _, inst = make_tile(h, seed=8)
    inst = relabel(inst[:, :w])  # w (x) x h (y), rectangular
    size = f"{w} (x) × {h} (y) px"
    tifffile.imwrite(tmp_path / "field.tif", inst.astype(np.uint16))
    page.goto(url)
    page.locator("#st-sample").wait_for()
    _tab(page, "Edit")
    page.locator("#ed-upload input[type=file]").set_input_files(str(tmp_path / "field.tif"))
    info = _text(page, "ed-info", size)
    assert f"{int(inst.max())} nuclei" in info
    page.locator("#ed-overview img").wait_for()
    page.locator("#ed-to-synth").click()
    assert size in _text(page, "sy-info", "Conditioning")
    _set_number(page, "sy-steps", 3)
    _set_number(page, "sy-variants", 1)
    page.locator("#sy-run").click()
    status = _text(page, "sy-status", "image(s) from")
    assert f"windows of {tile} px" in status, status
    page.locator("#sy-gallery .thumbnail-item").first.click()
    page.locator("#sy-add").click()
    _text(page, "sy-status", "Added")
    _tab(page, "Export")
    page.locator("#ex-accept").click()
    _text(page, "ex-status", "accepted")
    page.locator("#ex-build").click()
    _text(page, "ex-status", "Exported")
    with page.expect_download() as dl:
        page.locator("#ex-download").click()
    path = tmp_path / "field.zip"
    dl.value.save_as(path)
    with zipfile.ZipFile(path) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        row = rows[-1]
        image = cv2.imdecode(np.frombuffer(zf.read(row["image"]), np.uint8), cv2.IMREAD_COLOR)
        label = tifffile.imread(io.BytesIO(zf.read(row["label"])))
    assert image.shape[:2] == label.shape == (h, w)
    assert np.array_equal(label > 0, inst > 0) and int(label.max()) == int(inst.max())
    assert row["windows"] and int(row["windows"]) > 1 and row["tile"] == str(tile)
