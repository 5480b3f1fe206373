"""The whole page: top bar, then the txt2img, img2img, Extras, PNG Info and Settings tabs."""

from __future__ import annotations

import gradio as gr

from webui.context import AppContext
from webui.ui.extras import build_extras
from webui.ui.img2img import build_img2img
from webui.ui.pnginfo import build_pnginfo
from webui.ui.sendto import wire_send_buttons
from webui.ui.settings import build_settings
from webui.ui.tokens import TokenCounter
from webui.ui.topbar import build_topbar
from webui.ui.txt2img import build_txt2img
from webui.ui.ui_config import UiDefaults


def build_ui(ctx: AppContext) -> gr.Blocks:
    """Build the Blocks for ``ctx``. Everything per user lives in ``gr.State``; nothing here is global."""
    defaults = UiDefaults(ctx.engine.paths.data_dir / "ui-config.json")
    counter = TokenCounter(ctx)
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as blocks:
        topbar = build_topbar(ctx, defaults)
        with gr.Tabs(elem_id="tabs") as main_tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img = build_txt2img(ctx, topbar, defaults, counter)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                img2img = build_img2img(ctx, topbar, defaults, counter)
            with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                extras = build_extras(ctx)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                pnginfo = build_pnginfo()
            # Last: its "Save UI defaults" button reads every control registered above.
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                build_settings(ctx, defaults)
        wire_send_buttons(ctx, main_tabs, txt2img, img2img, pnginfo, extras)
    return blocks
