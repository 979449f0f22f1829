"""NuDiff Studio: the Gradio UI over the engine (one module per tab, shared server-side state)."""

from nudiff_app.ui import build_app, launch

__all__ = ["build_app", "launch"]
