"""A minimal extension: an always-on script "example" that fades each image towards grey.

It shows every part of the interface an ordinary extension needs: a script with arguments (the same list
through the UI and through the API's ``alwayson_scripts["example"]["args"]``), a UI accordion whose
controls give those arguments, an infotext key recorded on each image and read back when pasting, and
an ``after_batch`` hook that changes the images. Rename the folder to ``example`` to load it.
"""

from __future__ import annotations

import gradio as gr
from PIL import Image
from pydantic import BaseModel, field_validator

from webui.extension_api import AlwaysOnScript, ExtensionAPI, Job, ScriptControls, TabUi

#: The infotext key this script writes ("Example strength: 0.5") and reads back when pasting.
KEY = "Example strength"
GREY = (128, 128, 128)


class FadeArgs(BaseModel):
    """The script's arguments, in the order of the list the UI and the API send: ``[enabled, strength]``."""

    enabled: bool = False  # off unless ticked: the UI always sends the args
    strength: float = 0.5  # 1 gives a flat grey image

    @field_validator("strength")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"must be between 0 and 1, got {value}")
        return value


class FadeToGrey(AlwaysOnScript[FadeArgs]):
    """Fades every image towards grey by ``strength``; ``job.args`` is a validated :class:`FadeArgs`."""

    name = "example"
    title = "Example: fade to grey"

    def before_job(self, job: Job[FadeArgs]) -> None:
        job.infotext[KEY] = job.args.strength

    def after_batch(self, job: Job[FadeArgs], images: list[Image.Image]) -> None:
        for i, image in enumerate(images):
            grey = Image.new(image.mode, image.size, GREY[:len(image.getbands())])
            images[i] = Image.blend(image, grey, job.args.strength)


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
