"""The "Send to ..." buttons: an image and its infotext go to another tab, filling its controls."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from webui.context import AppContext
from webui.ui.extras import ExtrasTab
from webui.ui.images import NotAnImage
from webui.ui.img2img import Img2ImgTab, mask_brush
from webui.ui.paste import paste_updates
from webui.ui.pnginfo import PngInfoTab
from webui.ui.txt2img import Txt2ImgTab


def wire_send_buttons(ctx: AppContext, main_tabs: gr.Tabs, txt2img: Txt2ImgTab, img2img: Img2ImgTab,
                      pnginfo: PngInfoTab, extras: ExtrasTab) -> None:
    """Connect every Send to ... button of the gallery panels and of PNG Info."""
    to_img2img = [img2img.image, img2img.inpaint, img2img.mode, img2img.tabs, img2img.inpaint_options, main_tabs,
                  *img2img.paste.outputs]

    def send_to_img2img(text: str, image: str | NotAnImage | None, sub: str) -> dict[gr.components.Component, Any]:
        if image is None:
            raise gr.Error("No image to send: generate or drop one first.")
        if isinstance(image, NotAnImage):
            raise gr.Error(image.message)
        updates = paste_updates(ctx, text, img2img.paste) if text else {}
        editor = img2img.inpaint if sub == "inpaint" else img2img.image
        # Fresh editor value: any mask painted for a previous image does not fit the new one.
        if sub == "inpaint":
            with Image.open(image) as opened:
                brush = mask_brush(*opened.size)
            updates[editor] = gr.update(value={"background": image, "layers": [], "composite": image}, brush=brush)
        else:
            updates[editor] = gr.update(value=image)
        updates[img2img.mode] = sub
        updates[img2img.tabs] = gr.Tabs(selected=sub)
        updates[img2img.inpaint_options] = gr.update(visible=sub == "inpaint")
        updates[main_tabs] = gr.Tabs(selected="img2img")
        return updates

    for panel in (txt2img.panel, img2img.panel):
        for button, sub in ((panel.send_img2img, "img2img"), (panel.send_inpaint, "inpaint")):
            button.click(lambda s, sub=sub: send_to_img2img(s.selected_infotext, s.selected_image, sub),
                         inputs=[panel.session], outputs=to_img2img, show_progress="hidden")

    for button, sub in ((pnginfo.send_img2img, "img2img"), (pnginfo.send_inpaint, "inpaint")):
        button.click(lambda text, image, sub=sub: send_to_img2img(text, image, sub),
                     inputs=[pnginfo.infotext, pnginfo.image], outputs=to_img2img, show_progress="hidden")

    def send_to_txt2img(text: str) -> dict[gr.components.Component, Any]:
        updates = paste_updates(ctx, text, txt2img.paste)
        updates[main_tabs] = gr.Tabs(selected="txt2img")
        return updates

    pnginfo.send_txt2img.click(send_to_txt2img, inputs=[pnginfo.infotext],
                               outputs=[main_tabs, *txt2img.paste.outputs], show_progress="hidden")


    def send_to_extras(image: str | None) -> dict[gr.components.Component, Any]:
        if image is None:
            raise gr.Error("No image to send: generate or drop one first.")
        if isinstance(image, NotAnImage):
            raise gr.Error(image.message)
        # The gallery file carries the infotext, which the Extras output keeps.
        return {extras.image: gr.update(value=image), extras.source: "single",
                extras.tabs: gr.Tabs(selected="single"), main_tabs: gr.Tabs(selected="extras")}

    for panel in (txt2img.panel, img2img.panel):
        panel.send_extras.click(lambda s: send_to_extras(s.selected_image), inputs=[panel.session],
                                outputs=[extras.image, extras.source, extras.tabs, main_tabs],
                                show_progress="hidden")
