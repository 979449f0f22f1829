"""Synthesize tab: H&E images for the current structure with classifier-free guidance."""

from __future__ import annotations

import os

import gradio as gr

from engine.conditioning import Provenance
from engine.config import PAPER_W
from engine.errors import NuDiffError
from engine.samplers import SAMPLERS
from nudiff_app.editing import label_view, overview, size_text, zoom_to
from nudiff_app.state import AppContext, Result, Session, ui_action
from nudiff_app.structures_tab import SAMPLER_INFO, sampler_steps


def current_view(sess: Session) -> tuple:
    """Values for [structure picture, description]."""
    cur = sess.current
    if cur is None:
        return None, "No structure yet: sample one in **Structures**, or make one in **Edit**."
    m = cur.meta
    src = {"sampled": f"sampled (seed {m.get('structure_seed')})", "uploaded": f"uploaded `{m.get('label_file')}`",
           "blank": "drawn on a blank tile"}.get(m.get("source"), "")
    h, w = cur.inst.shape
    pic = zoom_to(label_view(cur.inst), 384) if max(h, w) <= 512 else overview(cur.inst)  # large: downscaled
    how = ("structure as sampled" if cur.structure is not None else "structure rebuilt from the map")
    if m.get("outline_sigma"):
        how += f" (outlines smoothed, σ {m['outline_sigma']:g} px)"
    return (pic, f"Conditioning on **{int(cur.inst.max())} nuclei**, {size_text((h, w))} · {src}"
            + (" · **edited by hand**" if m.get("edited") else "") + f" · {how}")


def result_gallery(sess: Session) -> list:
    return [(zoom_to(r.image, 256), f"#{i} · seed {r.meta['seed']}") for i, r in enumerate(sess.results)]


def _record(ckpt: str | None, ctx: AppContext) -> tuple[str, dict]:
    """(file name, JSON record) of the chosen image checkpoint (weights not read)."""
    from engine.checkpoint import read_record

    weights, record = read_record(ckpt or ctx.default_checkpoint("image"), kind="image")
    return weights.name, record


def starting_w(ckpt: str | None, ctx: AppContext) -> float:
    """The w the slider starts from for an image model (engine.checkpoint.starting_w: its calibrated w, else
    the paper's); the paper's for a model that cannot be read."""
    from engine.checkpoint import starting_w as model_w

    try:
        return model_w(_record(ckpt, ctx)[1])
    except NuDiffError:
        return PAPER_W


def w_advice(ckpt: str | None, ctx: AppContext) -> tuple:
    """Values for [calibrated-w line, 'Use calibrated w' button, w slider] when a model is chosen: the
    slider moves to the model's calibrated w (the paper's 2 when it has none)."""
    from engine.guidance import RECORD_KEY, recommended_w

    try:
        name, record = _record(ckpt, ctx)
    except NuDiffError as e:
        return f"*{e}*", gr.update(interactive=False), gr.update()
    w = recommended_w(record)
    if w is None:
        return (f"`{name}` has no calibrated w yet, so w starts at the paper's {PAPER_W:g}: open **Calibrate w "
                f"for this model** below.", gr.update(interactive=False), PAPER_W)
    g = record[RECORD_KEY]
    rc = g.get("real_contrast")
    contrast = f": contrast {rc:.0f} grey levels" if isinstance(rc, (int, float)) else ""
    return (f"w starts at the calibrated w of `{name}`: **{w:g}** (its nuclei then stand out as much as in "
            f"`{g.get('reference', '?')}`{contrast}, on the same layouts); the paper's w = {PAPER_W:g} is one "
            f"click away.", gr.update(interactive=True), w)


COLOUR_INFO = ("give each image the mean colour of a training tile with as many nuclei, while the model cannot "
               "see it yet (its first steps); off: the model's own guess, the paper's sampling, often too dark "
               "for a briefly trained model")


