"""Structures tab: sample nuclei layouts from the unconditional structure model."""

from __future__ import annotations

import gradio as gr
import numpy as np

from engine import render
from engine.errors import NuDiffError
from engine.samplers import SAMPLERS
from nudiff_app.editing import zoom_to
from nudiff_app.state import AppContext, Session, ui_action


def structure_thumb(inst: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """Coloured instance map with white outlines over the semantic channel, magnified."""
    pic = render.colorize_instances(inst).astype(np.float32)
    if structure is not None:  # faint semantic channel shows what watershed turned into nuclei
        sem = ((np.clip(structure[..., 0], -1, 1) + 1) * 40)[..., None]
        pic = np.where((inst == 0)[..., None], sem, pic)
    big = zoom_to(pic.astype(np.uint8), 256)
    s = big.shape[0] // inst.shape[0]
    big[render.contours(np.repeat(np.repeat(inst, s, 0), s, 1))] = (255, 255, 255)
    return big


SAMPLER_INFO = " · ".join(f"{s.name}: {s.description}" for s in SAMPLERS.values())  # engine.samplers' registry


def sampler_steps(sampler: str) -> int:
    return SAMPLERS[sampler].steps if sampler in SAMPLERS else 20


def build(ctx: AppContext, ui) -> None:
    gr.Markdown("Sample new nuclei layouts. Each is a 3-channel structure turned into an instance map by "
                "watershed; pick one to edit by hand or to synthesize images for.")
    with gr.Row():
        ui.st_ckpt = gr.Dropdown(ctx.list_checkpoints("structure"), label="Structure model",
                                 allow_custom_value=True, scale=4, elem_id="st-ckpt")
        ui.st_refresh = gr.Button("↻", scale=0, min_width=40)
    with gr.Row():
        ui.st_n = gr.Slider(1, 32, value=8, step=1, label="Number of structures", elem_id="st-n")
        ui.st_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", info=SAMPLER_INFO)
        ui.st_steps = gr.Number(value=20, precision=0, minimum=1, maximum=1000, label="Steps",
                                elem_id="st-steps")
        ui.st_seed = gr.Number(value=0, precision=0, label="Seed (sample i uses seed + i)")
        ui.st_oversample = gr.Slider(1, 4, value=1, step=0.5, elem_id="st-oversample", label="Realism filter ×k",
                                     info="sample k× more, keep the layouts most like the training data's (1 = off)")
        ui.st_size = gr.Number(value=0, precision=0, minimum=0, maximum=16384, label="Size (px; 0 = the model's)",
                               elem_id="st-size", info="larger than the model's tile: sampled as overlapping "
                                                        "windows, one watershed over the whole map")
        ui.st_outline = gr.Slider(0, 4, value=0, step=0.5, elem_id="st-outline", label="Smooth outlines (σ px)",
                                  info="round each nucleus's ragged outline after the watershed (0 = off, the "
                                       "paper's maps; 3 gives the demo model's nuclei the solidity of real ones)")
    with gr.Row():
        ui.st_sample = gr.Button("Sample structures", variant="primary", elem_id="st-sample")
        ui.st_cancel = gr.Button("Cancel", variant="stop", elem_id="st-cancel")
    ui.st_status = gr.Markdown(elem_id="st-status")
    ui.st_gallery = gr.Gallery(label="Sampled structures (click one to select it)", columns=4, height="auto",
                               format="png", allow_preview=False, object_fit="contain", fit_columns=False, elem_id="st-gallery")
    with gr.Row():
        ui.st_index = gr.Number(value=0, precision=0, label="Selected structure #", minimum=0, scale=1,
                                elem_id="st-index")
        ui.st_to_edit = gr.Button("Send to Edit", scale=1, elem_id="st-to-edit")
        ui.st_to_synth = gr.Button("Send to Synthesize", scale=1, elem_id="st-to-synth")


def pick(sess: Session, index) -> int:
    """Make sampled structure #index the session's current one (its structure kept, as sampled; rebuilt from
    the map where its outlines were smoothed: engine.pipeline.StructureSample.sampled_structure)."""
    with sess.lock:
        if not sess.samples:
            raise NuDiffError("sample some structures first")
        i = int(index or 0)
        if not 0 <= i < len(sess.samples):
            raise NuDiffError(f"no structure #{i}; choose 0 to {len(sess.samples) - 1}")
        s = sess.samples[i]
        # images are conditioned on the structure as sampled, or on one rebuilt from a map with smoothed outlines
        sess.set_current(s.inst, {**s.origin(), "edited": False, **sess.sample_meta}, structure=s.sampled_structure)
        sess.selected_sample = i
    return i


def gallery_index(evt: gr.SelectData) -> int:
    return int(evt.index)


class StructuresHandlers:
    """The Structures tab's event handlers (methods, so that Gradio sees their request parameters)."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def refresh(self, current):
        choices = self.ctx.list_checkpoints("structure")
        values = [c[1] for c in choices]
        return gr.update(choices=choices, value=current if current in values or current else
                         (values[0] if values else None))

    @ui_action(2)
    def sample(self, sid, ckpt, n, sampler, steps, seed, oversample=1.0, size=0, outline=0.0,
               request: gr.Request = None, progress=gr.Progress()):
        from engine.pipeline import candidate_count, plan_structure_canvas

        ctx = self.ctx
        sess = ctx.session(sid, request)
        sess.cancel.clear()  # first thing, so a Cancel pressed while the model loads still counts
        model = ctx.model(ckpt, "structure")
        size = int(size or 0) or model.image_size
        plan = plan_structure_canvas(model, size, ctx.tiling)  # refused here if over the budget
        desc = (f"Denoising {plan.windows} windows × {int(steps)} steps" if plan.tiled else "Denoising")
        progress(0, desc="Sampling structures")
        oversample, outline = float(oversample or 1.0), float(outline or 0.0)
        samples = ctx.worker.run("sample_structures", dict(
            checkpoint=str(model.path), n=int(n), sampler=sampler, steps=int(steps), seed=int(seed), size=size,
            batch_size=8, oversample=oversample, filter_mode="top", outline_sigma=outline, tiling=ctx.tiling),
            progress=lambda i, t: progress((i, t), desc=desc), cancel=sess.cancel.is_set)
        with sess.lock:
            sess.samples = samples
            sess.sample_meta = {"structure_checkpoint": ctx.checkpoint_name(model), "structure_sha256": model.sha256,
                                "structure_sampler": sampler, "structure_steps": int(steps)}
            sess.selected_sample = 0
        gallery = [(structure_thumb(s.inst, s.structure), f"#{i} · seed {s.seed} · {s.n_nuclei} nuclei")
                   for i, s in enumerate(samples)]
        kept = ""
        if oversample > 1:
            kept = (f" Realism filter: kept the {len(samples)} of {candidate_count(int(n), oversample)} sampled "
                    f"layouts most like the training data's.")
        if outline > 0:
            kept += f" Outlines smoothed (σ {outline:g} px); images will be conditioned on the smoothed maps."
        return (f"Sampled {len(samples)} structures from `{ctx.checkpoint_name(model)}` "
                f"({sampler}, {int(steps)} steps, {size} px"
                + (f" as {plan.windows} windows" if plan.tiled else "") + f").{kept}"), gallery

    def cancel(self, sid, request: gr.Request):
        self.ctx.session(sid, request).cancel.set()
        return "Cancelling…"


def wire(ctx: AppContext, ui) -> None:
    h = StructuresHandlers(ctx)
    ui.st_refresh.click(h.refresh, ui.st_ckpt, ui.st_ckpt, api_visibility="private")
    ui.st_sampler.change(sampler_steps, ui.st_sampler, ui.st_steps, api_visibility="private")
    ui.st_sample_event = ui.st_sample.click(
        h.sample, [ui.sid, ui.st_ckpt, ui.st_n, ui.st_sampler, ui.st_steps, ui.st_seed, ui.st_oversample, ui.st_size,
                   ui.st_outline],
        [ui.st_status, ui.st_gallery], api_name="sample_structures", concurrency_id="compute", concurrency_limit=1)
    ui.st_cancel.click(h.cancel, ui.sid, ui.st_status, api_name="cancel_structures", queue=False)
    ui.st_gallery.select(gallery_index, None, ui.st_index, api_visibility="private")
    ui.structures_pick = pick
