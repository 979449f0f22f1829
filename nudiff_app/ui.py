"""Assembles the five tabs into one gr.Blocks and wires the events that cross tabs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from nudiff_app import edit_tab, export_tab, structures_tab, synthesize_tab, train_tab
from nudiff_app.state import AppContext, ui_action

log = logging.getLogger("nudiff_app")

TABS = (("Train", "train", train_tab), ("Structures", "structures", structures_tab), ("Edit", "edit", edit_tab),
        ("Synthesize", "synthesize", synthesize_tab), ("Export", "export", export_tab))

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLE_FOLDER = ASSETS / "example"  # three procedural 256 px tiles (images/ + labels/): try Train without data
EXAMPLE_LABEL = ASSETS / "example_label.png"  # a uint16 label map: try Edit without a file of one's own
CSS = (ASSETS / "studio.css").read_text(encoding="utf-8")
LOGO = (ASSETS / "logo.svg").read_text(encoding="utf-8")


def default_work_dir() -> Path:
    return Path(os.environ.get("NUDIFF_WORK_DIR", Path.home() / ".nudiff-studio"))


def build_app(work_dir: str | os.PathLike | None = None, *, structure_checkpoint: str | os.PathLike | None = None,
              image_checkpoint: str | os.PathLike | None = None, max_memory_gb: float | None = None,
              precision: str = "auto") -> gr.Blocks:
    """The NuDiff Studio UI. Checkpoints default to engine.demo.default_checkpoints(); max_memory_gb: the memory
    budget of one sampling job (default engine.memory.default_budget_gb()); precision: "auto" (bf16 autocast
    where it is fast) or "fp32", as the CLI's --precision."""
    ctx = AppContext(work_dir or default_work_dir(), structure_checkpoint, image_checkpoint, max_memory_gb, precision)
    ui = SimpleNamespace()
    with gr.Blocks(title="NuDiff Studio", analytics_enabled=False) as demo:
        demo.nudiff = ctx  # for launch() and tests
        ui.sid = gr.State(None)
        ui.browser_sid = gr.BrowserState(None, storage_key="nudiff_session", secret=ctx.secret())
        gr.HTML(f'<div id="studio-header">{LOGO}<h2>NuDiff Studio · synthetic labeled nuclei for segmentation '
                f'training</h2></div>')
        with gr.Row(equal_height=True):
            gr.Markdown("No data at hand? Try the studio on a small procedural example:", elem_id="examples-hint")
            ui.example_folder = gr.Button("Train: use the example folder", size="sm", variant="secondary",
                                          elem_id="example-folder")
            ui.example_label = gr.Button("Edit: load the example label map", size="sm", variant="secondary",
                                         elem_id="example-label")
        with gr.Tabs(selected="structures", elem_id="tabs") as ui.tabs:
            for title, tab_id, module in TABS:
                with gr.Tab(title, id=tab_id, elem_id=f"tab-{tab_id}"):
                    module.build(ctx, ui)
        for _, _, module in TABS:
            module.wire(ctx, ui)
        _wire_cross_tab(ctx, ui, demo)
    return demo


