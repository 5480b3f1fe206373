"""The Refiner accordion of txt2img and img2img (A1111 1.6+'s): a checkpoint ("None": no refiner) and "Switch at".

Its controls join the tab's request fields under their engine names (``refiner_checkpoint``,
``refiner_switch_at``), so Generate, paste and the API build the same request.
"""

from __future__ import annotations

import gradio as gr

from pipelines.request import GenerationRequest
from webui.context import AppContext
from webui.ui import fields as f
from webui.ui.controls import GenerationControls
from webui.ui.topbar import TopBar

#: The dropdown's "no refiner" choice (A1111 shows the same word).
NO_REFINER = "None"


def refiner_choices(ctx: AppContext) -> list[str]:
    return [NO_REFINER, *(m.title for m in ctx.engine.registry.checkpoints)]


def build_refiner_controls(ctx: AppContext, tab: str, controls: GenerationControls, topbar: TopBar) -> None:
    """The Refiner accordion, closed; its dropdown follows the top bar's rescans of the model folders."""
    model, reg = GenerationRequest, controls.fields
    with gr.Accordion("Refiner", open=False, elem_id=f"{tab}_refiner"):
        with gr.Row():
            reg["refiner_checkpoint"] = gr.Dropdown(
                refiner_choices(ctx), value=NO_REFINER, label="Checkpoint", elem_id=f"{tab}_refiner_checkpoint",
                info="The model that takes over at 'Switch at' (typically an SDXL refiner); None: no refiner.",
                min_width=240)
            reg["refiner_switch_at"] = f.slider(model, "refiner_switch_at", "Switch at", step=0.01,
                                                elem_id=f"{tab}_refiner_switch_at")

    def refresh(current: str | None):
        choices = refiner_choices(ctx)
        return gr.update(choices=choices, value=current if current in choices else NO_REFINER)

    for event in topbar.list_changed:
        event.then(refresh, inputs=[reg["refiner_checkpoint"]], outputs=[reg["refiner_checkpoint"]],
                   show_progress="hidden", queue=False)
