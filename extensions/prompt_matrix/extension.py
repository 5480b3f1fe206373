"""Built-in extension: the prompt matrix in the Script dropdown (``a cat|red|blue`` -> every combination)."""

from __future__ import annotations

from typing import Any

from webui.extension_api import ExtensionAPI, ScriptControls, TabUi

from .matrix import PromptMatrix


def build_ui(tab_ui: TabUi) -> ScriptControls:
    """The prompt matrix options, in A1111's order."""
    import gradio as gr  # only when the UI is built (the API runs without gradio's UI)

    tab = tab_ui.tab
    gr.Markdown("Separate the optional parts of the prompt with `|`: `a cat|red|blue` makes 4 images "
                "(a cat; a cat, red; a cat, blue; a cat, red, blue).")
    with gr.Row():
        put_at_start = gr.Checkbox(False, label="Put variable parts at start of prompt",
                                   elem_id=f"{tab}_prompt_matrix_put_at_start")
        different_seeds = gr.Checkbox(False, label="Use different seed for each picture",
                                      elem_id=f"{tab}_prompt_matrix_different_seeds")
    with gr.Row():
        prompt_type = gr.Radio(["positive", "negative"], value="positive", label="Select prompt",
                               elem_id=f"{tab}_prompt_matrix_prompt_type")
        delimiter = gr.Radio(["comma", "space"], value="comma", label="Select joining char",
                             elem_id=f"{tab}_prompt_matrix_variations_delimiter")
    margin = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)", elem_id=f"{tab}_prompt_matrix_margin_size")

    def to_args(values: list[Any]) -> list[Any]:
        return [*values[:4], int(values[4])]

    return ScriptControls(inputs=[put_at_start, different_seeds, prompt_type, delimiter, margin], to_args=to_args)


def setup(api: ExtensionAPI) -> None:
    """Register the prompt matrix for txt2img and img2img."""
    api.add_selectable_script(PromptMatrix(api), ui=build_ui)
