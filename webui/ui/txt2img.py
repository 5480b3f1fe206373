"""The txt2img tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from pipelines.request import (
    SAME_CHECKPOINT,
    SAME_SAMPLER,
    SAME_SCHEDULER,
    GenerationRequest,
)
from pipelines.sampling.samplers import SAMPLERS, SCHEDULE_NAMES
from webui.context import AppContext
from webui.extension_api import TabUi
from webui.ui import fields as f
from webui.ui.controls import SLIDER_MAX_SIZE, GenerationControls, build_sampling_controls
from webui.ui.extension_ui import ExtensionControls, build_extension_controls, build_prompt_panels
from webui.ui.generation import wire_generation
from webui.ui.output import OutputPanel, build_output_panel
from webui.ui.paste import PasteTarget
from webui.ui.prompts import PromptArea, build_prompt_area
from webui.ui.refiner import build_refiner_controls
from webui.ui.tokens import TokenCounter
from webui.ui.topbar import TopBar
from webui.ui.ui_config import UiDefaults


@dataclass
class Txt2ImgTab:
    area: PromptArea
    controls: GenerationControls
    panel: OutputPanel
    paste: PasteTarget
    extensions: ExtensionControls


#: The one-click final size: the seeds' workflow ends at 2048x2048.
FINAL_SIZE = 2048


def hires_checkpoints(ctx: AppContext) -> list[str]:
    return [SAME_CHECKPOINT, *(m.title for m in ctx.engine.registry.checkpoints)]


def build_hires_controls(ctx: AppContext, controls: GenerationControls, topbar: TopBar) -> None:
    """The Hires. fix accordion; its controls join the tab's request fields under their engine names."""
    model, reg = GenerationRequest, controls.fields
    upscalers = ctx.engine.hires_upscaler_names()
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
        reg["enable_hr"] = f.checkbox(model, "enable_hr", "Hires. fix", elem_id="txt2img_enable_hr")
        with gr.Row():
            reg["hr_upscaler"] = gr.Dropdown(upscalers, value=f.default(model, "hr_upscaler"), label="Upscaler",
                                             elem_id="txt2img_hr_upscaler")
            reg["hr_second_pass_steps"] = f.slider(model, "hr_second_pass_steps", "Hires steps",
                                                   elem_id="txt2img_hires_steps")
            reg["denoising_strength"] = f.slider(model, "denoising_strength", "Denoising strength", step=0.01,
                                                 elem_id="txt2img_denoising_strength")
        with gr.Row():
            reg["hr_scale"] = f.slider(model, "hr_scale", "Upscale by", step=0.05, maximum=4,
                                       elem_id="txt2img_hr_scale")
            reg["hr_resize_x"] = f.slider(model, "hr_resize_x", "Resize width to", step=8, maximum=SLIDER_MAX_SIZE * 2,
                                          elem_id="txt2img_hr_resize_x")
            reg["hr_resize_y"] = f.slider(model, "hr_resize_y", "Resize height to", step=8,
                                          maximum=SLIDER_MAX_SIZE * 2, elem_id="txt2img_hr_resize_y")
        with gr.Row():
            checkpoints = hires_checkpoints(ctx)
            reg["hr_checkpoint_name"] = gr.Dropdown(checkpoints, value=SAME_CHECKPOINT, label="Hires checkpoint",
                                                    info=f.description(model, "hr_checkpoint_name"),
                                                    elem_id="txt2img_hr_checkpoint", min_width=240)
            reg["hr_sampler_name"] = gr.Dropdown([SAME_SAMPLER, *SAMPLERS], value=SAME_SAMPLER,
                                                 label="Hires sampling method", elem_id="txt2img_hr_sampler",
                                                 min_width=200)
            reg["hr_scheduler"] = gr.Dropdown([SAME_SCHEDULER, *SCHEDULE_NAMES], value=SAME_SCHEDULER,
                                              label="Hires schedule type", elem_id="txt2img_hr_scheduler",
                                              min_width=200)
        reg["hr_prompt"] = gr.Textbox("", label="Hires prompt", lines=2, placeholder="Empty: the same prompt",
                                      elem_id="txt2img_hr_prompt")
        reg["hr_negative_prompt"] = gr.Textbox("", label="Hires negative prompt", lines=2,
                                               placeholder="Empty: the same negative prompt",
                                               elem_id="txt2img_hr_negative_prompt")
        preset = gr.Button(f"Then upscale to {FINAL_SIZE}x{FINAL_SIZE} (no redraw)", size="sm",
                           elem_id="txt2img_hr_final_preset")
        gr.Markdown("Sets Hires. fix to run an image upscaler to an exact final size at denoising 0: the "
                    "upscaler's pixels are the result and the infotext records the whole chain.")

    def final_size_preset(current: str) -> tuple:
        models = [u.name for u in ctx.engine.upscalers.upscalers if u.is_model]
        upscaler = current if current in models else (models[0] if models else "Lanczos")
        return True, upscaler, 0.0, FINAL_SIZE, FINAL_SIZE

    preset.click(final_size_preset, inputs=[reg["hr_upscaler"]],
                 outputs=[reg["enable_hr"], reg["hr_upscaler"], reg["denoising_strength"], reg["hr_resize_x"],
                          reg["hr_resize_y"]], show_progress="hidden", queue=False)

    def refresh_lists(checkpoint: str | None, upscaler: str | None):  # after the top bar rescanned the folders
        checkpoints = hires_checkpoints(ctx)
        upscalers = ctx.engine.hires_upscaler_names()
        return (gr.update(choices=checkpoints, value=checkpoint if checkpoint in checkpoints else SAME_CHECKPOINT),
                gr.update(choices=upscalers, value=upscaler if upscaler in upscalers else upscalers[0]))

    for event in topbar.list_changed:
        event.then(refresh_lists, inputs=[reg["hr_checkpoint_name"], reg["hr_upscaler"]],
                   outputs=[reg["hr_checkpoint_name"], reg["hr_upscaler"]], show_progress="hidden", queue=False)


def build_txt2img(ctx: AppContext, topbar: TopBar, defaults: UiDefaults, counter: TokenCounter) -> Txt2ImgTab:
    """Prompts on top; sampling controls left, output right."""
    area = build_prompt_area(ctx, "txt2img", defaults, counter)
    tab_ui = TabUi("txt2img", area.prompt, area.negative_prompt)
    build_prompt_panels(ctx, tab_ui)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, elem_id="txt2img_settings"):
            controls = build_sampling_controls(ctx, "txt2img", defaults)
            build_hires_controls(ctx, controls, topbar)
            build_refiner_controls(ctx, "txt2img", controls, topbar)
            extensions = build_extension_controls(ctx, tab_ui)
        with gr.Column(scale=1, elem_id="txt2img_results"):
            panel = build_output_panel(ctx, "txt2img")

    def build_request(common: dict[str, Any], extra: list[Any]) -> GenerationRequest:
        alwayson, script_name, script_args = extensions.request_fields(extra)
        return GenerationRequest(**common, alwayson_scripts=alwayson, script_name=script_name,
                                 script_args=script_args)

    wire_generation(ctx, topbar, area, controls, panel, build_request, extensions.inputs)
    paste = PasteTarget.of(topbar, area, controls, extensions=extensions)
    return Txt2ImgTab(area, controls, panel, paste, extensions)
