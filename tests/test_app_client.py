"""The studio's API end to end: launch in-process on a free port, drive it with gradio_client."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from gradio_client import Client, handle_file

from engine.synthetic import make_tile

# the realism filter's test ranks the studio's layouts against ones sampled here: fp32 on both sides, as bf16
# kernels may round differently in another process (tests/conftest.py's studio fixture reads this)
STUDIO_PRECISION = "fp32"


@pytest.fixture(scope="module")
def client(studio):
    return Client(studio[1], verbose=False)


def test_api_names_are_stable(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    expected = {"/inspect_folder", "/upload_dataset", "/train_structure", "/train_image", "/stop_training",
                "/resume_training", "/training_status", "/sample_structures", "/cancel_structures",
                "/send_to_edit", "/send_to_synthesize", "/edit_upload_label", "/edit_blank", "/edit_apply",
                "/edit_undo", "/edit_clean", "/edit_delete_at", "/edit_to_synthesize", "/synthesize",
                "/cancel_synthesis", "/add_to_basket", "/add_all_to_basket", "/show_pair", "/accept_pair",
                "/reject_pair", "/export_zip", "/basket_quality", "/calibrate_w", "/use_calibrated_w",
                "/use_paper_w"}
    assert expected <= names, expected - names


def test_idle_queue_polls_slowly(studio):
    """Gradio's queue polls every 1 ms by default: the studio lengthens that (bench/idle_cost.py measures)."""
    from nudiff_app.ui import IDLE_POLL_S, PROGRESS_POLL_S

    q = studio[0]._queue
    assert q.sleep_when_free >= IDLE_POLL_S and q.progress_update_sleep_when_free >= PROGRESS_POLL_S


def test_inspect_folder_and_bad_folder(client, labeled_folder, tmp_path):
    status, summary, preview = client.predict(str(labeled_folder), 32, api_name="/inspect_folder")
    assert status.startswith("Inspected: 3 images")
    assert "Nuclei:" in summary and "Problems: 0 error(s)" in summary
    assert Path(preview).exists()
    status, _, _ = client.predict(str(tmp_path / "does-not-exist"), 32, api_name="/inspect_folder")
    assert status.startswith("**Error:**") and "folder not found" in status and "Traceback" not in status
    (tmp_path / "empty" / "images").mkdir(parents=True)
    status, _, _ = client.predict(str(tmp_path / "empty"), 32, api_name="/inspect_folder")
    assert status.startswith("**Error:**") and "labels" in status


def test_the_examples_fill_in_train_and_edit(client):
    from engine.data import read_label
    from nudiff_app.ui import EXAMPLE_FOLDER, EXAMPLE_LABEL

    assert client.predict(api_name="/example_folder") == str(EXAMPLE_FOLDER)
    status, summary, _ = client.predict(str(EXAMPLE_FOLDER), 128, api_name="/inspect_folder")
    assert status.startswith("Inspected: 3 images") and "Problems: 0 error(s)" in summary, (status, summary)
    out = client.predict(api_name="/edit_example_label")
    n = int(read_label(EXAMPLE_LABEL).max())
    assert out[0].startswith("Loaded `example_label.png`") and f"**{n} nuclei**" in out[3], out


def test_upload_zip_dataset_and_corrupt_zip(client, labeled_folder, tmp_path, studio):
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in labeled_folder.rglob("*"):
            if p.is_file():
                zf.write(p, f"mydata/{p.relative_to(labeled_folder)}")
    folder, status, summary, _ = client.predict(handle_file(str(zpath)), 32, api_name="/upload_dataset")
    assert status.startswith("Inspected") and Path(folder).is_relative_to(studio[2] / "uploads")
    assert (Path(folder) / "images").is_dir()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    out = client.predict(handle_file(str(bad)), 32, api_name="/upload_dataset")
    assert "not a readable zip" in out[1]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    out = client.predict(handle_file(str(evil)), 32, api_name="/upload_dataset")
    assert "refusing" in out[1]


