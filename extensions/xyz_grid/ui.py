"""The X/Y/Z plot's controls: three axes (type, values, a dropdown for enumerable types), the options, and a
line that tells how many images the plot makes and about how long it takes."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui.extension_api import ExtensionAPI, ScriptControls, TabUi

from .axes import AXIS_LABELS, find_axis_type
from .plot import CONFIRM_ABOVE, XyzPlot, parse_plot_args

_HELP = ("Values: a comma list (`Euler, \"DPM++ 2M\"`) or ranges `1-5`, `1-10 (+2)`, `1-10 [5]`. Prompt S/R: "
         "the first value is searched in the prompt and replaced by each value; for a LoRA weight use "
         "`<lora:name:0.5>, <lora:name:1>` with the first one written in the prompt.")


def _choices(api: ExtensionAPI, label: str) -> list[str] | None:
    axis = find_axis_type(label)
    return axis.choices(api) if axis.choices is not None else None


def summary(api: ExtensionAPI, script: XyzPlot, values: list[Any]) -> str:
    """Markdown: the number of images and a time estimate, or what is wrong with the axes."""
    try:
        args = parse_plot_args([*values[:-1], True], api)  # counted even when not yet confirmed
    except (ValueError, LookupError) as error:
        return f"⚠️ {error}"
    counts = " × ".join(str(len(axis.values)) for axis in args.axes if axis.type.label != "Nothing") or "1"
    text = f"**{args.cell_count} image(s)** ({counts}; times batch count × batch size)"
    per_image = script.throughput.per_image
    if per_image is not None:
        text += f" · about {args.cell_count * per_image:.0f} s at the speed of the last plot"
    else:
        text += " · a time estimate shows after the first plot"
    if args.cell_count > CONFIRM_ABOVE and not values[-1]:
        text += f" · more than {CONFIRM_ABOVE} images: tick *Confirm a large plot* to run it"
    return text


def build_ui(tab_ui: TabUi, api: ExtensionAPI, script: XyzPlot) -> ScriptControls:
    """Build the controls inside the group the Script dropdown shows while "X/Y/Z plot" is selected."""
    tab = tab_ui.tab
    axis_inputs: list[Any] = []
    paste = []
    for letter, default in (("x", "Seed"), ("y", "Nothing"), ("z", "Nothing")):
        with gr.Row():
            kind = gr.Dropdown(AXIS_LABELS, value=default, label=f"{letter.upper()} type", scale=1,
                               elem_id=f"{tab}_xyz_{letter}_type")
            text = gr.Textbox(label=f"{letter.upper()} values", lines=1, scale=3, visible=default != "Nothing",
                              elem_id=f"{tab}_xyz_{letter}_values")
            picked = gr.Dropdown([], value=[], multiselect=True, label=f"{letter.upper()} values", scale=3,
                                 visible=False, elem_id=f"{tab}_xyz_{letter}_values_dropdown")
        axis_inputs += [kind, text, picked]
        paste += [(kind, f"{letter.upper()} Type"), (text, f"{letter.upper()} Values")]
    with gr.Row():
        draw_legend = gr.Checkbox(True, label="Draw legend", elem_id=f"{tab}_xyz_draw_legend")
        keep_seeds = gr.Checkbox(False, label="Keep -1 for seeds", elem_id=f"{tab}_xyz_no_fixed_seeds")
        vary = [gr.Checkbox(False, label=f"Vary seeds for {letter}", elem_id=f"{tab}_xyz_vary_seeds_{letter.lower()}")
                for letter in "XYZ"]
    with gr.Row():
        include_images = gr.Checkbox(False, label="Include sub-images", elem_id=f"{tab}_xyz_include_lone_images")
        include_grids = gr.Checkbox(False, label="Include sub-grids", elem_id=f"{tab}_xyz_include_sub_grids")
        csv_mode = gr.Checkbox(False, label="Use text inputs instead of dropdowns", elem_id=f"{tab}_xyz_csv_mode")
    margin = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)", elem_id=f"{tab}_xyz_margin_size")
    confirm = gr.Checkbox(False, label=f"Confirm a large plot (more than {CONFIRM_ABOVE} images)",
                          elem_id=f"{tab}_xyz_confirm")
    gr.Markdown(_HELP)
    count = gr.Markdown("", elem_id=f"{tab}_xyz_summary")

    inputs = [*axis_inputs, draw_legend, include_images, include_grids, keep_seeds, *vary, margin, csv_mode,
              confirm]

    def show_values(label: str, csv: bool, current: list[str]):
        choices = _choices(api, label)
        dropdown = choices is not None and not csv
        kept = [value for value in (current or []) if choices and value in choices]
        return gr.update(visible=not dropdown and label != "Nothing"), gr.update(
            visible=dropdown, choices=choices or [], value=kept)

    for k in range(3):
        kind, text, picked = axis_inputs[3 * k: 3 * k + 3]
        for trigger in (kind.change, csv_mode.change):
            trigger(show_values, inputs=[kind, csv_mode, picked], outputs=[text, picked], show_progress="hidden",
                    queue=False)
    for component in inputs:
        component.change(lambda *values: summary(api, script, list(values)), inputs=inputs, outputs=[count],
                         show_progress="hidden", queue=False)

    def to_args(values: list[Any]) -> list[Any]:
        args = list(values)
        args[16] = int(args[16])  # the margin slider gives a float
        return args

    return ScriptControls(inputs=inputs, to_args=to_args, paste=paste)
