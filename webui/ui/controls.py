"""The sampling controls shared by txt2img and img2img; ranges and tooltips come from the request model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from pipelines.request import GenerationRequest
from pipelines.sampling.samplers import SAMPLERS, find_sampler
from webui.context import AppContext
from webui.ui import fields as f
from webui.ui.ui_config import UiDefaults

#: Sizes beyond this work (the request allows up to 4096) but make the sliders hard to use.
SLIDER_MAX_SIZE = 2048


@dataclass
class GenerationControls:
    """Controls by request field name (``steps``, ``sampler_name``...), plus the helper buttons."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    swap: gr.Button | None = None
    random_seed: gr.Button | None = None
    reuse_seed: gr.Button | None = None
    random_subseed: gr.Button | None = None
    reuse_subseed: gr.Button | None = None

    def values(self, components: list[gr.components.Component], values: list[Any]) -> dict[str, Any]:
        """Request fields from the values of ``components`` (as Gradio passes them) for our fields."""
        names = {id(c): name for name, c in self.fields.items()}
        return {names[id(c)]: v for c, v in zip(components, values) if id(c) in names}


def schedule_choices(sampler_name: str) -> list[str]:
    """Schedule types the sampler can run (the dropdown follows the sampler)."""
    try:
        return list(find_sampler(sampler_name).schedule_types)
    except ValueError:
        return ["Automatic"]


def build_sampling_controls(ctx: AppContext, tab: str, defaults: UiDefaults,
                            model: type[GenerationRequest] = GenerationRequest) -> GenerationControls:
    """Sampling method, schedule, steps, size, batch, CFG, seed (with Extra), tiling and the Script dropdown."""
    controls = GenerationControls()
    reg = controls.fields

    def keep(name: str, label: str, component: gr.components.Component) -> gr.components.Component:
        reg[name] = defaults.register(f"{tab}/{label}/value", component)
        return component

    def start(label: str, fallback: Any) -> Any:
        return defaults.value(f"{tab}/{label}/value", fallback)

    sampler = start("Sampling method", ctx.options.default_sampler)
    with gr.Row():
        # Evaluated at every page load: a new default sampler (a setting) shows without a restart.
        keep("sampler_name", "Sampling method", gr.Dropdown(
            list(SAMPLERS), value=lambda: start("Sampling method", ctx.options.default_sampler),
            label="Sampling method", elem_id=f"{tab}_sampling", info=None))
        keep("scheduler", "Schedule type", gr.Dropdown(
            schedule_choices(sampler), value=start("Schedule type", "Automatic"), label="Schedule type",
            elem_id=f"{tab}_scheduler"))
    keep("steps", "Sampling steps", f.slider(model, "steps", "Sampling steps", value=start("Sampling steps", None),
                                             elem_id=f"{tab}_steps"))
    with gr.Row():
        with gr.Column(scale=4):
            keep("width", "Width", f.slider(model, "width", "Width", step=8, maximum=SLIDER_MAX_SIZE,
                                            value=start("Width", None), elem_id=f"{tab}_width"))
            keep("height", "Height", f.slider(model, "height", "Height", step=8, maximum=SLIDER_MAX_SIZE,
                                              value=start("Height", None), elem_id=f"{tab}_height"))
        controls.swap = gr.Button("⇅", elem_id=f"{tab}_res_switch_btn", size="sm", min_width=40, scale=0,
                                  elem_classes="sdui-tool")
        with gr.Column(scale=2):
            keep("n_iter", "Batch count", f.slider(model, "n_iter", "Batch count", maximum=16,
                                                   value=start("Batch count", None), elem_id=f"{tab}_batch_count"))
            keep("batch_size", "Batch size", f.slider(model, "batch_size", "Batch size", maximum=8,
                                                      value=start("Batch size", None), elem_id=f"{tab}_batch_size"))
    keep("cfg_scale", "CFG Scale", f.slider(model, "cfg_scale", "CFG Scale", step=0.5,
                                            value=start("CFG Scale", None), elem_id=f"{tab}_cfg_scale"))
    # Forge's control for Flux.1 dev; shown while the top bar's checkpoint is of a family that uses it.
    keep("distilled_cfg_scale", "Distilled CFG Scale", f.slider(
        model, "distilled_cfg_scale", "Distilled CFG Scale", step=0.1, value=start("Distilled CFG Scale", None),
        elem_id=f"{tab}_distilled_cfg_scale", visible=False))
    # Forge's Shift of the flow-matching families (0: the model's own); shown while the checkpoint is one of them.
    keep("shift", "Shift", f.slider(model, "shift", "Shift", step=0.05, maximum=10.0, value=start("Shift", 0.0),
                                    elem_id=f"{tab}_shift", visible=False))
    with gr.Row():
        keep("seed", "Seed", f.number(model, "seed", "Seed", value=start("Seed", None), elem_id=f"{tab}_seed",
                                      scale=6))
        controls.random_seed = gr.Button("🎲", elem_id=f"{tab}_random_seed", size="sm", min_width=40, scale=0,
                                         elem_classes="sdui-tool")
        controls.reuse_seed = gr.Button("♻️", elem_id=f"{tab}_reuse_seed", size="sm", min_width=40, scale=0,
                                        elem_classes="sdui-tool")
    with gr.Accordion("Extra", open=False, elem_id=f"{tab}_subseed_show"):
        with gr.Row():
            keep("subseed", "Variation seed", f.number(model, "subseed", "Variation seed", elem_id=f"{tab}_subseed",
                                                       scale=6))
            controls.random_subseed = gr.Button("🎲", elem_id=f"{tab}_random_subseed", size="sm", min_width=40,
                                                scale=0, elem_classes="sdui-tool")
            controls.reuse_subseed = gr.Button("♻️", elem_id=f"{tab}_reuse_subseed", size="sm", min_width=40,
                                               scale=0, elem_classes="sdui-tool")
        keep("subseed_strength", "Variation strength", f.slider(
            model, "subseed_strength", "Variation strength", step=0.01, elem_id=f"{tab}_subseed_strength"))
        with gr.Row():
            keep("seed_resize_from_w", "Resize seed from width", f.slider(
                model, "seed_resize_from_w", "Resize seed from width", step=8, maximum=SLIDER_MAX_SIZE,
                elem_id=f"{tab}_seed_resize_from_w"))
            keep("seed_resize_from_h", "Resize seed from height", f.slider(
                model, "seed_resize_from_h", "Resize seed from height", step=8, maximum=SLIDER_MAX_SIZE,
                elem_id=f"{tab}_seed_resize_from_h"))
    keep("tiling", "Tiling", f.checkbox(model, "tiling", "Tiling", value=start("Tiling", None),
                                        elem_id=f"{tab}_tiling"))
    _wire(controls)
    return controls


def _wire(controls: GenerationControls) -> None:
    reg = controls.fields
    reg["sampler_name"].change(
        lambda name, current: gr.update(choices=schedule_choices(name),
                                        value=current if current in schedule_choices(name) else "Automatic"),
        inputs=[reg["sampler_name"], reg["scheduler"]], outputs=[reg["scheduler"]], show_progress="hidden",
        queue=False)
    controls.swap.click(lambda w, h: (h, w), inputs=[reg["width"], reg["height"]],
                        outputs=[reg["width"], reg["height"]], show_progress="hidden", queue=False)
    controls.random_seed.click(lambda: -1, outputs=[reg["seed"]], show_progress="hidden", queue=False)
    controls.random_subseed.click(lambda: -1, outputs=[reg["subseed"]], show_progress="hidden", queue=False)
