"""Edit tab: correct or design a nuclei layout by hand before synthesizing an image for it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np

from engine.errors import DataError, NuDiffError
from nudiff_app import editing
from nudiff_app.state import AppContext, Session, ui_action

MERGE = "merge into one nucleus"
SPLIT = "keep as separate nuclei"


def editor_value(inst: np.ndarray) -> dict:
    bg = editing.editor_background(inst)
    return {"background": bg, "layers": [], "composite": bg}


def view(sess: Session) -> tuple:
    """Values for [editor, label map, info, structure view] from the session's current structure."""
    cur = sess.current
    if cur is None:
        return None, None, "No structure yet: sample one, upload a label map, or start from a blank tile.", None
    inst = cur.inst
    m = cur.meta
    src = {"sampled": f"sampled structure (seed {m.get('structure_seed')})", "uploaded":
           f"uploaded label `{m.get('label_file', '')}`", "blank": "blank tile"}.get(m.get("source"), "structure")
    info = (f"**{int(inst.max())} nuclei** · {inst.shape[0]}×{inst.shape[1]} px · from {src}"
            + (" · **edited by hand**" if m.get("edited") else "")
            + (f" · {len(sess.undo)} undo step(s)" if sess.undo else ""))
    return editor_value(inst), editing.label_view(inst), info, editing.structure_view(inst)


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Draw nuclei with the **white** brush (closed outlines are filled), erase label pixels with the "
                "**magenta** brush, then press **Apply strokes**. Click a nucleus in the label map on the right "
                "to delete it.")
    with gr.Row():
        ui.ed_upload = gr.File(label="Start from a label map (png / tif / npy)",
                               file_types=[".png", ".tif", ".tiff", ".npy"], height=140, scale=3)
        with gr.Column(scale=2):
            ui.ed_blank_size = gr.Number(value=0, precision=0, label="Blank tile size (px; 0 = the image model's)")
            ui.ed_blank = gr.Button("Start from a blank tile")
    ui.ed_status = gr.Markdown(elem_id="ed-status")
    ui.ed_info = gr.Markdown(elem_id="ed-info")
    with gr.Row():
        ui.ed_editor = gr.ImageEditor(
            label="Draw (white = add nucleus, magenta = erase)", type="numpy", image_mode="RGBA",
            sources=(), transforms=(), layers=False, format="png", canvas_size=(editing.DISPLAY_SIZE,) * 2,
            brush=gr.Brush(colors=["rgb(255, 255, 255)", "rgb(255, 0, 255)"], default_color="rgb(255, 255, 255)",
                           color_mode="fixed", default_size=8),
            eraser=gr.Eraser(default_size=12), buttons=["fullscreen"], height=640, scale=3, elem_id="ed-editor")
        with gr.Column(scale=2):
            ui.ed_labels = gr.Image(label="Label map (click a nucleus to delete it)", interactive=False,
                                    format="png", buttons=["fullscreen"], elem_id="ed-labels")
    with gr.Row():
        ui.ed_apply = gr.Button("Apply strokes", variant="primary", elem_id="ed-apply")
        ui.ed_undo = gr.Button("Undo", elem_id="ed-undo")
        ui.ed_clean = gr.Button("Remove small fragments")
        ui.ed_to_synth = gr.Button("Use in Synthesize", elem_id="ed-to-synth")
    with gr.Row():
        ui.ed_touch = gr.Radio([MERGE, SPLIT], value=SPLIT, label="A stroke touching a nucleus should")
        ui.ed_min = gr.Number(value=10, precision=0, minimum=0, maximum=10000,
                              label="Remove fragments smaller than (px)")
    ui.ed_structure = gr.Image(label="Derived structure: semantic | horizontal | vertical", interactive=False,
                               format="png", height=280)


