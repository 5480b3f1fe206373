"""The PNG Info tab: drop an image, see its parameters and other metadata, send them to a tab."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import UnidentifiedImageError

from pipelines.images.saving import read_image_metadata, read_infotext
from webui.ui.images import ImageInput, NotAnImage


@dataclass
class PngInfoTab:
    image: gr.Image
    infotext: gr.State
    send_txt2img: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button


def metadata_html(path: str | NotAnImage | None) -> tuple[str, str]:
    """(infotext, HTML of every metadata field) of the image file at ``path``."""
    if not path:
        return "", ""
    if isinstance(path, NotAnImage):
        return "", f"<p class='sdui-error'>{html.escape(path.message)}</p>"
    try:
        infotext = read_infotext(path) or ""
        metadata = read_image_metadata(path)
    except (OSError, UnidentifiedImageError) as error:
        # One sentence: the error's text would name server paths.
        name = html.escape(Path(path).name)
        return "", f"<p class='sdui-error'>Cannot read the image {name!r}: {type(error).__name__}.</p>"
    parts = []
    if infotext:
        parts.append("<h4>parameters</h4><div class='sdui-infotext' id='pnginfo_parameters'>"
                     + html.escape(infotext).replace("\n", "<br>") + "</div>")
    for key, value in metadata.items():
        if key == "parameters" or value == infotext:
            continue
        parts.append(f"<h4>{html.escape(key)}</h4><p>{html.escape(value)}</p>")
    if not parts:
        parts.append("<p>This image carries no generation parameters or other text metadata.</p>")
    return infotext, "".join(parts)


def build_pnginfo() -> PngInfoTab:
    with gr.Row(equal_height=False):
        with gr.Column():
            # A file path, not a decoded image: decoding would drop the text chunks we want to read.
            image = ImageInput(label="Source", type="filepath", image_mode=None, elem_id="pnginfo_image",
                             sources=["upload", "clipboard"], height=480)
        with gr.Column():
            info = gr.HTML("", elem_id="pnginfo_html")
            infotext = gr.State("")
            with gr.Row():
                send_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_to_txt2img", size="sm")
                send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img", size="sm")
                send_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_to_inpaint", size="sm")
    image.change(metadata_html, inputs=[image], outputs=[infotext, info], show_progress="hidden")
    return PngInfoTab(image, infotext, send_txt2img, send_img2img, send_inpaint)
