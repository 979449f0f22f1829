"""Export tab: review the basket pair by pair, accept or reject, download the curated set as a zip."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import numpy as np

from engine import render
from engine.errors import NuDiffError
from nudiff_app.editing import zoom_to
from nudiff_app.state import AppContext, Session, ui_action

BADGE = {"pending": "to review", "accepted": "accepted", "rejected": "rejected"}


def basket_gallery(sess: Session) -> list:
    out = []
    for it in sess.basket.items:
        image, inst = sess.basket.arrays(it.id)
        out.append((zoom_to(image, 160), f"{it.id} · {BADGE[it.status]}" + (" · edited" if it.meta.get("edited")
                                                                          else "")))
    return out


def pair_view(sess: Session, opacity: float) -> tuple:
    """Values for [side by side, overlay, details]."""
    items = sess.basket.items
    if not items:
        return None, None, "The basket is empty: add results from **Synthesize**."
    i = min(max(0, sess.selected_pair), len(items) - 1)
    sess.selected_pair = i
    it = items[i]
    image, inst = sess.basket.arrays(it.id)
    gap = np.full((image.shape[0], max(2, image.shape[1] // 32), 3), 255, np.uint8)
    side = zoom_to(np.concatenate([image, gap, render.colorize_instances(inst)], axis=1), 640)
    big = zoom_to(image, 384)
    s = big.shape[0] // image.shape[0]
    big_inst = np.repeat(np.repeat(inst, s, 0), s, 1)
    over = render.overlay_contours(big, big_inst, opacity=float(opacity), color=(0, 255, 0))
    m = it.meta
    c = sess.basket.counts()
    text = (f"**{it.id}** ({i + 1} of {len(items)}) · {BADGE[it.status]} · {int(inst.max())} nuclei · "
            f"w = {m.get('w')} · {m.get('sampler')} {m.get('steps')} steps · seed {m.get('seed')}"
            + (" · **edited by hand**" if m.get("edited") else "")
            + f"  \nBasket: {c['accepted']} accepted, {c['pending']} to review, {c['rejected']} rejected.")
    return side, over, text


def _exported_items(sess: Session, include_pending: bool, action: str = "export") -> list:
    """Basket items an export would contain: accepted ones, plus those not reviewed yet if asked.

    ``action`` names what the user asked for ("export", "assess") in the error raised when there are none.
    """
    keep = {"accepted", "pending"} if include_pending else {"accepted"}
    items = [it for it in sess.basket.items if it.status in keep]
    if not items:
        raise NuDiffError(f"nothing to {action}: no accepted pairs in the basket"
                          + ("" if include_pending else " (tick 'Include pairs not reviewed yet'?)"))
    return items


def _training_folder(text: str | None, ctx: AppContext) -> Path | None:
    """The copy check's training folder: the one given (must exist), else the default image model's
    recorded training data when that folder is on this server, else None (no copy check)."""
    text = (text or "").strip()
    if text:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise NuDiffError(f"training folder not found: {text}")
        return folder
    from engine.checkpoint import read_record

    try:
        _, record = read_record(ctx.default_checkpoint("image"), kind="image")
    except NuDiffError:
        return None
    data = (record.get("train") or {}).get("data")
    if not isinstance(data, str) or not Path(data).is_absolute():
        return None
    return Path(data) if (Path(data) / "images").is_dir() else None


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Review each pair (image and label side by side, and label outlines over the image), accept "
                "or reject it, then export the basket as one zip (PNG images, 16-bit TIFF labels, HoVer-Net "
                "npy, COCO json, QuPath GeoJSON, manifest.csv).")
    ui.ex_gallery = gr.Gallery(label="Basket (click a pair to review it)", columns=6, height=260, format="png",
                               allow_preview=False, object_fit="contain", fit_columns=False, elem_id="ex-gallery")
    ui.ex_info = gr.Markdown(elem_id="ex-info")
    with gr.Row():
        ui.ex_side = gr.Image(label="Image | label", interactive=False, format="png", scale=3)
        with gr.Column(scale=2):
            ui.ex_overlay = gr.Image(label="Outlines over the image", interactive=False, format="png")
            ui.ex_opacity = gr.Slider(0, 1, value=0.8, step=0.05, label="Outline opacity")
    with gr.Row():
        ui.ex_prev = gr.Button("◀ Previous")
        ui.ex_accept = gr.Button("Accept", variant="primary", elem_id="ex-accept")
        ui.ex_reject = gr.Button("Reject", variant="stop", elem_id="ex-reject")
        ui.ex_next = gr.Button("Next ▶")
    ui.ex_index = gr.Number(value=0, precision=0, minimum=0, label="Pair #", visible=False)
    with gr.Row():
        ui.ex_formats = gr.CheckboxGroup(["HoVer-Net npy", "COCO json", "QuPath GeoJSON"],
                                         value=["HoVer-Net npy", "COCO json", "QuPath GeoJSON"],
                                         label="Extra formats (images, TIFF labels and manifest are always included)")
        ui.ex_pending = gr.Checkbox(value=True, label="Include pairs not reviewed yet")
    with gr.Row():
        ui.ex_build = gr.Button("Create zip", variant="primary", elem_id="ex-build")
        ui.ex_download = gr.DownloadButton("Download zip", visible=False, elem_id="ex-download")
    ui.ex_status = gr.Markdown(elem_id="ex-status")
    with gr.Accordion("Quality of the basket", open=False):
        gr.Markdown("Does the basket look like real data? Alignment of each image with its label (hematoxylin "
                    "threshold; optionally a segmenter trained on real data) and nucleus morphology compared "
                    "with a real labeled folder (Wasserstein distance per statistic).")
        with gr.Row():
            ui.ex_real = gr.Textbox(label="Real labeled folder on the server (optional)",
                                    placeholder="/data/my-nuclei (images/ + labels/)", scale=3,
                                    elem_id="ex-real")
            ui.ex_segmenter = gr.Textbox(label="Segmenter checkpoint (optional, .json)", scale=2,
                                         placeholder="runs/evaluate/.../segmenter.json")
        with gr.Row():
            ui.ex_two_sample = gr.Checkbox(False, label="Classifier two-sample test (needs the real folder; "
                                           "about a minute per 100 tiles)", elem_id="ex-two-sample")
            ui.ex_training = gr.Textbox(value="", label="Generator's training images, for the copy check (optional)",
                                        placeholder="empty: the image model's training folder, if on this server",
                                        scale=2, elem_id="ex-training")
        ui.ex_quality_btn = gr.Button("Assess the pairs that would be exported", elem_id="ex-quality")
        ui.ex_quality = gr.Markdown(elem_id="ex-quality-report")


# ----------------------------------------------------------------------------- event handlers
# Module level, testable without a browser: the ones that need the app hold it in ExportHandlers.


def export_view(sess: Session, opacity: float) -> tuple:
    """Values for [gallery, side by side, overlay, details] (ui.export_outputs)."""
    return (basket_gallery(sess), *pair_view(sess, opacity))


def gallery_index(evt: gr.SelectData) -> int:
    """The pair number of a click in the basket gallery."""
    return int(evt.index)


def export_zip(ctx: AppContext, sess: Session, items: list, formats) -> Path:
    """Write basket ``items`` of the session (see :func:`_exported_items`) with the extra ``formats`` as a zip in
    the exports folder; the session's last five zips are kept."""
    from engine.export import write_zip

    pairs = []
    for it in items:
        image, inst = sess.basket.arrays(it.id)
        pairs.append((image, inst, {**it.meta, "id": it.id}))
    folder = ctx.exports_dir / sess.sid
    path = write_zip(pairs, folder / f"nudiff-{time.strftime('%Y%m%d-%H%M%S')}.zip",
                     hovernet="HoVer-Net npy" in formats, coco="COCO json" in formats,
                     geojson="QuPath GeoJSON" in formats)
    sess.last_export = path
    for old in sorted(folder.glob("nudiff-*.zip"))[:-5]:  # keep the last few exports
        old.unlink(missing_ok=True)
    return path


