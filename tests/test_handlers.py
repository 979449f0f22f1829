"""The Train and Export tabs' event handlers called directly: no browser, no launched server (a real
AppContext in a temporary work folder, real baskets and zips)."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from nudiff_app.export_tab import ExportHandlers, export_view, gallery_index
from nudiff_app.state import AppContext
from nudiff_app.train_tab import TrainHandlers, inspect_dataset, preset_size, restore_options

SKIP = gr.skip()


@pytest.fixture
def ctx(tmp_path):
    app = AppContext(tmp_path / "work")
    yield app
    app.close()


def _zip_folder(folder: Path, path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, prefix + str(f.relative_to(folder)))
    return path


# ----------------------------------------------------------------------------- Train tab


def test_inspect_dataset_reports_a_folder_and_refuses_bad_input(labeled_folder, tmp_path):
    status, summary, grid = inspect_dataset(str(labeled_folder), 32)
    assert status.startswith("Inspected: 3 images, ") and "tiles of 32 px" in status
    assert "3" in summary and isinstance(grid, np.ndarray) and grid.ndim == 3
    # errors become a status line; the other outputs are left as they are
    assert inspect_dataset("", 32) == ("**Error:** enter a folder path on the server, or upload a zip", SKIP, SKIP)
    status, *rest = inspect_dataset(str(labeled_folder), "7")
    assert "tile size '7'" in status and rest == [SKIP, SKIP]
    status, *_ = inspect_dataset(str(tmp_path / "nowhere"), 32)
    assert status.startswith("**Error:**")


def test_upload_dataset_extracts_a_zip_and_drops_one_without_images(ctx, labeled_folder, tmp_path):
    h = TrainHandlers(ctx)
    good = _zip_folder(labeled_folder, tmp_path / "good.zip", prefix="wrapped/")
    folder, status, summary, grid = h.upload_dataset(str(good), 32)
    root = Path(folder)
    assert root.name == "wrapped" and root.parent.parent == ctx.uploads_dir  # a single wrapping folder is found
    assert (root / "images").is_dir() and status.startswith("Inspected: 3 images")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("notes.txt", "no images here")
    out = h.upload_dataset(str(bad), 32)
    assert out[0] == SKIP and out[2:] == (SKIP, SKIP) and "no images/ folder" in out[1]
    assert [p.name for p in ctx.uploads_dir.iterdir()] == [root.parent.name]  # the bad upload was not kept
    assert h.upload_dataset(None, 32) == (SKIP,) * 4


def test_start_refuses_bad_settings_before_any_run_folder(ctx, labeled_folder):
    h = TrainHandlers(ctx)
    args = [str(labeled_folder), "run1", "test", 32, "100%", 5, 0, 2]
    assert h.start_structure(str(ctx.work_dir / "missing"), *args[1:]).startswith(
        "**Error:** training data folder not found")
    assert "tile size 9000" in h.start_image(*args[:3], 9000, *args[4:])
    assert "steps and batch size" in h.start_structure(*args[:5], 0, 0, 2)
    assert "run name" in h.start_structure(args[0], "bad name/..", *args[2:])
    assert not (ctx.runs_dir / "run1").exists() and ctx.jobs.active() == {}
    assert h.stop() == "No training job is running."
    assert h.resume() == "**Error:** no training run to resume yet"


def test_poll_and_status_without_a_job_then_restore_from_the_last_job(ctx):
    h = TrainHandlers(ctx)
    assert h.poll(None) == ("No training run yet.", None, None)
    assert h.poll(None) == ("No training run yet.", SKIP, SKIP)  # nothing changed: plot and preview not re-sent
    assert h.status_now() == ("No training run yet.", None)
    assert h.restore_settings() == (SKIP,) * 5
    # the record a started job leaves (nudiff_app.jobs): its command holds the settings
    cmd = ["python", "-m", "engine", "train-structure", "--data", "/data/nuclei", "--run-dir",
           str(ctx.runs_dir / "myrun" / "structure"), "--steps", "300", "--batch-size", "4", "--preset", "cpu"]
    (ctx.runs_dir / "active.json").write_text(json.dumps({"run_dir": cmd[7], "kind": "structure", "cmd": cmd}))
    assert h.restore_settings() == ("/data/nuclei", "myrun", "cpu", 300, 4)
    assert restore_options(["--data", "/d"]) == ("/d", SKIP, SKIP, SKIP, SKIP)
    assert preset_size("test") == gr.update(value=32)


def _wait_for_job(h: TrainHandlers, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while True:
        text, _ = h.status_now()
        if "**finished**" in text or "**failed**" in text or time.time() > deadline:
            return text
        time.sleep(1)


def test_starting_training_shows_the_data_problems_in_the_tab(ctx, tmp_path):
    """Training started without Inspect: the files the trainer skips or flags are in the job's status text,
    not only in its process.log (an image without a label, an unreadable label, a binary mask)."""
    import cv2

    from engine.synthetic import make_tile, write_folder

    folder = write_folder(tmp_path / "data", n_images=3, size=64, seed=0)
    image, inst = make_tile(64, seed=7)
    for stem in ("nolabel", "broken", "binary"):
        assert cv2.imwrite(str(folder / "images" / f"{stem}.png"), image[..., ::-1])
    (folder / "labels" / "broken.png").write_bytes(b"not a png at all")
    assert cv2.imwrite(str(folder / "labels" / "binary.png"), np.where(inst > 0, 255, 0).astype(np.uint8))
    h = TrainHandlers(ctx)
    status = h.start_structure(str(folder), "p1", "test", 32, "100%", 2, 0, 2)
    assert status.startswith("Started structure training"), status
    text = _wait_for_job(h)
    assert "**finished**" in text, text  # the problems do not stop the run
    assert "**Problems in the training data:** 2 files skipped, 1 warning" in text, text
    assert "nolabel.png" in text and "has no label" in text and "cannot read label" in text
    assert "Traceback" not in text
    problems = ctx.jobs.report()["problems"]
    assert any(p.startswith("[error]") and "nolabel.png" in p and "has no label" in p for p in problems), problems
    assert any(p.startswith("[error]") and "broken.png" in p and "cannot read label" in p for p in problems)
    assert any(p.startswith("[warning]") and "binary.png" in p and "binary mask" in p for p in problems)
    poll_text, _, _ = h.poll(None)
    assert poll_text == text


def test_the_job_report_lists_the_problems_of_its_own_launch(ctx):
    """A resumed run appends to process.log: only the latest launch's problems are shown, and a data problem
    is never taken for the reason a run failed."""
    run_dir = ctx.runs_dir / "r" / "image"
    run_dir.mkdir(parents=True)
    old = "[error] image /d/images/a_1.png has no label (looked for a_1.* in labels/)\n"
    new = ("[warning] label /d/labels/b.png is a binary mask, not an instance map; split into 3 nuclei\n"
           "model: x\n[error] cannot read label /d/labels/c*.png: corrupt or unsupported file (x)\n"
           "... and 4 more problems (python -m engine inspect /d lists them all)\n")
    (run_dir / "process.log").write_text(old + new)
    rec = {"run_dir": str(run_dir), "kind": "image", "cmd": ["python"], "log_offset": len(old.encode())}
    (ctx.runs_dir / "active.json").write_text(json.dumps(rec))
    rep = ctx.jobs.report()
    assert rep["problems"] == [line for line in new.splitlines() if not line.startswith("model")]
    assert "1 file skipped, 1 warning among the first listed" in rep["text"]
    assert r"cannot read label /d/labels/c\*.png" in rep["text"] and "a\\_1.png" not in rep["text"]
    assert "**failed**" in rep["text"] and "  \nmodel: x" in rep["text"]  # the last other line, not a problem
    del rec["log_offset"]  # a record from before: the whole log
    (ctx.runs_dir / "active.json").write_text(json.dumps(rec))
    assert len(ctx.jobs.report()["problems"]) == 4


# ----------------------------------------------------------------------------- Export tab


def _basket(ctx, n: int, sid: str = "handlers-test"):
    sess = ctx.session(sid)
    rng = np.random.default_rng(0)
    for k in range(n):
        inst = np.zeros((32, 32), np.int32)
        inst[4:12, 4:12], inst[18:26, 16:28] = 1, 2
        sess.basket.add(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), inst,
                        {"w": 2.0, "sampler": "ddim", "steps": 3, "seed": k, "edited": k == 1})
    return sess


def test_review_marks_pairs_and_moves_to_the_next_pending(ctx):
    h = ExportHandlers(ctx)
    sid = "handlers-test"
    assert h.accept(sid, 0, 0.8, None)[0] == "**Error:** the basket is empty"
    sess = _basket(ctx, 3, sid)
    out = h.reject(sid, 1, 0.8, None)
    assert len(out) == 6 and out[0] == "pair_0002: rejected." and out[-1] == 2  # next pending after #1
    assert len(out[1]) == 3 and out[1][1][1] == "pair_0002 · rejected · edited"  # the gallery, one entry a pair
    out = h.accept(sid, 2, 0.8, None)
    assert out[0] == "pair_0003: accepted." and out[-1] == 0  # wraps round to the first pending pair
    assert [it.status for it in sess.basket.items] == ["pending", "rejected", "accepted"]
    assert h.accept(sid, 5, 0.8, None)[0] == "**Error:** no pair #5; choose 0 to 2"
    # previous / next wrap around the basket; show selects a pair
    assert h.go_previous(sid, 0.8, None)[-1] == 2
    assert h.go_next(sid, 0.8, None)[-1] == 0
    status, gallery, side, over, info = h.show(sid, 2, 0.8, None)
    assert status == "" and sess.selected_pair == 2 and "**pair_0003** (3 of 3)" in info
    assert side.shape[0] > 0 and over.ndim == 3
    skip1, over_low, skip2 = h.opacity_changed(sid, 0.1, None)
    assert skip1 == skip2 == SKIP and over_low.shape == over.shape and not np.array_equal(over_low, over)
    assert export_view(sess, 0.8)[3] == info
    assert gallery_index(gr.SelectData(None, {"index": 2, "value": None})) == 2


def test_build_zip_exports_the_accepted_pairs_in_the_asked_formats(ctx):
    h = ExportHandlers(ctx)
    sid = "handlers-test"
    _basket(ctx, 3, sid)
    status, button = h.build_zip(sid, ["COCO json"], False, None)
    assert status.startswith("**Error:** nothing to export: no accepted pairs") and button == SKIP
    h.accept(sid, 1, 0.8, None)
    status, button = h.build_zip(sid, ["COCO json"], False, None)
    assert "1 pairs (1 edited by hand)" in status and button["visible"] is True
    with zipfile.ZipFile(button["value"]) as z:
        names = z.namelist()
    assert any(n.endswith(".json") and "coco" in n.lower() for n in names)
    assert not any(n.endswith(".npy") for n in names)  # HoVer-Net npy was not asked for
    assert Path(button["value"]).parent == ctx.exports_dir / sid


def test_assess_refuses_missing_folders(tmp_path, tiny_checkpoints, labeled_folder):
    # the tiny models: the copy check's default training folder is their own small one, wherever the demo
    # models' training data may lie on this machine
    ctx = AppContext(tmp_path / "work", *tiny_checkpoints)
    h = ExportHandlers(ctx)
    sid = "handlers-test"
    _basket(ctx, 2, sid)
    assert h.assess(sid, True, "/nonexistent/folder", "", False, "", None) == \
        "**Error:** real folder not found: /nonexistent/folder"
    assert h.assess(sid, True, "", "", True, "", None).startswith("**Error:** the two-sample test needs")
    assert h.assess(sid, True, "", "", False, "/nonexistent/train", None) == \
        "**Error:** training folder not found: /nonexistent/train"
    try:
        report = h.assess(sid, True, str(labeled_folder), "", False, "", None)
    finally:
        ctx.close()
    assert not report.startswith("**Error:**") and "2" in report


# ----------------------------------------------------------------------------- Structures and Synthesize tabs


def test_picking_a_sample_keeps_its_structure_until_an_edit(ctx):
    from engine.pipeline import StructureSample
    from engine.structure import instances_to_structure
    from engine.synthetic import make_tile
    from nudiff_app.structures_tab import pick
    from nudiff_app.synthesize_tab import add_results, current_view

    sess = ctx.session("handlers-test")
    with pytest.raises(Exception, match="sample some structures first"):
        pick(sess, 0)
    _, inst = make_tile(32, seed=4)
    sampled = instances_to_structure(inst) * 0.8  # stands for a sampled structure: not what a rebuild gives
    sess.samples = [StructureSample(sampled, inst, seed=9)]
    with pytest.raises(Exception, match="no structure #1; choose 0 to 0"):
        pick(sess, 1)
    assert pick(sess, 0) == 0
    cond = sess.current.condition()
    assert not cond.rebuilt and np.array_equal(cond.structure, sampled) and cond.origin["structure_seed"] == 9
    assert "structure as sampled" in current_view(sess)[1]
    sess.replace_current(np.where(inst == 1, 0, inst))
    cond = sess.current.condition()
    assert cond.rebuilt and cond.edited and np.array_equal(cond.structure, instances_to_structure(sess.current.inst))
    assert "structure rebuilt from the map" in current_view(sess)[1]
    sess.current.restore(sess.undo.pop())
    assert not sess.current.condition().rebuilt and not sess.current.meta["edited"]
    with pytest.raises(Exception, match="nothing to add"):
        add_results(sess, [0])


def test_the_studio_takes_a_sampling_precision(tmp_path, tiny_checkpoints, capsys):
    """`python app.py --precision fp32` samples in fp32 in the studio and its worker; an unknown precision is
    refused by the command line and by the engine, with the choices named."""
    import app
    from engine.errors import NuDiffError

    assert app.parse_args([]).precision == "auto" and app.parse_args(["--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        app.parse_args(["--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(NuDiffError, match="precision must be one of auto, fp32, got 'fp16'"):
        AppContext(tmp_path / "bad", precision="fp16")
    ctx = AppContext(tmp_path / "work", *tiny_checkpoints, precision="fp32")
    try:
        assert ctx.model(None, "structure").precision == "fp32" and ctx.worker.precision == "fp32"
    finally:
        ctx.close()