def wire(ctx: AppContext, ui) -> None:
    ui.edit_outputs = [ui.ed_editor, ui.ed_labels, ui.ed_info, ui.ed_structure]
    outs = [ui.ed_status, *ui.edit_outputs]
    ui.edit_view = view

    def _sess(sid, request):
        return ctx.session(sid, request)

    def _require(sess):
        if sess.current is None:
            raise NuDiffError("no structure to edit yet: sample one, upload a label map, or start from a blank tile")
        return sess.current

    @ui_action(5)
    def upload(sid, file, request: gr.Request):
        from engine.data import read_label

        if not file:
            return (gr.skip(),) * 5
        path = Path(file)
        inst = read_label(path)
        h, w = inst.shape
        note = ""
        if h != w:
            s = min(h, w)
            y0, x0 = (h - s) // 2, (w - s) // 2
            from engine.structure import relabel

            inst = relabel(inst[y0:y0 + s, x0:x0 + s])
            note = f" (centre-cropped from {h}×{w} to a square {s}×{s})"
        if max(inst.shape) > 1024:
            raise DataError(f"label map {path.name} is {h}×{w} px; at most 1024 px can be edited here")
        sess = _sess(sid, request)
        sess.set_current(inst, {"source": "uploaded", "label_file": path.name, "edited": False})
        return (f"Loaded `{path.name}`{note}.", *view(sess))

    ui.ed_upload.upload(upload, [ui.sid, ui.ed_upload], outs, api_name="edit_upload_label")

    @ui_action(5)
    def blank(sid, size, image_ckpt, request: gr.Request):
        if not size:
            size = ctx.model(image_ckpt, "image").image_size
        size = int(size)
        if not 8 <= size <= 1024:
            raise NuDiffError("blank tile size must be between 8 and 1024 px")
        sess = _sess(sid, request)
        sess.set_current(np.zeros((size, size), np.int32), {"source": "blank", "edited": False})
        return (f"Blank {size}×{size} tile: draw nuclei with the white brush.", *view(sess))

    ui.ed_blank.click(blank, [ui.sid, ui.ed_blank_size, ui.sy_ckpt], outs, api_name="edit_blank")

    def _apply_layers(sess, editor, touch, min_px) -> int | None:
        """Apply the editor's brush strokes to the current structure; None if there were none."""
        cur = _require(sess)
        layers = (editor or {}).get("layers") or []
        add = np.zeros(cur.inst.shape, bool)
        erase = np.zeros(cur.inst.shape, bool)
        for layer in layers:
            a, e = editing.strokes_from_layer(layer, cur.inst.shape)
            add |= a
            erase |= e
        if not add.any() and not erase.any():
            return None
        new, added = editing.apply_strokes(cur.inst, add, erase, merge_touching=(touch == MERGE),
                                           min_px=int(min_px or 0))
        with sess.lock:
            sess.push_undo()
            cur.inst = new
            cur.meta["edited"] = True
        return added

    @ui_action(5)
    def apply(sid, editor, touch, min_px, request: gr.Request):
        sess = _sess(sid, request)
        before = int(_require(sess).inst.max())
        added = _apply_layers(sess, editor, touch, min_px)
        if added is None:
            return ("Nothing drawn: paint with the brush on the left first.", gr.skip(), gr.skip(), gr.skip(),
                    gr.skip())
        after = int(sess.current.inst.max())
        return (f"Applied: {before} → {after} nuclei.", *view(sess))

    ui.ed_apply.click(apply, [ui.sid, ui.ed_editor, ui.ed_touch, ui.ed_min], outs, api_name="edit_apply")

    @ui_action(5)
    def undo(sid, request: gr.Request):
        sess = _sess(sid, request)
        cur = _require(sess)
        with sess.lock:
            if not sess.undo:
                return ("Nothing to undo.", *(gr.skip(),) * 4)
            cur.inst = sess.undo.pop()
        return ("Undone.", *view(sess))

    ui.ed_undo.click(undo, ui.sid, outs, api_name="edit_undo")

    @ui_action(5)
    def clean(sid, min_px, request: gr.Request):
        sess = _sess(sid, request)
        cur = _require(sess)
        new = editing.clean_fragments(cur.inst, int(min_px or 0))
        if np.array_equal(new, cur.inst):
            return ("No fragments below the size limit.", *(gr.skip(),) * 4)
        with sess.lock:
            sess.push_undo()
            n0 = int(cur.inst.max())
            cur.inst = new
            cur.meta["edited"] = True
        return (f"Cleaned: {n0} → {int(new.max())} nuclei.", *view(sess))

    ui.ed_clean.click(clean, [ui.sid, ui.ed_min], outs, api_name="edit_clean")

    def delete_nucleus(sess, row: int, col: int):
        """Delete the nucleus at (row, col) of the label map (undoable); the tab's outputs."""
        cur = _require(sess)
        new, k = editing.delete_at(cur.inst, row, col, radius=2)
        if not k:
            return ("No nucleus there.", *(gr.skip(),) * 4)
        with sess.lock:
            sess.push_undo()
            cur.inst = new
            cur.meta["edited"] = True
        return (f"Deleted a nucleus ({int(new.max())} left).", *view(sess))

    @ui_action(5)
    def delete(sid, evt: gr.SelectData, request: gr.Request):
        sess = _sess(sid, request)
        x, y = (int(v) for v in evt.index[:2])
        s = editing.display_scale(max(_require(sess).inst.shape))
        return delete_nucleus(sess, y // s, x // s)

    ui.ed_labels.select(delete, ui.sid, outs, api_visibility="private")

    @ui_action(5)
    def delete_xy(sid, x, y, request: gr.Request):
        return delete_nucleus(_sess(sid, request), int(y), int(x))

    ui.ed_del_x = gr.Number(visible=False, precision=0)
    ui.ed_del_y = gr.Number(visible=False, precision=0)
    ui.ed_del_btn = gr.Button(visible=False)
    ui.ed_del_btn.click(delete_xy, [ui.sid, ui.ed_del_x, ui.ed_del_y], outs, api_name="edit_delete_at")
    ui.edit_apply_layers = _apply_layers