def test_generate_edit_basket_export(client, tiny_checkpoints, labeled_folder, tmp_path):
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    status, gallery = client.predict(s_ckpt, 3, "dpm++", 4, 7, api_name="/sample_structures")
    assert status.startswith("Sampled 3 structures") and len(gallery) == 3
    assert "seed 7" in gallery[0]["caption"] and "nuclei" in gallery[0]["caption"]

    out = client.predict(1, api_name="/send_to_edit")
    assert out[0] == "Structure #1 sent to Edit."
    # a label map uploaded from disk replaces it; then delete a nucleus, undo, and draw one with a stroke
    _, inst = make_tile(32, seed=3)
    np.save(tmp_path / "label.npy", inst)
    out = client.predict(handle_file(str(tmp_path / "label.npy")), api_name="/edit_upload_label")
    n0 = int(inst.max())
    assert out[0].startswith("Loaded") and f"**{n0} nuclei**" in out[3]
    ys, xs = np.nonzero(inst == 1)
    out = client.predict(int(xs[0]), int(ys[0]), api_name="/edit_delete_at")
    assert out[0].startswith("Deleted") and f"**{n0 - 1} nuclei**" in out[3]
    out = client.predict(api_name="/edit_undo")
    assert out[0] == "Undone." and f"**{n0} nuclei**" in out[3]
    out = client.predict(32, i_ckpt, api_name="/edit_blank")
    assert "Blank 32×32" in out[0] and "**0 nuclei**" in out[3]
    layer = np.zeros((512, 512, 4), np.uint8)
    cv2.circle(layer, (256, 256), 60, (255, 255, 255, 255), -1)  # white disc = new nucleus
    cv2.imwrite(str(tmp_path / "layer.png"), cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA))
    bg = np.full((512, 512, 3), 40, np.uint8)
    cv2.imwrite(str(tmp_path / "bg.png"), bg)
    editor = {"background": handle_file(str(tmp_path / "bg.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": None}
    out = client.predict(editor, "keep as separate nuclei", 5, api_name="/edit_apply")
    assert out[0] == "Applied: 0 → 1 nuclei." and "edited by hand" in out[3]
    out = client.predict(editor, "keep as separate nuclei", 5, api_name="/edit_to_synthesize")
    assert "sent to Synthesize" in out[0]

    status, results = client.predict(i_ckpt, 2.0, "dpm++sde", 4, 11, 2, api_name="/synthesize")
    assert status.startswith("Synthesized 2 image(s)") and len(results) == 2
    assert "seed 11" in results[0]["caption"] and "seed 12" in results[1]["caption"]
    out = client.predict(1, 0.8, api_name="/add_to_basket")
    assert "pair_0001" in out[0]
    out = client.predict(0, 0.8, api_name="/add_all_to_basket")
    assert "pair_0002, pair_0003" in out[0] and len(out[1]) == 3
    out = client.predict(2, 0.8, api_name="/reject_pair")
    assert out[0] == "pair_0003: rejected."
    out = client.predict(0, 0.8, api_name="/accept_pair")
    assert out[0] == "pair_0001: accepted."

    status, download = client.predict(["HoVer-Net npy", "COCO json", "QuPath GeoJSON"], True,
                                      api_name="/export_zip")
    assert status.startswith("Exported") and "2 pairs (2 edited by hand)" in status
    path = download["value"] if isinstance(download, dict) else download
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert {"images/pair_0001.png", "images/pair_0002.png", "labels/pair_0001.tif", "coco.json",
                "manifest.csv", "hovernet/pair_0002.npy", "geojson/pair_0001.geojson"} <= names
        assert not any("pair_0003" in n for n in names)  # rejected
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        coco = json.loads(zf.read("coco.json"))
        for row in rows:
            img = cv2.imdecode(np.frombuffer(zf.read(row["image"]), np.uint8), 1)
            lab = tifffile.imread(io.BytesIO(zf.read(row["label"])))
            assert img.shape[:2] == lab.shape == (32, 32)
            assert row["edited"] == "true" and int(row["n_nuclei"]) == int(lab.max()) == 1
            assert row["sampler"] == "dpm++sde" and row["steps"] == "4" and float(row["w"]) == 2.0
            assert row["image_sha256"] and row["seed"] in ("11", "12")
            hv = np.load(io.BytesIO(zf.read(row["hovernet"])))
            assert np.array_equal(hv[..., 3], lab)
            gj = json.loads(zf.read(row["geojson"]))
            assert [f["properties"]["instance_id"] for f in gj["features"]] == [1]
        assert len(coco["annotations"]) == 2
    # only accepted pairs
    status, download = client.predict(["COCO json"], False, api_name="/export_zip")
    assert "1 pairs" in status

    # quality of the same selection against a real folder (cut into tiles of the basket's size)
    report = client.predict(True, str(labeled_folder), "", api_name="/basket_quality")
    assert "**Synthetic pairs:** 2 (tile 32 px); **real tiles:** 12" in report
    row = next(line for line in report.splitlines() if line.startswith("| Hematoxylin Dice"))
    synth, real = (float(v) for v in row.strip("|").split("|")[1:3])
    assert 0 <= synth <= 1 and 0 < real <= 1
    assert "Mean normalised morphology distance:" in report
    row = next(line for line in report.splitlines() if line.startswith("| Nucleus contrast"))
    assert len(row.strip("|").split("|")) == 4  # name, synthetic, real, W / std
    report = client.predict(False, "", "", api_name="/basket_quality")
    assert "**Synthetic pairs:** 1 (tile 32 px)" in report and "real tiles" not in report
    report = client.predict(True, "/nonexistent/folder", "", api_name="/basket_quality")
    assert report.startswith("**Error:**") and "real folder not found" in report
    # realism measures: two 32 px pairs are too few for the classifier (said so), the copy check runs
    report = client.predict(True, str(labeled_folder), "", True, str(labeled_folder), api_name="/basket_quality")
    assert "**Classifier two-sample test:** skipped: needs at least 4 square tiles of 32 px" in report
    assert "**Copy check:** 0 of 2 synthetic tiles are near-copies" in report
    report = client.predict(True, "", "", True, "", api_name="/basket_quality")
    assert report.startswith("**Error:**") and "needs a real labeled folder" in report


def test_large_field_is_synthesized_in_windows_and_exported_full_size(studio, tiny_checkpoints, tmp_path):
    """A label map several times the tiny model's 32 px tile: fused windows, full-size export."""
    c = Client(studio[1], verbose=False)
    i_ckpt = str(tiny_checkpoints[1])
    _, inst = make_tile(160, seed=5)
    inst = inst[:, :120]  # rectangular, 160 (y) x 120 (x)
    tifffile.imwrite(tmp_path / "field.tif", inst.astype(np.uint16))
    out = c.predict(handle_file(str(tmp_path / "field.tif")), api_name="/edit_upload_label")
    assert out[0].startswith("Loaded") and "120 (x) × 160 (y) px" in out[3]
    out = c.predict(None, "keep as separate nuclei", 5, api_name="/edit_to_synthesize")
    assert "sent to Synthesize" in out[0]
    job = c.submit(i_ckpt, 2.0, "ddim", 3, 0, 1, api_name="/synthesize")
    status, results = job.result(timeout=300)
    assert status.startswith("Synthesized 1 image(s)") and "as 35 windows of 32 px" in status, status
    out = c.predict(0, 0.8, api_name="/add_to_basket")
    assert "pair_0001" in out[0]
    status, download = c.predict(["HoVer-Net npy", "COCO json", "QuPath GeoJSON"], True, api_name="/export_zip")
    assert status.startswith("Exported"), status
    path = download["value"] if isinstance(download, dict) else download
    with zipfile.ZipFile(path) as zf:
        row = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))[0]
        img = cv2.imdecode(np.frombuffer(zf.read(row["image"]), np.uint8), 1)
        lab = tifffile.imread(io.BytesIO(zf.read(row["label"])))
        assert img.shape[:2] == lab.shape == (160, 120) and np.array_equal(lab > 0, inst > 0)
        assert np.load(io.BytesIO(zf.read(row["hovernet"]))).shape[:2] == (160, 120)
        assert row["windows"] == "35" and row["tile"] == "32" and row["height"] == "160" and row["width"] == "120"
        coco = json.loads(zf.read("coco.json"))
        assert coco["images"][0]["height"] == 160 and coco["images"][0]["width"] == 120