def colour_option(ckpt: str | None, ctx: AppContext):
    """The 'Colour from training tiles' checkbox for an image model: on, and changeable, when the model
    stores its training tiles' colours (engine.colour_prior, ``export-model --reference DIR``); off and
    locked, saying why, when it stores none."""
    from engine.checkpoint import stored_tensor_names
    from engine.colour_prior import COLOUR_KEY

    try:
        has = COLOUR_KEY in stored_tensor_names(ckpt or ctx.default_checkpoint("image"))
    except NuDiffError:
        has = False
    if has:
        return gr.update(value=True, interactive=True, info=COLOUR_INFO)
    return gr.update(value=False, interactive=False,
                     info="this model stores no training colours (add them with `python -m engine export-model "
                          "MODEL OUT --reference DIR`, DIR its labeled training images)")


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Synthesize H&E images whose nuclei follow the current structure. Higher guidance *w* follows "
                "the structure more strictly and makes nuclei starker; the paper uses w = 2. A model trained for "
                "less long than the paper's often needs less: its **calibrated w** (below the slider) is the one "
                "at which its nuclei stand out as much as in real images.")
    with gr.Row():
        with gr.Column(scale=2):
            ui.sy_structure = gr.Image(label="Current structure", interactive=False, format="png",
                                       elem_id="sy-structure")
            ui.sy_info = gr.Markdown(elem_id="sy-info")
        with gr.Column(scale=3):
            with gr.Row():
                ui.sy_ckpt = gr.Dropdown(ctx.list_checkpoints("image"), label="Image model",
                                         allow_custom_value=True, scale=4)
                ui.sy_refresh = gr.Button("↻", scale=0, min_width=40)
            ui.sy_w = gr.Slider(0, 10, value=starting_w(None, ctx), step=0.05, label="Guidance scale w", elem_id="sy-w",
                                info="how strictly the image follows the nuclei layout; 2 = the paper's; "
                                     "higher makes nuclei stand out more (starker than real beyond some w); "
                                     "near 0 nuclei can fade, and the label then no longer fits its image")
            with gr.Row(equal_height=True):
                ui.sy_wrec = gr.Markdown(elem_id="sy-wrec")
                ui.sy_use_w = gr.Button("Use calibrated w", scale=0, min_width=160, elem_id="sy-use-w")
                ui.sy_paper_w = gr.Button(f"Paper's w = {PAPER_W:g}", scale=0, min_width=140, elem_id="sy-paper-w")
            with gr.Accordion("Calibrate w for this model", open=False, elem_id="sy-calibrate"):
                gr.Markdown("Synthesizes the layouts of a few real tiles at w = 0, 1, 2 and 3, and finds the w "
                            "at which the nuclei are as much darker than their background as in the real images. "
                            "The answer is stored with the model. A few minutes on a CPU.")
                with gr.Row():
                    ui.sy_cal_real = gr.Textbox(label="Real labeled folder on the server (images/ + labels/)",
                                                placeholder="empty: the Train tab's folder, or the model's "
                                                            "training data", scale=3, elem_id="sy-cal-real")
                    ui.sy_cal_n = gr.Number(value=8, precision=0, minimum=1, maximum=64, label="Real tiles",
                                            scale=1, elem_id="sy-cal-n")
                    ui.sy_cal_run = gr.Button("Calibrate", scale=1, elem_id="sy-cal-run")
            ui.sy_colour = gr.Checkbox(value=False, label="Colour from training tiles", info=COLOUR_INFO,
                                       interactive=False, elem_id="sy-colour")
            with gr.Row():
                ui.sy_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", info=SAMPLER_INFO)
                ui.sy_steps = gr.Number(value=20, precision=0, minimum=1, maximum=1000, label="Steps",
                                        elem_id="sy-steps")
            with gr.Row():
                ui.sy_seed = gr.Number(value=0, precision=0, label="Seed")
                ui.sy_variants = gr.Slider(1, 8, value=2, step=1, label="Variants", elem_id="sy-variants")
            with gr.Row():
                ui.sy_run = gr.Button("Synthesize", variant="primary", elem_id="sy-run")
                ui.sy_cancel = gr.Button("Cancel", variant="stop", elem_id="sy-cancel")
    ui.sy_status = gr.Markdown(elem_id="sy-status")
    ui.sy_gallery = gr.Gallery(label="Results (click one to select it)", columns=4, height="auto", format="png",
                               allow_preview=False, object_fit="contain", fit_columns=False, elem_id="sy-gallery")
    with gr.Row():
        ui.sy_index = gr.Number(value=0, precision=0, minimum=0, label="Selected result #", elem_id="sy-index")
        ui.sy_add = gr.Button("Add selected to basket", variant="primary", elem_id="sy-add")
        ui.sy_add_all = gr.Button("Add all to basket", elem_id="sy-add-all")


