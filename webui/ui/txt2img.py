"""The txt2img tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from pipelines.request import GenerationRequest
from webui.context import AppContext
from webui.ui.controls import GenerationControls, build_sampling_controls
from webui.ui.generation import wire_generation
from webui.ui.output import OutputPanel, build_output_panel
from webui.ui.paste import PasteTarget
from webui.ui.prompts import PromptArea, build_prompt_area
from webui.ui.tokens import TokenCounter
from webui.ui.topbar import TopBar
from webui.ui.ui_config import UiDefaults


@dataclass
class Txt2ImgTab:
    area: PromptArea
    controls: GenerationControls
    panel: OutputPanel
    paste: PasteTarget


def build_txt2img(ctx: AppContext, topbar: TopBar, defaults: UiDefaults, counter: TokenCounter) -> Txt2ImgTab:
    """Prompts on top; sampling controls left, output right."""
    area = build_prompt_area(ctx, "txt2img", defaults, counter)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, elem_id="txt2img_settings"):
            controls = build_sampling_controls(ctx, "txt2img", defaults)
        with gr.Column(scale=1, elem_id="txt2img_results"):
            panel = build_output_panel(ctx, "txt2img")

    def build_request(common: dict[str, Any], _extra: list[Any]) -> GenerationRequest:
        return GenerationRequest(**common)

    wire_generation(ctx, topbar, area, controls, panel, build_request)
    return Txt2ImgTab(area, controls, panel, PasteTarget.of(topbar, area, controls))
