"""Built-in extension: the X/Y/Z plot in the Script dropdown (compare checkpoints, samplers, settings)."""

from __future__ import annotations

from webui.extension_api import ExtensionAPI, TabUi

from .plot import XyzPlot


def setup(api: ExtensionAPI) -> None:
    """Register the X/Y/Z plot for txt2img and img2img."""
    script = XyzPlot(api)

    def build(tab_ui: TabUi):
        from .ui import build_ui  # gradio is imported only when the UI is built (the API runs without it)

        return build_ui(tab_ui, api, script)

    api.add_selectable_script(script, ui=build)
