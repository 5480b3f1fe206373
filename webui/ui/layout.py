"""The whole page: top bar, then the txt2img, img2img, Extras, PNG Info and Settings tabs."""

from __future__ import annotations

import gradio as gr

from webui.context import AppContext
from webui.ui.evaluate import build_evaluate
from webui.ui.extensions_tab import build_extensions_tab
from webui.ui.extras import build_extras
from webui.ui.img2img import build_img2img
from webui.ui.jobs import Session, queue_status_html
from webui.ui.merger import build_merger
from webui.ui.pnginfo import build_pnginfo
from webui.ui.sendto import wire_send_buttons
from webui.ui.settings import build_settings
from webui.ui.tokens import TokenCounter
from webui.ui.topbar import build_topbar
from webui.ui.train import build_train
from webui.ui.txt2img import build_txt2img
from webui.ui.ui_config import UiDefaults


def build_ui(ctx: AppContext) -> gr.Blocks:
    """Build the Blocks for ``ctx``. Everything per user lives in ``gr.State``; nothing here is global."""
    defaults = UiDefaults(ctx.engine.paths.data_dir / "ui-config.json")
    counter = TokenCounter(ctx)
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as blocks:
        topbar = build_topbar(ctx)
        with gr.Tabs(elem_id="tabs") as main_tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img = build_txt2img(ctx, topbar, defaults, counter)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                img2img = build_img2img(ctx, topbar, defaults, counter)
            with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                extras = build_extras(ctx)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                pnginfo = build_pnginfo()
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                build_train(ctx)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab_evaluate"):
                build_evaluate(ctx)
            with gr.Tab("Checkpoint Merger", id="modelmerger", elem_id="tab_modelmerger"):
                build_merger(ctx, topbar)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                build_extensions_tab(ctx)
            # Last: its "Save UI defaults" button reads every control registered above.
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                build_settings(ctx, defaults, blocks)
        wire_send_buttons(ctx, main_tabs, txt2img, img2img, pnginfo, extras)
        _wire_queue_status(ctx, topbar.queue_status, [txt2img.panel.session, img2img.panel.session])
    return blocks


def _wire_queue_status(ctx: AppContext, status: gr.HTML, sessions: list[gr.State]) -> None:
    """Refresh the line about other users' and API jobs every second; nothing is sent when it is unchanged."""
    timer = gr.Timer(1.0)

    def refresh(shown: str, *own: Session):
        text = queue_status_html(ctx, own)
        return gr.skip() if text == (shown or "") else text

    timer.tick(refresh, inputs=[status, *sessions], outputs=[status], show_progress="hidden", queue=False,
               api_visibility="private")
