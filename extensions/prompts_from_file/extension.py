"""Built-in extension: "Prompts from file or textbox" in the Script dropdown (one job per line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from webui.extension_api import ExtensionAPI, ScriptControls, TabUi

from .lines import PromptsFromFile


def build_ui(tab_ui: TabUi) -> ScriptControls:
    """The options, the list of prompts, and a file upload that fills the list."""
    import gradio as gr  # only when the UI is built (the API runs without gradio's UI)

    tab = tab_ui.tab
    with gr.Row():
        iterate = gr.Checkbox(False, label="Iterate seed every line", elem_id=f"{tab}_prompts_from_file_iterate")
        same_seed = gr.Checkbox(False, label="Use same random seed for all lines",
                                elem_id=f"{tab}_prompts_from_file_same_seed")
        position = gr.Radio(["start", "end"], value="start", label="Insert prompts at the",
                            elem_id=f"{tab}_prompts_from_file_position")
    text = gr.Textbox(label="List of prompt inputs", lines=4, elem_id=f"{tab}_prompts_from_file_text",
                      placeholder='a photo of a cat\n--prompt "a dog" --seed 5 --steps 10')
    upload = gr.File(label="Upload prompt inputs", file_types=[".txt"], type="filepath",
                     elem_id=f"{tab}_prompts_from_file_upload")

    def load(path: Any, current: str) -> str:
        if not path:
            return current
        return Path(path).read_text(encoding="utf-8", errors="replace")

    upload.change(load, inputs=[upload, text], outputs=[text], show_progress="hidden")
    return ScriptControls(inputs=[iterate, same_seed, position, text])


def setup(api: ExtensionAPI) -> None:
    """Register the script for txt2img and img2img."""
    api.add_selectable_script(PromptsFromFile(), ui=build_ui)