def gallery_index(evt: gr.SelectData) -> int:
    return int(evt.index)


def add_results(sess: Session, indices: list[int]) -> str:
    """Put results #indices into the basket (pending review); the status line."""
    with sess.lock:
        if not sess.results:
            raise NuDiffError("nothing to add: synthesize images first")
        bad = [i for i in indices if not 0 <= i < len(sess.results)]
        if bad:
            raise NuDiffError(f"no result #{bad[0]}; choose 0 to {len(sess.results) - 1}")
        ids = []
        for i in indices:
            r = sess.results[i]
            ids.append(sess.basket.add(r.image, r.inst, r.meta, status="pending").id)
    c = sess.basket.counts()
    return (f"Added {', '.join(ids)} to the basket ({len(sess.basket.items)} pairs: "
            f"{c['accepted']} accepted, {c['pending']} to review).")


class SynthesizeHandlers:
    """The Synthesize tab's event handlers (methods, so that Gradio sees their request parameters)."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def refresh(self, current):
        choices = self.ctx.list_checkpoints("image")
        values = [c[1] for c in choices]
        return gr.update(choices=choices, value=current if current else (values[0] if values else None))

    def advice(self, ckpt):
        return w_advice(ckpt, self.ctx)

    def colour(self, ckpt):
        return colour_option(ckpt, self.ctx)

    @ui_action(2)
    def use_w(self, ckpt):
        from engine.guidance import recommended_w

        name, record = _record(ckpt, self.ctx)
        w = recommended_w(record)
        if w is None:
            raise NuDiffError(f"{name} has no calibrated w: calibrate it first")
        return f"w set to {w:g}, the calibrated w of `{name}`.", w

    def paper_w(self):
        return f"w set to {PAPER_W:g}, the paper's guidance scale.", PAPER_W

    @ui_action(4)
    def calibrate(self, sid, ckpt, real, n, train_folder, request: gr.Request, progress=gr.Progress()):
        from engine.guidance import calibrate_guidance, store_calibration

        ctx = self.ctx
        sess = ctx.session(sid, request)
        sess.cancel.clear()
        name, record = _record(ckpt, ctx)
        real = (real or "").strip() or (train_folder or "").strip()
        if not real:
            data = (record.get("train") or {}).get("data")
            if not data or not os.path.isdir(data):
                raise NuDiffError("enter a folder of real labeled images (images/ + labels/), e.g. the training data")
            real = data
        model = ctx.model(ckpt, "image")
        progress(0, desc="Calibrating w")
        cal = calibrate_guidance(model, real, n=int(n or 8), progress=lambda i, t: progress((i, t), desc="Denoising"),
                                 cancel=sess.cancel.is_set)
        store_calibration(model.path, cal)
        advice, button, _ = w_advice(ckpt, ctx)
        grid = ", ".join(f"{w:g} → {c:.0f}" for w, c in sorted(cal.contrast_by_w.items()))
        return (f"Calibrated `{name}` on {cal.n_tiles} tiles of `{real}`: w = **{cal.w:g}** (nucleus contrast: real "
                f"{cal.real_contrast:.0f}; synthetic at w {grid}). The slider is set to it."), cal.w, advice, button

    @ui_action(2)
    def synthesize(self, sid, ckpt, w, sampler, steps, seed, variants, colour=False, request: gr.Request = None,
                   progress=gr.Progress()):
        """Images for the session's current condition (its sampled structure, or one rebuilt after an edit);
        ``colour``: with the model's stored training colours (engine.colour_prior)."""
        from engine.pipeline import plan_image_canvas

        ctx = self.ctx
        sess = ctx.session(sid, request)
        sess.cancel.clear()  # first thing, so a Cancel pressed while the model loads still counts
        if sess.current is None:
            raise NuDiffError("no structure to synthesize from: sample one in Structures or make one in Edit")
        model = ctx.model(ckpt, "image")
        if colour:
            model.stored_colours()  # refused here, before any work, if the model stores none
        with sess.lock:
            cond = sess.current.condition()
        inst = cond.inst
        plan = plan_image_canvas(model, inst.shape, float(w), ctx.tiling)  # refused here if over the budget
        desc = (f"Denoising {plan.windows} windows × {int(steps)} steps" if plan.tiled else "Denoising")
        progress(0, desc="Synthesizing")
        imgs = ctx.worker.run("synthesize", dict(checkpoint=str(model.path), structures=[cond], w=float(w),
                                                 sampler=sampler, steps=int(steps), seed=int(seed),
                                                 variants=int(variants), tiling=ctx.tiling,
                                                 colour_prior="model" if colour else None),
                              progress=lambda i, t: progress((i, t), desc=desc), cancel=sess.cancel.is_set)
        results = []
        for v, img in enumerate(imgs):
            prov = Provenance.of(cond, image_checkpoint=ctx.checkpoint_name(model), image_sha256=model.sha256,
                                 seed=int(seed) + v, w=float(w), sampler=sampler, steps=int(steps), variant=v,
                                 precision=model.precision, colour_prior="model" if colour else "",
                                 **plan.meta())
            results.append(Result(img, inst, prov.to_dict()))
        with sess.lock:
            sess.results = results
            sess.selected_result = 0
        tiled = (f", {inst.shape[0]}×{inst.shape[1]} px as {plan.windows} windows of {plan.grid.tile} px"
                 if plan.tiled else "")
        colours = ", colours of its training tiles" if colour else ""
        return (f"Synthesized {len(imgs)} image(s) from `{ctx.checkpoint_name(model)}` (w = {float(w):g}, {sampler}, "
                f"{int(steps)} steps{tiled}{colours})."), result_gallery(sess)

    def cancel(self, sid, request: gr.Request):
        self.ctx.session(sid, request).cancel.set()
        return "Cancelling…"


