"""Edit tab: correct or design a nuclei layout by hand before synthesizing an image for it.

A label map of any shape (up to editing.MAX_EDIT_SIDE px a side) is edited one *region* at a time: the
overview shows the whole map with the region's rectangle, the editor and the click-to-delete label view
show the region magnified. A map that fits the canvas (DISPLAY_SIZE) is shown whole, as before. Strokes,
deletions, undo and fragment cleaning all act on the whole map.

The handlers are module-level functions of plain values (the session and the inputs' values) returning
the outputs' values, so they can be tested without a browser; wire() connects them with small closures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import numpy as np

from engine.errors import NuDiffError
from nudiff_app import editing
from nudiff_app.editing import Region
from nudiff_app.state import AppContext, Session, ui_action

log = logging.getLogger("nudiff_app")

MERGE = "merge into one nucleus"
SPLIT = "keep as separate nuclei"
REGION_CHOICES = [(f"{s} px", s) for s in editing.REGION_SIZES] + [("whole map", 0)]
UNDO_BYTES = 1 << 30  # undo copies of a large map are limited to about this much memory (at least one)
MIN_SIDE = 8  # smallest label map side (px) the Edit tab takes (a blank tile's, and what synthesis needs)
NO_STRUCTURE = "No structure yet: sample one, upload a label map, or start from a blank tile."


# ----------------------------------------------------------------------------- views


def _require(sess: Session):
    if sess.current is None:
        raise NuDiffError("no structure to edit yet: sample one, upload a label map, or start from a blank tile")
    return sess.current


def region_of(cur) -> Region:
    """The region of the current structure shown in the editor (default: editing.default_region),
    kept inside the map."""
    r = getattr(cur, "edit_region", None)
    if r is None:
        return editing.default_region(cur.inst.shape)
    return editing.clamp_region(cur.inst.shape, r.x0, r.y0, r.size)


def set_region(cur, region: Region) -> None:
    cur.edit_region = region  # lives on the Current: a new structure starts at its default region


def editor_value(inst: np.ndarray, region: Region | None = None) -> dict:
    crop = np.asarray(inst) if region is None else np.asarray(inst)[region.slices]
    bg = editing.editor_background(crop)
    return {"background": bg, "layers": [], "composite": bg}


def info_line(sess: Session) -> str:
    cur = _require(sess)
    inst, m = cur.inst, cur.meta
    src = {"sampled": f"sampled structure (seed {m.get('structure_seed')})", "uploaded":
           f"uploaded label `{m.get('label_file', '')}`", "blank": "blank tile"}.get(m.get("source"), "structure")
    return (f"**{int(inst.max())} nuclei** · {editing.size_text(inst.shape)} · from {src}"
            + (" · **edited by hand**" if m.get("edited") else "")
            + (f" · {len(sess.undo)} undo step(s)" if sess.undo else "")
            + f" · {region_of(cur).describe(inst.shape)}")


def view(sess: Session) -> tuple:
    """Values for [editor, label map, info, structure view]: the current region of the structure."""
    cur = sess.current
    if cur is None:
        return None, None, NO_STRUCTURE, None
    with sess.lock:
        inst, region = cur.inst, region_of(cur)
        info = info_line(sess)
    crop = inst[region.slices]
    return editor_value(inst, region), editing.label_view(crop), info, editing.structure_view(crop)


def overview_values(sess: Session) -> tuple:
    """Values for [overview, region x, region y, region size] (the overview is cached per map and region)."""
    cur = sess.current
    if cur is None:
        return None, 0, 0, 0
    with sess.lock:
        inst, region = cur.inst, region_of(cur)
        cached = getattr(cur, "edit_overview", None)
    if cached is not None and cached[0] is inst and cached[1] == region:
        pic = cached[2]
    else:
        pic = editing.overview(inst, region)
        cur.edit_overview = (inst, region, pic)
    return pic, region.x0, region.y0, region.size


# ----------------------------------------------------------------------------- handlers


def _replace(sess: Session, new: np.ndarray) -> None:
    """A hand edit: undoable, with the undo copies of a large map kept within UNDO_BYTES. The sampled
    structure is dropped (an edited map's structure is rebuilt when synthesized)."""
    with sess.lock:
        sess.replace_current(new, max_undo=max(1, UNDO_BYTES // max(1, sess.current.inst.nbytes)))


def _peek_shape(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image / .npy label from its header, without reading the pixels; None if unknown."""
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape[:2])
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shape = tf.series[0].shape
            return tuple(shape[:2]) if len(shape) == 2 or shape[-1] in (1, 3, 4) else tuple(shape[-2:])
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # noqa: BLE001 - read_label gives the real error
        return None


def upload_label(sess: Session, file) -> tuple:
    """Load a label map file (the whole map, any shape up to MAX_EDIT_SIDE); [status, *view]."""
    from engine.data import read_label

    if not file:
        return (gr.skip(),) * 5
    path = Path(file)
    shape = _peek_shape(path)
    if shape is not None:
        editing.check_edit_size(shape, f"label map {path.name}")
    inst = read_label(path)
    editing.check_edit_size(inst.shape, f"label map {path.name}")
    if min(inst.shape) < MIN_SIDE:
        raise NuDiffError(f"label map {path.name} is {inst.shape[1]}×{inst.shape[0]} px (width × height); the "
                          f"Edit tab takes maps of at least {MIN_SIDE} px a side")
    sess.set_current(inst, {"source": "uploaded", "label_file": path.name, "edited": False})
    region = region_of(sess.current)
    note = "" if region.covers(inst.shape) else \
        f" ({editing.size_text(inst.shape)}): pick the region to edit on the overview, or with the region inputs"
    return (f"Loaded `{path.name}`{note}.", *view(sess))


def blank_tile(sess: Session, size: int) -> tuple:
    size = int(size)
    if not MIN_SIDE <= size <= editing.MAX_EDIT_SIDE:
        raise NuDiffError(f"blank tile size must be between {MIN_SIDE} and {editing.MAX_EDIT_SIDE} px")
    sess.set_current(np.zeros((size, size), np.int32), {"source": "blank", "edited": False})
    return (f"Blank {size}×{size} tile: draw nuclei with the white brush.", *view(sess))


def apply_layers(sess: Session, editor, touch, min_px) -> int | None:
    """Apply the editor's brush strokes (drawn on the current region) to the whole map; None if there
    were none, else the number of nuclei added."""
    cur = _require(sess)
    layers = (editor.get("layers") or []) if isinstance(editor, dict) else []
    with sess.lock:
        region = region_of(cur)
        add, erase = editing.region_strokes(layers, cur.inst.shape, region)
        if not add.any() and not erase.any():
            return None
        new, added = editing.apply_strokes(cur.inst, add, erase, merge_touching=(touch == MERGE),
                                           min_px=int(min_px or 0))
        _replace(sess, new)
    return added


def apply_editor(sess: Session, editor, touch, min_px) -> tuple:
    before = int(_require(sess).inst.max())
    if apply_layers(sess, editor, touch, min_px) is None:
        return ("Nothing drawn: paint with the brush on the left first.", *(gr.skip(),) * 4)
    return (f"Applied: {before} → {int(sess.current.inst.max())} nuclei.", *view(sess))


def undo(sess: Session) -> tuple:
    cur = _require(sess)
    with sess.lock:
        if not sess.undo:
            return ("Nothing to undo.", *(gr.skip(),) * 4)
        cur.restore(sess.undo.pop())
    return ("Undone.", *view(sess))


def clean(sess: Session, min_px) -> tuple:
    cur = _require(sess)
    with sess.lock:
        new = editing.clean_fragments(cur.inst, int(min_px or 0))
        if np.array_equal(new, cur.inst):
            return ("No fragments below the size limit.", *(gr.skip(),) * 4)
        n0 = int(cur.inst.max())
        _replace(sess, new)
    return (f"Cleaned: {n0} → {int(new.max())} nuclei.", *view(sess))


def delete_nucleus(sess: Session, row: int, col: int) -> tuple:
    """Delete the nucleus at (row, col) of the whole map (undoable); [status, *view]."""
    cur = _require(sess)
    with sess.lock:
        new, k = editing.delete_at(cur.inst, int(row), int(col), radius=2)
        if not k:
            return ("No nucleus there.", *(gr.skip(),) * 4)
        _replace(sess, new)
    return (f"Deleted a nucleus ({int(new.max())} left).", *view(sess))


def delete_in_view(sess: Session, x: int, y: int) -> tuple:
    """Delete the nucleus clicked at (x, y) of the region's label view."""
    fx, fy = editing.region_to_full(region_of(_require(sess)), x, y)
    return delete_nucleus(sess, fy, fx)


def _size(size, default: int) -> int:
    """A region size from an input (px; 0 = the whole map; empty = keep `default`)."""
    if size is None or str(size).strip() == "":
        return int(default)
    try:
        return max(0, int(float(str(size).split()[0])))
    except ValueError:
        raise NuDiffError(f"region size {size!r}: give a side in px, or 0 for the whole map") from None


def select_region(sess: Session, x0, y0, size, editor=None, touch=SPLIT, min_px=0) -> tuple:
    """Show the region of side `size` (0 = whole map) with top-left (x0, y0); strokes still pending in
    `editor` are applied to the old region first. [status, *view, *overview_values]."""
    cur = _require(sess)
    pending = apply_layers(sess, editor, touch, min_px) if editor else None
    with sess.lock:
        shape = cur.inst.shape
        size = _size(size, region_of(cur).size)
        region = editing.clamp_region(shape, x0, y0, size)
        set_region(cur, region)
    msg = f"Showing {'the ' if region.covers(shape) else ''}{region.describe(shape)}."
    if (size == 0 and not region.covers(shape)) or size > editing.MAX_REGION_SIDE:
        msg += f" The editor shows at most {editing.MAX_REGION_SIDE} px a side."
    if pending is not None:
        msg = "Pending strokes applied. " + msg
    return (msg, *view(sess), *overview_values(sess))


def region_around(sess: Session, x, y, size, editor=None, touch=SPLIT, min_px=0) -> tuple:
    """Like select_region, for the region centred on the whole-map point (x, y)."""
    cur = _require(sess)
    size = _size(size, region_of(cur).size)
    r = editing.region_at(cur.inst.shape, x, y, size)
    return select_region(sess, r.x0, r.y0, size, editor, touch, min_px)


def overview_click(sess: Session, x, y, size, editor=None, touch=SPLIT, min_px=0) -> tuple:
    """The overview was clicked at (x, y) of its picture: centre the region there."""
    fx, fy = editing.overview_to_full(_require(sess).inst.shape, x, y)
    return region_around(sess, fx, fy, size, editor, touch, min_px)


def resize_region(sess: Session, size, editor=None, touch=SPLIT, min_px=0) -> tuple:
    """A new region size, keeping the region's centre."""
    r = region_of(_require(sess))
    return region_around(sess, r.x0 + r.w // 2, r.y0 + r.h // 2, size, editor, touch, min_px)


# ----------------------------------------------------------------------------- layout and wiring


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Draw nuclei with the **white** brush (closed outlines are filled), erase label pixels with the "
                "**magenta** brush, then press **Apply strokes**. Click a nucleus in the label map on the right "
                "to delete it. A large map is edited one region at a time: click the overview to move it.")
    with gr.Row():
        ui.ed_upload = gr.File(label="Start from a label map (png / tif / npy, or QuPath GeoJSON outlines)",
                               file_types=[".png", ".tif", ".tiff", ".npy", ".geojson", ".json"], height=140,
                               scale=3, elem_id="ed-upload")
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
            ui.ed_overview = gr.Image(label="Whole map (click to move the region)", interactive=False,
                                      format="png", height=300, buttons=["fullscreen"], elem_id="ed-overview")
            with gr.Row():
                ui.ed_region_x = gr.Number(value=0, precision=0, label="Region left (x)",
                                           elem_id="ed-region-x", min_width=80)
                ui.ed_region_y = gr.Number(value=0, precision=0, label="Region top (y)",
                                           elem_id="ed-region-y", min_width=80)
                ui.ed_region_size = gr.Dropdown(REGION_CHOICES, value=0, label="Region size", allow_custom_value=True,
                                                elem_id="ed-region-size", min_width=100)
            ui.ed_region_go = gr.Button("Show region", size="sm", elem_id="ed-region-go")
    with gr.Row():
        ui.ed_apply = gr.Button("Apply strokes", variant="primary", elem_id="ed-apply")
        ui.ed_undo = gr.Button("Undo", elem_id="ed-undo")
        ui.ed_clean = gr.Button("Remove small fragments")
        ui.ed_to_synth = gr.Button("Use in Synthesize", elem_id="ed-to-synth")
    with gr.Row():
        ui.ed_touch = gr.Radio([MERGE, SPLIT], value=SPLIT, label="A stroke touching a nucleus should")
        ui.ed_min = gr.Number(value=10, precision=0, minimum=0, maximum=10000,
                              label="Remove fragments smaller than (px)")
    ui.ed_structure = gr.Image(label="Derived structure of the region: semantic | horizontal | vertical",
                               interactive=False, format="png", height=280)


def wire(ctx: AppContext, ui) -> None:
    ui.edit_outputs = [ui.ed_editor, ui.ed_labels, ui.ed_info, ui.ed_structure]
    ui.edit_region_outputs = [ui.ed_overview, ui.ed_region_x, ui.ed_region_y, ui.ed_region_size]
    outs = [ui.ed_status, *ui.edit_outputs]
    region_outs = [*outs, *ui.edit_region_outputs]
    ui.edit_view = view
    ui.edit_apply_layers = apply_layers
    pending = [ui.ed_editor, ui.ed_touch, ui.ed_min]  # strokes not yet applied go with a region change

    def refresh(sid, request: gr.Request):
        """The overview and region inputs after anything that changed the map or the region."""
        try:
            return overview_values(ctx.session(sid, request))
        except Exception:  # noqa: BLE001 - a picture refresh must never break the page
            log.exception("could not draw the edit overview")
            return (gr.skip(),) * 4

    def then_refresh(event) -> None:
        event.then(refresh, ui.sid, ui.edit_region_outputs, api_visibility="private", concurrency_id="ed_overview")

    # other tabs' events (send to Edit, page load) show a new structure: its info line changes
    ui.ed_info.change(refresh, ui.sid, ui.edit_region_outputs, api_visibility="private",
                      concurrency_id="ed_overview")

    @ui_action(5)
    def upload_(sid, file, request: gr.Request):
        return upload_label(ctx.session(sid, request), file)

    then_refresh(ui.ed_upload.upload(upload_, [ui.sid, ui.ed_upload], outs, api_name="edit_upload_label"))

    @ui_action(5)
    def blank_(sid, size, image_ckpt, request: gr.Request):
        if not size:
            size = ctx.model(image_ckpt, "image").image_size
        return blank_tile(ctx.session(sid, request), size)

    then_refresh(ui.ed_blank.click(blank_, [ui.sid, ui.ed_blank_size, ui.sy_ckpt], outs, api_name="edit_blank"))

    @ui_action(5)
    def apply_(sid, editor, touch, min_px, request: gr.Request):
        return apply_editor(ctx.session(sid, request), editor, touch, min_px)

    then_refresh(ui.ed_apply.click(apply_, [ui.sid, ui.ed_editor, ui.ed_touch, ui.ed_min], outs,
                                   api_name="edit_apply"))

    @ui_action(5)
    def undo_(sid, request: gr.Request):
        return undo(ctx.session(sid, request))

    then_refresh(ui.ed_undo.click(undo_, ui.sid, outs, api_name="edit_undo"))

    @ui_action(5)
    def clean_(sid, min_px, request: gr.Request):
        return clean(ctx.session(sid, request), min_px)

    then_refresh(ui.ed_clean.click(clean_, [ui.sid, ui.ed_min], outs, api_name="edit_clean"))

    @ui_action(5)
    def delete_clicked(sid, evt: gr.SelectData, request: gr.Request):
        x, y = (int(v) for v in evt.index[:2])
        return delete_in_view(ctx.session(sid, request), x, y)

    then_refresh(ui.ed_labels.select(delete_clicked, ui.sid, outs, api_visibility="private"))

    @ui_action(5)
    def delete_xy(sid, x, y, request: gr.Request):
        return delete_nucleus(ctx.session(sid, request), int(y), int(x))  # whole-map coordinates

    ui.ed_del_x = gr.Number(visible=False, precision=0)
    ui.ed_del_y = gr.Number(visible=False, precision=0)
    ui.ed_del_btn = gr.Button(visible=False)
    then_refresh(ui.ed_del_btn.click(delete_xy, [ui.sid, ui.ed_del_x, ui.ed_del_y], outs,
                                     api_name="edit_delete_at"))

    # --- the region: an API endpoint (x0, y0, size) and the UI's controls (which also apply pending strokes)
    @ui_action(len(region_outs))
    def region_api(sid, x0, y0, size, request: gr.Request):
        return select_region(ctx.session(sid, request), x0, y0, size)

    ui.ed_region_btn = gr.Button(visible=False)
    ui.ed_region_btn.click(region_api, [ui.sid, ui.ed_region_x, ui.ed_region_y, ui.ed_region_size], region_outs,
                           api_name="edit_region")

    @ui_action(len(region_outs))
    def region_inputs(sid, x0, y0, size, editor, touch, min_px, request: gr.Request):
        return select_region(ctx.session(sid, request), x0, y0, size, editor, touch, min_px)

    region_in = [ui.sid, ui.ed_region_x, ui.ed_region_y, ui.ed_region_size, *pending]
    ui.ed_region_go.click(region_inputs, region_in, region_outs, api_visibility="private")
    ui.ed_region_x.submit(region_inputs, region_in, region_outs, api_visibility="private")
    ui.ed_region_y.submit(region_inputs, region_in, region_outs, api_visibility="private")

    @ui_action(len(region_outs))
    def region_size(sid, size, editor, touch, min_px, request: gr.Request):
        return resize_region(ctx.session(sid, request), size, editor, touch, min_px)

    ui.ed_region_size.input(region_size, [ui.sid, ui.ed_region_size, *pending], region_outs,
                            api_visibility="private")

    @ui_action(len(region_outs))
    def overview_clicked(sid, size, editor, touch, min_px, evt: gr.SelectData, request: gr.Request):
        x, y = (int(v) for v in evt.index[:2])
        return overview_click(ctx.session(sid, request), x, y, size, editor, touch, min_px)

    ui.ed_overview.select(overview_clicked, [ui.sid, ui.ed_region_size, *pending], region_outs,
                          api_visibility="private")
