"""The prompt area of a generation tab: prompts with token counters, styles, and Generate / Interrupt / Skip."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipelines.prompts.styles import Style
from pipelines.request import GenerationRequest
from webui.context import AppContext
from webui.ui.fields import description
from webui.ui.tokens import TokenCounter
from webui.ui.ui_config import UiDefaults

#: The negative prompt box's placeholder (a model family may show a note there instead).
NEGATIVE_PLACEHOLDER = "Negative prompt (press Ctrl+Enter to generate)"


@dataclass
class PromptArea:
    """The controls of the prompt area."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    prompt_tokens: gr.HTML
    negative_tokens: gr.HTML
    styles: gr.Dropdown
    apply_styles: gr.Button
    style_name: gr.Textbox
    save_style: gr.Button
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button
    #: The red line right under Generate when a request is refused.
    error: gr.HTML


def build_prompt_area(ctx: AppContext, tab: str, defaults: UiDefaults, counter: TokenCounter) -> PromptArea:
    """Prompt and negative prompt on the left, Generate and styles on the right, as A1111 lays them out."""
    with gr.Row(elem_id=f"{tab}_toprow"):
        with gr.Column(scale=6):
            with gr.Row():
                prompt = defaults.register(f"{tab}/Prompt/value", gr.Textbox(
                    label="Prompt", lines=3, max_lines=12, elem_id=f"{tab}_prompt", scale=8,
                    value=defaults.value(f"{tab}/Prompt/value", ""),
                    placeholder="Prompt (press Ctrl+Enter to generate)", info=None,
                    elem_classes="sdui-prompt"))
                prompt_tokens = gr.HTML(counter.html(""), elem_id=f"{tab}_token_counter",
                                        elem_classes="sdui-token-box", min_width=60, scale=0)
            with gr.Row():
                negative = defaults.register(f"{tab}/Negative prompt/value", gr.Textbox(
                    label="Negative prompt", lines=2, max_lines=12, elem_id=f"{tab}_neg_prompt", scale=8,
                    value=defaults.value(f"{tab}/Negative prompt/value", ""),
                    placeholder=NEGATIVE_PLACEHOLDER, elem_classes="sdui-prompt"))
                negative_tokens = gr.HTML(counter.html(""), elem_id=f"{tab}_negative_token_counter",
                                          elem_classes="sdui-token-box", min_width=60, scale=0)
        with gr.Column(scale=2, min_width=240):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate",
                                 elem_classes="sdui-generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", visible=False, elem_id=f"{tab}_interrupt", variant="stop")
                skip = gr.Button("Skip", visible=False, elem_id=f"{tab}_skip")
            error = gr.HTML("", elem_id=f"{tab}_error", elem_classes="sdui-generate-error")
            styles = gr.Dropdown(ctx.engine.styles.names(), multiselect=True, label="Styles",
                                 elem_id=f"{tab}_styles", info=description(GenerationRequest, "styles"))
            with gr.Row():
                apply_styles = gr.Button("Apply styles", size="sm", elem_id=f"{tab}_style_apply")
            with gr.Accordion("Save prompts as a style", open=False):
                style_name = gr.Textbox(label="Style name", elem_id=f"{tab}_style_name")
                save_style = gr.Button("Save style", size="sm", elem_id=f"{tab}_style_save")

    area = PromptArea(prompt, negative, prompt_tokens, negative_tokens, styles, apply_styles, style_name,
                      save_style, generate, interrupt, skip, error)
    _wire(ctx, area, counter)
    return area


def _wire(ctx: AppContext, area: PromptArea, counter: TokenCounter) -> None:
    for box, html in ((area.prompt, area.prompt_tokens), (area.negative_prompt, area.negative_tokens)):
        box.change(counter.html, inputs=[box], outputs=[html], trigger_mode="always_last",
                   show_progress="hidden", queue=False)

    def apply_styles(prompt: str, negative: str, names: list[str]):
        try:
            prompt, negative = ctx.engine.styles.apply(prompt, negative, names or [])
        except KeyError as error:
            raise gr.Error(str(error)) from error
        # As A1111 does: the style text now lives in the prompt, so the selection is cleared.
        return prompt, negative, gr.update(value=[])

    area.apply_styles.click(apply_styles, inputs=[area.prompt, area.negative_prompt, area.styles],
                            outputs=[area.prompt, area.negative_prompt, area.styles])

    def save_style(name: str, prompt: str, negative: str):
        try:
            ctx.engine.styles.save(Style(name.strip(), prompt, negative))
        except ValueError as error:
            raise gr.Error(str(error)) from error
        gr.Info(f"Saved style {name.strip()!r}")
        return gr.update(choices=ctx.engine.styles.names())

    area.save_style.click(save_style, inputs=[area.style_name, area.prompt, area.negative_prompt],
                          outputs=[area.styles])