def test_a_size_beyond_the_budget_is_refused_and_the_studio_keeps_answering(studio, tiny_checkpoints):
    c = Client(studio[1], verbose=False)
    s_ckpt = str(tiny_checkpoints[0])
    status, _ = c.predict(s_ckpt, 1, "ddim", 2, 0, 1.0, 16384, api_name="/sample_structures")
    assert status.startswith("**Error:**") and "16384x16384 px structure" in status and "4.0 GiB" in status, status
    assert "\n" not in status
    status, gallery = c.predict(s_ckpt, 2, "ddim", 2, 0, 1.0, 72, api_name="/sample_structures")
    assert status.startswith("Sampled 2 structures") and "72 px as 9 windows" in status, status
    assert len(gallery) == 2


def test_four_simultaneous_sessions_keep_their_own_work(studio, tiny_checkpoints):
    """Four gradio_client sessions at once, each sampling, synthesizing and filling its basket: no leakage."""
    import threading

    url = studio[1]
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    out: dict = {}

    def session(k: int) -> None:
        c = Client(url, verbose=False)
        seed = 1000 * (k + 1)
        _, gallery = c.predict(s_ckpt, 2, "ddim", 3, seed, api_name="/sample_structures")
        c.predict(1, api_name="/send_to_synthesize")
        _, results = c.predict(i_ckpt, 2.0, "ddim", 3, seed, 2, api_name="/synthesize")
        add = c.predict(0, 0.8, api_name="/add_all_to_basket")
        out[k] = ([g["caption"] for g in gallery], [r["caption"] for r in results], add[0], len(add[1]))

    threads = [threading.Thread(target=session, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(out) == [0, 1, 2, 3]
    for k, (structures, images, basket, shown) in out.items():
        seed = 1000 * (k + 1)
        assert [c.split(" · ")[1] for c in structures] == [f"seed {seed}", f"seed {seed + 1}"]
        assert images == [f"#0 · seed {seed}", f"#1 · seed {seed + 1}"]
        assert "pair_0001, pair_0002" in basket and "(2 pairs:" in basket and shown == 2


def test_calibrate_w_stores_it_and_sets_the_slider(client, tiny_checkpoints, labeled_folder, tmp_path):
    from engine.checkpoint import export_inference, load_checkpoint

    ckpt = str(export_inference(tiny_checkpoints[1], tmp_path / "image", half=False))  # a copy to calibrate
    status, _ = client.predict(ckpt, api_name="/use_calibrated_w")
    assert status.startswith("**Error:**") and "no calibrated w" in status
    status, *_ = client.predict(ckpt, str(tmp_path / "nowhere"), 3, "", api_name="/calibrate_w")
    assert status.startswith("**Error:**") and "not found" in status and "Traceback" not in status
    assert "guidance" not in json.loads(Path(ckpt).read_text())
    status, w, advice = client.predict(ckpt, str(labeled_folder), 3, "", api_name="/calibrate_w")[:3]
    g = load_checkpoint(ckpt, kind="image").record["guidance"]  # weights still match their record
    assert w == g["w"] and g["n_tiles"] == 3 and g["reference"] == labeled_folder.name
    assert f"w = **{g['w']:g}**" in status and "The slider is set to it." in status
    assert f"**{g['w']:g}**" in advice
    status, w = client.predict(ckpt, api_name="/use_calibrated_w")
    assert w == g["w"] and status.startswith(f"w set to {g['w']:g}")
    # the empty folder field falls back to the Train tab's folder
    status, *_ = client.predict(ckpt, "", 2, str(labeled_folder), api_name="/calibrate_w")
    assert "on 2 tiles" in status and json.loads(Path(ckpt).read_text())["guidance"]["n_tiles"] == 2


def test_colour_from_training_tiles_for_a_model_that_stores_them(client, tiny_checkpoints, labeled_folder, tmp_path):
    """The Synthesize tab's 'Colour from training tiles': on (and changeable) for a model exported with its
    training tiles' colours, locked off for one without; through the API the synthesis uses the stored
    colours, says so, and a model without them is refused in one line."""
    from engine import cli
    from nudiff_app.synthesize_tab import colour_option

    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    assert cli.main(["export-model", i_ckpt, str(tmp_path / "coloured"), "--fp32", "--reference",
                     str(labeled_folder)]) == 0
    coloured = str(tmp_path / "coloured.json")
    on, off = colour_option(coloured, None), colour_option(i_ckpt, None)
    assert on["value"] is True and on["interactive"] is True
    assert off["value"] is False and off["interactive"] is False and "stores no training colours" in off["info"]
    client.predict(s_ckpt, 1, "ddim", 3, 7, api_name="/sample_structures")
    client.predict(0, api_name="/send_to_synthesize")

    def pixels(results) -> np.ndarray:
        item = results[0]["image"]
        return cv2.imread(item["path"] if isinstance(item, dict) else item)

    status, plain = client.predict(coloured, 1.0, "ddim", 4, 5, 1, False, api_name="/synthesize")
    assert status.startswith("Synthesized 1 image(s)") and "colours" not in status, status
    status, lit = client.predict(coloured, 1.0, "ddim", 4, 5, 1, True, api_name="/synthesize")
    assert status.startswith("Synthesized 1 image(s)") and "colours of its training tiles" in status, status
    assert not np.array_equal(pixels(plain), pixels(lit))
    status, _ = client.predict(i_ckpt, 1.0, "ddim", 4, 5, 1, True, api_name="/synthesize")
    assert status.startswith("**Error:**") and "stores no training colours" in status and "\n" not in status
    status, _ = client.predict(i_ckpt, 1.0, "ddim", 4, 5, 1, api_name="/synthesize")  # off by default
    assert status.startswith("Synthesized 1 image(s)"), status


def test_realism_filter_through_the_api(studio, tiny_checkpoints, tmp_path):
    from engine.checkpoint import load_checkpoint, save_checkpoint

    c = Client(studio[1], verbose=False)
    s_ckpt = str(tiny_checkpoints[0])
    status, gallery = c.predict(s_ckpt, 3, "ddim", 2, 0, 2.0, api_name="/sample_structures")
    assert status.startswith("Sampled 3 structures") and "kept the 3 of 6 sampled layouts most like" in status
    seeds = [int(g["caption"].split("seed ")[1].split(" ")[0]) for g in gallery]
    assert len(gallery) == 3 and all(0 <= s < 6 for s in seeds) and seeds == sorted(seeds)
    # the studio keeps the most realistic layouts (filter mode "top"): the 3 of the 6 candidates (seeds 0..5)
    # with the highest realism ratio against the model's stored reference (rejection sampling, the CLI's
    # default, keeps another set for these seeds)
    from engine import pipeline
    from engine.curate import layout_features, realism_ratio

    model = pipeline.load_model(s_ckpt, device="cpu", precision="fp32")
    cands = pipeline.sample_structures(model, 6, steps=2, seed=0, batch_size=8)
    ratio = realism_ratio(model.layout_reference, layout_features([x.inst for x in cands]))
    assert seeds == sorted(cands[i].seed for i in np.argsort(-ratio, kind="stable")[:3])
    # a structure model that stores no layout reference: a readable message, not a traceback
    ck = load_checkpoint(s_ckpt)
    save_checkpoint(tmp_path / "bare", {k: v for k, v in ck.tensors.items() if k.startswith("model.")},
                    kind="structure", model=ck.model_config, diffusion=ck.diffusion_config)
    status, _ = c.predict(str(tmp_path / "bare.json"), 2, "ddim", 2, 0, 2.0, api_name="/sample_structures")
    assert status.startswith("**Error:**") and "no layout reference" in status


def test_wrong_kind_checkpoint_and_errors_keep_the_basket(studio, tiny_checkpoints):
    c = Client(studio[1], verbose=False)
    s_ckpt, i_ckpt = map(str, tiny_checkpoints)
    # a new session's basket is empty: each action says so in its own words
    report = c.predict(True, "", "", api_name="/basket_quality")
    assert report.startswith("**Error:**") and "nothing to assess" in report
    status, _ = c.predict([], True, api_name="/export_zip")
    assert status.startswith("**Error:**") and "nothing to export" in status
    status, _ = c.predict(i_ckpt, 2, "dpm++", 3, 0, api_name="/sample_structures")
    assert status.startswith("**Error:**") and "image model" in status and "structure model is needed" in status
    status, _ = c.predict("/nonexistent/model.json", 2, "dpm++", 3, 0, api_name="/sample_structures")
    assert status.startswith("**Error:**") and "not found" in status
    status, _ = c.predict(i_ckpt, 2.0, "dpm++", 3, 0, 1, api_name="/synthesize")
    assert "no structure" in status
    c.predict(s_ckpt, 1, "dpm++", 3, 0, api_name="/sample_structures")
    c.predict(0, api_name="/send_to_synthesize")
    status, _ = c.predict(s_ckpt, 2.0, "dpm++", 3, 0, 1, api_name="/synthesize")
    assert "structure model, but a image model" in status or "is a structure model" in status
    c.predict(i_ckpt, 2.0, "dpm++", 3, 0, 1, api_name="/synthesize")
    c.predict(0, 0.8, api_name="/add_to_basket")
    out = c.predict(5, 0.8, api_name="/accept_pair")
    assert out[0].startswith("**Error:**") and "no pair #5" in out[0]
    status, download = c.predict([], True, api_name="/export_zip")
    assert status.startswith("Exported") and "1 pairs" in status


def _wait_until_done(client, timeout: float = 120) -> str:
    """The training status text once the job has finished or failed (or the timeout passed)."""
    deadline = time.time() + timeout
    while True:
        text, _ = client.predict(api_name="/training_status")
        if "**finished**" in text or "**failed**" in text or time.time() > deadline:
            return text
        time.sleep(1)


def test_training_subprocess_one_at_a_time(client, labeled_folder, studio):
    args = dict(folder=str(labeled_folder), run="t1", preset="test", size=32, fraction="100%", steps=6,
                finetune=2, batch=2)
    status = client.predict(*args.values(), api_name="/train_structure")
    assert status.startswith("Started structure training")
    status = client.predict(*args.values(), api_name="/train_image")
    assert "already running" in status
    text = _wait_until_done(client)
    assert "**finished**" in text and "step 6 / 6" in text, text
    run = studio[2] / "runs" / "t1" / "structure"
    # the status compares the last preview's layouts with the training tiles (numbers from log.jsonl)
    last = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"preview"' in line][-1]
    p, r = last["preview"], last["real"]
    assert (f"Preview layouts (step 6, {p['n']} tiles): {p['nuclei_per_tile']:.1f} nuclei per tile, "
            f"{100 * p['fg_fraction']:.0f} % foreground; training tiles: {r['nuclei_per_tile']:.1f}, "
            f"{100 * r['fg_fraction']:.0f} %") in text, text
    assert r["nuclei_per_tile"] > 0
    assert (run / "model.json").exists() and (run / "log.jsonl").exists()
    choices = studio[0].nudiff.list_checkpoints("structure")
    assert any(path == str(run / "model.json") for _, path in choices)
    status = client.predict(api_name="/resume_training")
    assert "already finished" in status
    bad = dict(args, folder="/nonexistent/data")
    assert "not found" in client.predict(*bad.values(), api_name="/train_image")


def test_fine_tune_the_default_model(client, labeled_folder, studio, tiny_checkpoints):
    # preset and size given here (cpu, 128) are replaced by the default model's (test, 32 px)
    args = [str(labeled_folder), "ft", "cpu", 128, "100%", 4, 0, 2, "default model"]
    status = client.predict(*args, api_name="/train_structure")
    assert status.startswith("Started structure training") and "fine-tuning" in status, status
    text = _wait_until_done(client)
    assert "**finished**" in text, text
    rec = json.loads((studio[2] / "runs" / "ft" / "structure" / "model.json").read_text())
    assert rec["train"]["init_from"] == str(tiny_checkpoints[0]) and rec["model"]["image_size"] == 32
    assert rec["train"]["warmup_steps"] > 0


def test_cancel_a_long_sampling_job(studio, tiny_checkpoints):
    c = Client(studio[1], verbose=False)
    # 16 layouts x 1000 DDPM steps (two batches of 8): far longer than a cancel takes to arrive
    job = c.submit(str(tiny_checkpoints[0]), 16, "ddpm", 1000, 0, api_name="/sample_structures")
    deadline = time.time() + 300
    while True:  # the job reports progress only after it has cleared its cancel flag: a cancel now counts
        units = job.status().progress_data or []
        denoising = [u for u in units if u.index is not None and u.length]
        if denoising:
            break
        assert not job.done(), f"the job ended before it reported progress: {job.outputs()}"
        assert time.time() < deadline, "the sampling job never reported progress"
        time.sleep(0.05)
    assert denoising[-1].index < denoising[-1].length, denoising  # mid-way, not finished
    assert c.predict(api_name="/cancel_structures") == "Cancelling…"
    status, _ = job.result(timeout=120)
    assert status == "Cancelled."


def test_editing_operations():
    from nudiff_app import editing

    inst = np.zeros((20, 20), np.int32)
    inst[2:8, 2:8] = 1
    ring = np.zeros((20, 20), bool)
    ring[10:16, 10:16] = True
    ring[11:15, 11:15] = False  # a closed outline: filled into one nucleus
    touching = np.zeros((20, 20), bool)
    touching[4:6, 8:12] = True  # touches nucleus 1
    none = np.zeros((20, 20), bool)
    out, added = editing.apply_strokes(inst, ring | touching, none, merge_touching=False, min_px=3)
    assert added == 2 and out.max() == 3 and (out[10:16, 10:16] > 0).all()
    out, added = editing.apply_strokes(inst, ring | touching, none, merge_touching=True, min_px=3)
    assert added == 1 and out.max() == 2 and out[5, 10] == out[3, 3]
    erase = np.zeros((20, 20), bool)
    erase[2:8, 4:6] = True  # cut nucleus 1 into two pieces of 12 px
    out, _ = editing.apply_strokes(inst, none, erase, merge_touching=False, min_px=3)
    assert out.max() == 2
    out, _ = editing.apply_strokes(inst, none, erase, merge_touching=False, min_px=13)
    assert out.max() == 0
    out, k = editing.delete_at(inst, 9, 9, radius=2)  # background near nucleus 1
    assert k == 1 and out.max() == 0
    # a brush layer at display resolution maps back onto label pixels
    s = editing.display_scale(20)
    layer = np.zeros((20 * s, 20 * s, 4), np.uint8)
    layer[10 * s:12 * s, 10 * s:12 * s] = (255, 255, 255, 255)
    layer[0:s, 0:s] = (255, 0, 255, 255)
    add, er = editing.strokes_from_layer(layer, (20, 20))
    assert add.sum() == 4 and add[10:12, 10:12].all() and er.sum() == 1 and er[0, 0]


def test_stop_and_resume_training(client, labeled_folder, studio):
    def wait_for(state):
        deadline = time.time() + 120
        while time.time() < deadline:
            text, frame = client.predict(api_name="/training_status")
            if f"**{state}**" in text:
                return text, frame
            assert "**failed**" not in text, text
            time.sleep(0.5)
        raise AssertionError(f"training never reached {state}: {text}")

    args = [str(labeled_folder), "t2", "test", 32, "50%", 5000, 0, 2]
    assert client.predict(*args, api_name="/train_image").startswith("Started image training")
    while True:  # wait until it has logged some steps
        text, frame = wait_for("running")
        if frame and frame.get("data"):
            break
    assert client.predict(api_name="/stop_training").startswith("Asked image training to save and stop")
    text, _ = wait_for("stopped")
    step = int(text.split("step ")[1].split(" /")[0])
    assert 0 < step < 5000
    assert client.predict(api_name="/resume_training").startswith("Resumed image training")
    deadline = time.time() + 300
    while True:  # the resumed process is in its training loop (it writes "running" only there) and has trained
        text, _ = wait_for("running")
        if int(text.split("step ")[1].split(" /")[0]) > step:
            break
        assert time.time() < deadline, f"the resumed training did not get past step {step}: {text}"
        time.sleep(0.2)
    assert client.predict(api_name="/stop_training").startswith("Asked image training to save and stop")
    text, _ = wait_for("stopped")
    assert step < int(text.split("step ")[1].split(" /")[0]) < 5000
    assert (studio[2] / "runs" / "t2" / "image" / "model.json").exists()