class ExportHandlers:
    """The Export tab's handlers: each finds the browser session's basket through the app context."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    @ui_action(5)
    def show(self, sid, index, opacity, request: gr.Request) -> tuple:
        """[status, *export_view] of pair ``index``."""
        sess = self.ctx.session(sid, request)
        sess.selected_pair = int(index or 0)
        return ("", *export_view(sess, opacity))

    @ui_action(3)
    def opacity_changed(self, sid, opacity, request: gr.Request) -> tuple:
        """[status, overlay, details]: only the overlay is redrawn."""
        sess = self.ctx.session(sid, request)
        side, over, text = pair_view(sess, opacity)
        return gr.skip(), over, gr.skip()

    def step(self, delta: int, sid, opacity, request: gr.Request | None) -> tuple:
        """[status, *export_view, pair #] after moving ``delta`` pairs (wrapping around)."""
        sess = self.ctx.session(sid, request)
        n = len(sess.basket.items)
        if n:
            sess.selected_pair = (sess.selected_pair + delta) % n
        return ("", *export_view(sess, opacity), sess.selected_pair)

    @ui_action(6)
    def go_previous(self, sid, opacity, request: gr.Request) -> tuple:
        return self.step(-1, sid, opacity, request)

    @ui_action(6)
    def go_next(self, sid, opacity, request: gr.Request) -> tuple:
        return self.step(1, sid, opacity, request)

    def mark(self, status: str, sid, index, opacity, request: gr.Request | None) -> tuple:
        """[status, *export_view, pair #]: pair ``index`` (default: the selected one) marked ``status``, then
        the next pair still to review selected."""
        sess = self.ctx.session(sid, request)
        n = len(sess.basket.items)
        if not n:
            raise NuDiffError("the basket is empty")
        i = int(index if index is not None else sess.selected_pair)
        if not 0 <= i < n:
            raise NuDiffError(f"no pair #{i}; choose 0 to {n - 1}")
        item = sess.basket.set_status(i, status)
        nxt = next((j for j in list(range(i + 1, n)) + list(range(0, i))
                    if sess.basket.items[j].status == "pending"), i)
        sess.selected_pair = nxt
        return (f"{item.id}: {BADGE[status]}.", *export_view(sess, opacity), nxt)

    @ui_action(6)
    def accept(self, sid, index, opacity, request: gr.Request) -> tuple:
        return self.mark("accepted", sid, index, opacity, request)

    @ui_action(6)
    def reject(self, sid, index, opacity, request: gr.Request) -> tuple:
        return self.mark("rejected", sid, index, opacity, request)

    @ui_action(2)
    def build_zip(self, sid, formats, include_pending, request: gr.Request) -> tuple:
        """[status, download button] of a new zip of the basket."""
        sess = self.ctx.session(sid, request)
        items = _exported_items(sess, include_pending)
        path = export_zip(self.ctx, sess, items, formats)
        n_edit = sum(bool(it.meta.get("edited")) for it in items)
        return (f"Exported `{path.name}`: {len(items)} pairs ({n_edit} edited by hand), "
                f"{path.stat().st_size / 1024:.0f} KiB."), gr.update(value=str(path), visible=True)

    @ui_action(1)
    def assess(self, sid, include_pending, real, segmenter, two_sample, training, request: gr.Request) -> str:
        """The quality report (Markdown) of the pairs an export would contain."""
        from engine.quality import format_quality_markdown, quality_report

        sess = self.ctx.session(sid, request)
        pairs = [sess.basket.arrays(it.id) for it in _exported_items(sess, include_pending, "assess")]
        real = (real or "").strip()
        real_dir = Path(real).expanduser() if real else None
        if real_dir is not None and not real_dir.is_dir():
            raise NuDiffError(f"real folder not found: {real}")
        if two_sample and real_dir is None:
            raise NuDiffError("the two-sample test needs a real labeled folder to tell the synthetic tiles from")
        train_dir = _training_folder(training, self.ctx)
        report = quality_report(pairs, real_dir, (segmenter or "").strip() or None, realism=bool(two_sample),
                                training=train_dir)
        return format_quality_markdown(report)


def wire(ctx: AppContext, ui) -> None:
    h = ExportHandlers(ctx)
    ui.export_outputs = [ui.ex_gallery, ui.ex_side, ui.ex_overlay, ui.ex_info]
    ui.export_view = export_view
    outs = [ui.ex_status, *ui.export_outputs]
    step_outs = [*outs, ui.ex_index]
    ui.ex_index.change(h.show, [ui.sid, ui.ex_index, ui.ex_opacity], outs, api_name="show_pair")
    ui.ex_gallery.select(gallery_index, None, ui.ex_index, api_visibility="private")
    ui.ex_opacity.change(h.opacity_changed, [ui.sid, ui.ex_opacity], [ui.ex_status, ui.ex_overlay, ui.ex_info],
                         api_visibility="private", show_progress="hidden")
    ui.ex_prev.click(h.go_previous, [ui.sid, ui.ex_opacity], step_outs, api_visibility="private")
    ui.ex_next.click(h.go_next, [ui.sid, ui.ex_opacity], step_outs, api_visibility="private")
    ui.ex_accept.click(h.accept, [ui.sid, ui.ex_index, ui.ex_opacity], step_outs, api_name="accept_pair")
    ui.ex_reject.click(h.reject, [ui.sid, ui.ex_index, ui.ex_opacity], step_outs, api_name="reject_pair")
    ui.ex_quality_btn.click(h.assess, [ui.sid, ui.ex_pending, ui.ex_real, ui.ex_segmenter, ui.ex_two_sample,
                                       ui.ex_training], ui.ex_quality, api_name="basket_quality")
    ui.ex_build.click(h.build_zip, [ui.sid, ui.ex_formats, ui.ex_pending], [ui.ex_status, ui.ex_download],
                      api_name="export_zip")