def wire(ctx: AppContext, ui) -> None:
    h = SynthesizeHandlers(ctx)
    ui.synth_outputs = [ui.sy_structure, ui.sy_info]
    ui.synth_view = current_view
    ui.w_advice = h.advice
    ui.sy_refresh.click(h.refresh, ui.sy_ckpt, ui.sy_ckpt, api_visibility="private")
    ui.sy_ckpt.change(h.advice, ui.sy_ckpt, [ui.sy_wrec, ui.sy_use_w, ui.sy_w], api_visibility="private")
    ui.sy_ckpt.change(h.colour, ui.sy_ckpt, ui.sy_colour, api_visibility="private")
    ui.colour_option = h.colour
    ui.sy_use_w.click(h.use_w, ui.sy_ckpt, [ui.sy_status, ui.sy_w], api_name="use_calibrated_w")
    ui.sy_paper_w.click(h.paper_w, None, [ui.sy_status, ui.sy_w], api_name="use_paper_w")
    ui.sy_cal_run.click(h.calibrate, [ui.sid, ui.sy_ckpt, ui.sy_cal_real, ui.sy_cal_n, ui.train_folder],
                        [ui.sy_status, ui.sy_w, ui.sy_wrec, ui.sy_use_w], api_name="calibrate_w",
                        concurrency_id="compute", concurrency_limit=1)
    ui.sy_sampler.change(sampler_steps, ui.sy_sampler, ui.sy_steps, api_visibility="private")
    ui.sy_run.click(h.synthesize, [ui.sid, ui.sy_ckpt, ui.sy_w, ui.sy_sampler, ui.sy_steps, ui.sy_seed,
                                   ui.sy_variants, ui.sy_colour],
                    [ui.sy_status, ui.sy_gallery], api_name="synthesize", concurrency_id="compute",
                    concurrency_limit=1)
    ui.sy_cancel.click(h.cancel, ui.sid, ui.sy_status, api_name="cancel_synthesis", queue=False)
    ui.sy_gallery.select(gallery_index, None, ui.sy_index, api_visibility="private")
    ui.synth_add = add_results

