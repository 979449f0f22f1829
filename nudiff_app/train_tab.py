"""Train tab: pick a labeled folder (server path or zip upload), inspect it, train the two models in a
background subprocess, follow loss and previews."""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from engine import render
from engine.config import PRESETS
from engine.errors import DataError
from nudiff_app.editing import zoom_to
from nudiff_app.state import AppContext, ui_action

FRACTIONS = {"100%": 1.0, "50%": 0.5, "20%": 0.2, "10%": 0.1}
START_FROM = ("scratch", "default model")
PREVIEW_TILES = 8


def _find_dataset_root(folder: Path) -> Path:
    """The folder holding images/ (the extraction root itself or a single wrapping folder)."""
    for cand in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if (cand / "images").is_dir():
            return cand
    raise DataError("the zip holds no images/ folder; expected images/ plus labels/ (or masks/)")


MAX_TILE = 8192  # largest tile size (px) the tab takes


def _tile_size(size) -> int:
    """The tile size input as a whole number of px in [8, MAX_TILE]; DataError otherwise."""
    try:
        value = float(str(size).strip())
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value.is_integer() and 8 <= value <= MAX_TILE):
        raise DataError(f"tile size {size!r}: give a whole number of px from 8 to {MAX_TILE}")
    return int(value)


def _preview_grid(items, size: int) -> np.ndarray | None:
    """Up to PREVIEW_TILES of the loaded images' tiles (side by side: stride = size), spread over them, with
    the nuclei outlines; only those tiles are cut."""
    from engine.data import tile_positions

    spots = [(item, y, x) for item in items if min(item.inst.shape) >= size
             for y in tile_positions(item.inst.shape[0], size, size)
             for x in tile_positions(item.inst.shape[1], size, size)]
    if not spots:
        return None
    step = max(1, len(spots) // PREVIEW_TILES)
    pics = [render.overlay_contours(item.image[y : y + size, x : x + size], item.inst[y : y + size, x : x + size],
                                    opacity=0.9, color=(0, 255, 0))
            for item, y, x in spots[::step][:PREVIEW_TILES]]
    pics = [zoom_to(p, 128) for p in pics]
    return render.grid(pics, cols=4)


def _loss_frame(points: list[tuple[int, float]]) -> pd.DataFrame | None:
    """The loss curve's data, or None before the first logged step: a plot first drawn from an empty frame
    keeps the axis margins of that empty frame and clips its tick labels once data arrives."""
    if not points:
        return None
    return pd.DataFrame(points, columns=["step", "loss"]).astype({"step": int, "loss": float})


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Train the **structure** model (nuclei layouts) and the **image** model (H&E given a "
                "layout) on your labeled tiles. Training runs in the background on the server: you may "
                "close or reload this page and come back.")
    with gr.Row():
        with gr.Column(scale=3):
            ui.train_folder = gr.Textbox(label="Labeled folder on the server (images/ + labels/)",
                                         placeholder="/data/my-nuclei", elem_id="train-folder")
            ui.train_zip = gr.File(label="…or upload a zip of images/ + labels/", file_types=[".zip"],
                                   file_count="single", height=120, elem_id="train-zip")
        with gr.Column(scale=2):
            ui.train_preset = gr.Radio(list(PRESETS), value="cpu", label="Model preset",
                                       info="test: seconds (smoke test) · cpu: hours on a CPU · paper: GPU")
            ui.train_size = gr.Dropdown([32, 64, 128, 256], value=128, label="Tile size (px)",
                                        allow_custom_value=True)
            ui.train_inspect = gr.Button("Inspect folder", variant="secondary")
    ui.train_status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        ui.train_summary = gr.Textbox(label="Inspection", lines=8, max_lines=16, interactive=False, scale=3)
        ui.train_preview = gr.Image(label="Tiles with nuclei outlines", interactive=False, scale=2,
                                    format="png", buttons=["fullscreen"])
    with gr.Accordion("Training settings", open=True):
        with gr.Row():
            ui.train_run = gr.Textbox(value="run1", label="Run name", scale=1, elem_id="train-run")
            ui.train_fraction = gr.Radio(list(FRACTIONS), value="100%", label="Labeled fraction used",
                                         info="the paper's 10-50% subsets, chosen by clustering", scale=2)
            ui.train_steps = gr.Number(value=2000, precision=0, minimum=1, label="Steps", scale=1,
                                       elem_id="train-steps")
            ui.train_finetune = gr.Number(value=500, precision=0, minimum=0,
                                          label="Image fine-tune steps (classifier-free)", scale=1)
            ui.train_batch = gr.Number(value=4, precision=0, minimum=1, maximum=256, label="Batch size", scale=1,
                                       elem_id="train-batch")
            ui.train_start_from = gr.Radio(list(START_FROM), value="scratch", label="Start from", scale=2,
                                           elem_id="train-start-from",
                                           info="fine-tuning the default model needs far fewer steps; "
                                                "its preset and tile size are then used")
        with gr.Row():
            ui.train_start_structure = gr.Button("Train structure model", variant="primary")
            ui.train_start_image = gr.Button("Train image model", variant="primary")
            ui.train_stop = gr.Button("Stop (saves)", variant="stop")
            ui.train_resume = gr.Button("Resume last run")
    ui.train_job = gr.Markdown("No training run yet.", elem_id="train-job")
    with gr.Row():
        ui.train_loss = gr.LinePlot(None, x="step", y="loss", title="Training loss", height=260,
                                    scale=3)
        ui.train_sample = gr.Image(label="Latest preview samples", interactive=False, scale=2, format="png",
                                   height=260)
    ui.train_timer = gr.Timer(2.0)


# ----------------------------------------------------------------------------- event handlers
# Module level, testable without a browser: the ones that need the app hold it in TrainHandlers.


@ui_action(3)
def inspect_dataset(folder: str, size) -> tuple:
    """[status, inspection report, preview grid] of a labeled folder on the server."""
    from engine.data import load_folder
    from engine.inspection import inspect_items

    folder = (folder or "").strip()
    if not folder:
        raise DataError("enter a folder path on the server, or upload a zip")
    size = _tile_size(size)
    items, problems = load_folder(folder)  # read once, for the report and the preview
    ins = inspect_items(folder, items, problems, size=size, stride=max(1, size // 2))
    grid = _preview_grid(items, size) if ins.n_tiles else None
    n_err = sum(p.severity == "error" for p in ins.problems)
    msg = (f"Inspected: {ins.n_images} images, {ins.n_tiles} tiles of {size} px, {ins.n_nuclei} nuclei"
           + (f" · {n_err} file(s) skipped, see the report" if n_err else ""))
    return msg, ins.summary(), grid


def preset_size(preset: str):
    """The tile size box follows the chosen preset."""
    return gr.update(value=PRESETS[preset]["image_size"])


def restore_options(cmd: list[str]) -> tuple:
    """[folder, run name, preset, steps, batch size] from a training job's command (gr.skip() where absent)."""
    opts = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    if not opts:
        return (gr.skip(),) * 5
    run = Path(opts.get("--run-dir", "")).parent.name or gr.skip()
    return (opts.get("--data", gr.skip()), run, opts.get("--preset", gr.skip()),
            int(opts["--steps"]) if "--steps" in opts else gr.skip(),
            int(opts["--batch-size"]) if "--batch-size" in opts else gr.skip())


class TrainHandlers:
    """The Train tab's handlers that use the app: uploads folder, training jobs, default checkpoints."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self._seen: dict[str, tuple] = {}  # per browser session: what the last poll sent

    @ui_action(4, status_index=1)
    def upload_dataset(self, file, size) -> tuple:
        """[folder, status, report, preview] of an uploaded zip, extracted into the uploads folder (a zip that
        is no usable dataset is not kept)."""
        import shutil

        from engine.unzip import safe_extract_zip

        if not file:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        path = Path(file if isinstance(file, str) else file.name)
        size = _tile_size(size)
        dest = self.ctx.uploads_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        safe_extract_zip(path, dest)
        try:
            root = _find_dataset_root(dest)
            msg, summary, grid = inspect_dataset.__wrapped__(str(root), size)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return str(root), msg, summary, grid

    def start(self, kind: str, folder, run, preset, size, fraction, steps, finetune, batch,
              start_from="scratch") -> str:
        """Start training the ``kind`` ("structure" or "image") model; the status line."""
        size = _tile_size(size) if size else None  # none: the preset's
        base = self.ctx.default_checkpoint(kind) if start_from == "default model" else None
        rec = self.ctx.jobs.start(kind, data=(folder or "").strip(), run_name=run, preset=preset,
                                  image_size=size if size != PRESETS[preset]["image_size"] else None,
                                  fraction=FRACTIONS.get(fraction, 1.0), steps=int(steps or 0),
                                  finetune_steps=int(finetune or 0), batch_size=int(batch or 0),
                                  init_from=str(base) if base else None)
        how = f", fine-tuning `{base.stem}` (its preset and tile size)" if base else ""
        return f"Started {kind} training in `{rec['run_dir']}`{how}."

    @ui_action(1)
    def start_structure(self, folder, run, preset, size, fraction, steps, finetune, batch, start_from="scratch"):
        return self.start("structure", folder, run, preset, size, fraction, steps, finetune, batch, start_from)

    @ui_action(1)
    def start_image(self, folder, run, preset, size, fraction, steps, finetune, batch, start_from="scratch"):
        return self.start("image", folder, run, preset, size, fraction, steps, finetune, batch, start_from)

    @ui_action(1)
    def stop(self) -> str:
        return self.ctx.jobs.stop()

    @ui_action(1)
    def resume(self) -> str:
        rec = self.ctx.jobs.resume()
        return f"Resumed {rec['kind']} training in `{rec['run_dir']}`."

    def poll(self, request: gr.Request) -> tuple:
        """[job status, loss plot, preview] from the run folder; the plot and preview are only re-sent to a
        browser session when they changed since its last poll."""
        try:
            rep = self.ctx.jobs.report()
        except Exception:  # noqa: BLE001 - a poll must never raise into the UI
            return gr.skip(), gr.skip(), gr.skip()
        key = getattr(request, "session_hash", None) or "api"
        prev = rep.get("preview")
        stamp = (rep.get("run_dir"), len(rep["log"]), prev and os.stat(prev).st_mtime_ns)
        last = self._seen.get(key)
        self._seen[key] = stamp
        if last == stamp:
            return rep["text"], gr.skip(), gr.skip()
        pic = None
        if prev:
            try:
                from PIL import Image

                with Image.open(prev) as im:
                    pic = zoom_to(np.asarray(im.convert("RGB")), 512)
            except OSError:
                pic = gr.skip()
        return rep["text"], _loss_frame(rep["log"]), pic

    def status_now(self) -> tuple:
        """[job status, loss plot], always both."""
        rep = self.ctx.jobs.report()
        return rep["text"], _loss_frame(rep["log"])

    def restore_settings(self) -> tuple:
        """The last job's settings (folder, run, preset, steps, batch size), so a reload shows them again."""
        return restore_options(self.ctx.jobs.active().get("cmd") or [])


def wire(ctx: AppContext, ui) -> None:
    h = TrainHandlers(ctx)
    inspect_out = [ui.train_status, ui.train_summary, ui.train_preview]
    ui.train_inspect.click(inspect_dataset, [ui.train_folder, ui.train_size], inspect_out, api_name="inspect_folder")
    ui.train_folder.submit(inspect_dataset, [ui.train_folder, ui.train_size], inspect_out, api_visibility="private")
    ui.train_zip.upload(h.upload_dataset, [ui.train_zip, ui.train_size], [ui.train_folder, *inspect_out],
                        api_name="upload_dataset")
    ui.train_preset.change(preset_size, ui.train_preset, ui.train_size, api_visibility="private")

    start_inputs = [ui.train_folder, ui.train_run, ui.train_preset, ui.train_size, ui.train_fraction,
                    ui.train_steps, ui.train_finetune, ui.train_batch, ui.train_start_from]
    ui.train_start_structure.click(h.start_structure, start_inputs, ui.train_status, api_name="train_structure")
    ui.train_start_image.click(h.start_image, start_inputs, ui.train_status, api_name="train_image")
    ui.train_stop.click(h.stop, None, ui.train_status, api_name="stop_training")
    ui.train_resume.click(h.resume, None, ui.train_status, api_name="resume_training")

    poll_out = [ui.train_job, ui.train_loss, ui.train_sample]
    ui.train_timer.tick(h.poll, None, poll_out, show_progress="hidden", api_visibility="private",
                        concurrency_limit=None)
    ui.train_status_api = gr.Button(visible=False)
    ui.train_status_api.click(h.status_now, None, [ui.train_job, ui.train_loss], api_name="training_status")

    ui.train_restore = h.restore_settings
    ui.train_restore_outputs = [ui.train_folder, ui.train_run, ui.train_preset, ui.train_steps, ui.train_batch]
    ui.train_poll = h.poll
    ui.train_poll_outputs = poll_out
