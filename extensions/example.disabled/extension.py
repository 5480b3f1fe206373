"""A minimal extension: an always-on script "example" that fades each image towards grey.

It shows every part of the interface an ordinary extension needs: a script with arguments (the same list
through the UI and through the API's ``alwayson_scripts["example"]["args"]``), a UI accordion whose
controls give those arguments, an infotext key recorded on each image and read back when pasting, and
an ``after_batch`` hook that changes the images. Rename the folder to ``example`` to load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr
from PIL import Image

from webui.extension_api import AlwaysOnScript, ExtensionAPI, Job, ScriptControls, TabUi

#: The infotext key this script writes ("Example strength: 0.5") and reads back when pasting.
KEY = "Example strength"
GREY = (128, 128, 128)


class FadeToGrey(AlwaysOnScript):
    """args: [enabled: bool, strength: float in 0..1]; strength 1 gives a flat grey image."""

    name = "example"
    title = "Example: fade to grey"

    def parse_args(self, args: Sequence[Any]) -> float | None:
        if not args or not args[0]:
            return None  # off: the UI always sends the args, with enabled False unless ticked
        if len(args) != 2:
            raise ValueError(f"expected [enabled, strength], got {len(args)} values")
        strength = float(args[1])
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        return strength

    def before_job(self, job: Job) -> None:
        job.infotext[KEY] = job.args

    def after_batch(self, job: Job, images: list[Image.Image]) -> None:
        for i, image in enumerate(images):
            grey = Image.new(image.mode, image.size, GREY[:len(image.getbands())])
            images[i] = Image.blend(image, grey, job.args)


def build_ui(tab: TabUi) -> ScriptControls:
    """The accordion's content on ``tab.tab``: a checkbox and a slider, pasted back from the infotext."""
    enabled = gr.Checkbox(False, label="Enable", elem_id=f"{tab.tab}_example_enabled")
    strength = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Strength", elem_id=f"{tab.tab}_example_strength")
    # The key's presence means the script was on; its value is the strength.
    return ScriptControls(inputs=[enabled, strength], paste=[(enabled, lambda params: KEY in params),
                                                             (strength, KEY)])


def setup(api: ExtensionAPI) -> None:
    """Register the script with its UI on both tabs."""
    api.add_script(FadeToGrey(), ui=build_ui)