def _wire_cross_tab(ctx: AppContext, ui, demo: gr.Blocks) -> None:
    edit_out, synth_out, export_out = ui.edit_outputs, ui.synth_outputs, ui.export_outputs

    def _send(target):
        @ui_action(2 + len(edit_out) + len(synth_out))
        def send(sid, index, request: gr.Request):
            sess = ctx.session(sid, request)
            i = ui.structures_pick(sess, index)
            msg = f"Structure #{i} sent to {'Edit' if target == 'edit' else 'Synthesize'}."
            return (msg, *ui.edit_view(sess), *ui.synth_view(sess), gr.Tabs(selected=target))
        return send

    outs = [ui.st_status, *edit_out, *synth_out, ui.tabs]
    ui.st_to_edit.click(_send("edit"), [ui.sid, ui.st_index], outs, api_name="send_to_edit")
    ui.st_to_synth.click(_send("synthesize"), [ui.sid, ui.st_index], outs, api_name="send_to_synthesize")

    @ui_action(2 + len(edit_out) + len(synth_out))
    def edit_to_synth(sid, editor, touch, min_px, request: gr.Request):
        sess = ctx.session(sid, request)
        if sess.current is None:
            from engine.errors import NuDiffError

            raise NuDiffError("no structure yet: sample one, upload a label map, or start from a blank tile")
        applied = ui.edit_apply_layers(sess, editor, touch, min_px)
        msg = "Pending strokes applied; structure sent to Synthesize." if applied is not None else \
            "Structure sent to Synthesize."
        return (msg, *ui.edit_view(sess), *ui.synth_view(sess), gr.Tabs(selected="synthesize"))

    def example_folder():
        return str(EXAMPLE_FOLDER), gr.Tabs(selected="train")

    ui.example_folder.click(example_folder, None, [ui.train_folder, ui.tabs], api_name="example_folder")

    @ui_action(2 + len(edit_out))
    def example_label(sid, request: gr.Request):
        from nudiff_app.edit_tab import upload_label

        return (*upload_label(ctx.session(sid, request), str(EXAMPLE_LABEL)), gr.Tabs(selected="edit"))

    ui.example_label.click(example_label, ui.sid, [ui.ed_status, *edit_out, ui.tabs], api_name="edit_example_label")

    ui.ed_to_synth.click(edit_to_synth, [ui.sid, ui.ed_editor, ui.ed_touch, ui.ed_min],
                         [ui.ed_status, *edit_out, *synth_out, ui.tabs], api_name="edit_to_synthesize")

    def _adder(all_results):
        @ui_action(1 + len(export_out))
        def add(sid, index, opacity, request: gr.Request):
            sess = ctx.session(sid, request)
            idx = list(range(len(sess.results))) if all_results else [int(index or 0)]
            msg = ui.synth_add(sess, idx)
            sess.selected_pair = len(sess.basket.items) - len(idx)
            return (msg, *ui.export_view(sess, opacity))
        return add

    add_outs = [ui.sy_status, *export_out]
    ui.sy_add.click(_adder(False), [ui.sid, ui.sy_index, ui.ex_opacity], add_outs, api_name="add_to_basket")
    ui.sy_add_all.click(_adder(True), [ui.sid, ui.sy_index, ui.ex_opacity], add_outs,
                        api_name="add_all_to_basket")

    def restore(browser_sid, opacity, request: gr.Request):
        """On page load: reuse the browser's session id (a reload finds its work again) or make one."""
        try:
            sid = browser_sid if isinstance(browser_sid, str) and len(browser_sid) >= 16 else ctx.new_sid()
            sess = ctx.session(sid, request)
            from nudiff_app.synthesize_tab import result_gallery

            gallery = [(structures_tab.structure_thumb(s.inst, s.structure),
                        f"#{i} · seed {s.seed} · {s.n_nuclei} nuclei") for i, s in enumerate(sess.samples)]
            return (sid, sid, *ui.edit_view(sess), *ui.synth_view(sess), *ui.export_view(sess, opacity),
                    gallery, result_gallery(sess))
        except Exception:  # noqa: BLE001 - the page must load whatever happened
            log.exception("could not restore the session")
            return (gr.skip(),) * (2 + len(edit_out) + len(synth_out) + len(export_out) + 2)

    demo.load(restore, [ui.browser_sid, ui.ex_opacity],
              [ui.sid, ui.browser_sid, *edit_out, *synth_out, *export_out, ui.st_gallery, ui.sy_gallery],
              api_visibility="private")
    demo.load(ui.train_poll, None, ui.train_poll_outputs, api_visibility="private")
    demo.load(ui.train_restore, None, ui.train_restore_outputs, api_visibility="private")

    def refresh_models(s_value, i_value):
        """Models finished since the page was built appear after a reload."""
        out = []
        for kind, value in (("structure", s_value), ("image", i_value)):
            choices = ctx.list_checkpoints(kind)
            out.append(gr.update(choices=choices, value=value or (choices[0][1] if choices else None)))
        return tuple(out)

    demo.load(refresh_models, [ui.st_ckpt, ui.sy_ckpt], [ui.st_ckpt, ui.sy_ckpt], api_visibility="private")
    demo.load(ui.w_advice, ui.sy_ckpt, [ui.sy_wrec, ui.sy_use_w, ui.sy_w], api_visibility="private")
    demo.load(ui.colour_option, ui.sy_ckpt, ui.sy_colour, api_visibility="private")


# the queue looks for new events this often when idle (Gradio's default: every 1 ms), and for progress to send
# (default: every 10 ms); NUDIFF_IDLE_POLL_S=0.001 restores Gradio's (bench/idle_cost.py compares both)
IDLE_POLL_S = float(os.environ.get("NUDIFF_IDLE_POLL_S", "0.05"))
PROGRESS_POLL_S = max(0.01, 2 * IDLE_POLL_S)


def _quiet_idle_queue(demo: gr.Blocks) -> None:
    """Make an idle studio cost next to nothing: Gradio's queue polls for work every millisecond, which
    burned about 0.4 s of CPU per 10 s with nobody connected (docs/benchmarks.md §11). Its poll intervals
    are plain attributes of the queue (gradio/queueing.py); 50 ms adds at most that to a click's start."""
    q = getattr(demo, "_queue", None)
    if q is not None and hasattr(q, "sleep_when_free"):
        q.sleep_when_free = IDLE_POLL_S
        q.progress_update_sleep_when_free = PROGRESS_POLL_S
    else:
        log.warning("Gradio's queue has no sleep_when_free: the idle poll interval is left at its default")


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False, quiet: bool = False):
    """Launch with the app's settings: only the export folder is served besides Gradio's own cache."""
    ctx: AppContext = demo.nudiff
    demo.queue(default_concurrency_limit=1)
    _quiet_idle_queue(demo)
    return demo.launch(server_name=host, server_port=port, share=share, auth=auth,
                       allowed_paths=[str(ctx.exports_dir)], max_file_size="1gb", run_history=False,
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=False,
                       theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, footer_links=["api"])
