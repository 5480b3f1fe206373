"""The img2img tab with its sub-tabs: img2img, Sketch, Inpaint (mask drawn in the browser), Inpaint upload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.request import INPAINTING_FILL, RESIZE_MODES, Img2ImgRequest
from webui.context import AppContext
from webui.extension_api import TabUi
from webui.ui import fields as f
from webui.ui.controls import GenerationControls, build_sampling_controls
from webui.ui.extension_ui import ExtensionControls, build_extension_controls, build_prompt_panels
from webui.ui.generation import wire_generation
from webui.ui.images import ImageInput, check_image
from webui.ui.output import OutputPanel, build_output_panel
from webui.ui.paste import PasteTarget
from webui.ui.prompts import PromptArea, build_prompt_area
from webui.ui.refiner import build_refiner_controls
from webui.ui.tokens import TokenCounter
from webui.ui.topbar import TopBar
from webui.ui.ui_config import UiDefaults

MODES = ("img2img", "sketch", "inpaint", "inpaint_upload")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")


@dataclass
class Img2ImgTab:
    area: PromptArea
    controls: GenerationControls
    panel: OutputPanel
    paste: PasteTarget
    mode: gr.State
    tabs: gr.Tabs
    image: gr.Image
    sketch: gr.ImageEditor
    inpaint: gr.ImageEditor
    inpaint_base: gr.Image
    inpaint_mask: gr.Image
    inpaint_options: gr.Group
    extensions: ExtensionControls


def mask_brush(width: int, height: int) -> gr.Brush:
    """The inpaint brush for an image of this size: a radius of 1/16 of its shorter side (at least 2 px),
    so a mask is painted in a few strokes whatever the image's size."""
    return gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=max(2, min(width, height) // 16))


def mask_from_layers(editor: dict | None) -> Image.Image | None:
    """A black/white mask (white = redraw) from what was painted on the editor's layers, or None."""
    layers = [layer for layer in (editor or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    alpha = np.zeros(np.asarray(layers[0].convert("RGBA")).shape[:2], dtype=bool)
    for layer in layers:
        alpha |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    if not alpha.any():
        return None
    return Image.fromarray(alpha.astype(np.uint8) * 255, mode="L")


def source_images(mode: str, image, sketch, inpaint, base, mask) -> tuple[Image.Image, Image.Image | None]:
    """The init image and mask of the active sub-tab; ValueError says what is missing (or not an image)."""
    image, base, mask = check_image(image), check_image(base), check_image(mask)
    if mode == "sketch":
        if not sketch or sketch.get("composite") is None:
            raise ValueError("init_images: draw or upload an image in the Sketch tab first")
        return sketch["composite"].convert("RGB"), None
    if mode == "inpaint":
        if not inpaint or inpaint.get("background") is None:
            raise ValueError("init_images: upload an image in the Inpaint tab first")
        drawn = mask_from_layers(inpaint)
        if drawn is None:
            raise ValueError("mask: paint over the part of the image to redraw")
        return inpaint["background"].convert("RGB"), drawn
    if mode == "inpaint_upload":
        if base is None or mask is None:
            raise ValueError("init_images/mask: upload both the image and the mask in the Inpaint upload tab")
        return base.convert("RGB"), mask.convert("L")
    if image is None:
        raise ValueError("init_images: upload an image in the img2img tab first")
    return image.convert("RGB"), None


def build_img2img(ctx: AppContext, topbar: TopBar, defaults: UiDefaults, counter: TokenCounter) -> Img2ImgTab:
    area = build_prompt_area(ctx, "img2img", defaults, counter)
    tab_ui = TabUi("img2img", area.prompt, area.negative_prompt)
    build_prompt_panels(ctx, tab_ui)
    mode = gr.State("img2img")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, elem_id="img2img_settings"):
            with gr.Tabs(elem_id="mode_img2img") as tabs:
                with gr.Tab("img2img", id="img2img", elem_id="img2img_img2img_tab") as tab_img2img:
                    image = ImageInput(label="Image for img2img", type="pil", elem_id="img2img_image",
                                     sources=["upload", "clipboard"], height=400, image_mode="RGBA")
                with gr.Tab("Sketch", id="sketch", elem_id="img2img_img2img_sketch_tab") as tab_sketch:
                    sketch = gr.ImageEditor(label="Sketch", type="pil", elem_id="img2img_sketch", height=400,
                                            sources=["upload", "clipboard"],
                                            brush=gr.Brush(color_mode="defaults"), format="png")
                with gr.Tab("Inpaint", id="inpaint", elem_id="img2img_inpaint_tab") as tab_inpaint:
                    inpaint = gr.ImageEditor(label="Image for inpainting with mask", type="pil",
                                             elem_id="img2maskimg", height=400, sources=["upload", "clipboard"],
                                             brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                             format="png", transforms=())
                with gr.Tab("Inpaint upload", id="inpaint_upload", elem_id="img2img_inpaint_upload_tab") as tab_up:
                    with gr.Row():
                        inpaint_base = ImageInput(label="Image", type="pil", elem_id="img_inpaint_base", height=300)
                        inpaint_mask = ImageInput(label="Mask", type="pil", elem_id="img_inpaint_mask", height=300,
                                                image_mode="L")
            resize_mode = gr.Radio(list(RESIZE_MODES.values()), value=RESIZE_MODES[0], label="Resize mode",
                                   type="index", elem_id="resize_mode",
                                   info=f.description(Img2ImgRequest, "resize_mode"))
            controls = build_sampling_controls(ctx, "img2img", defaults, Img2ImgRequest)
            denoising = defaults.register("img2img/Denoising strength/value", f.slider(
                Img2ImgRequest, "denoising_strength", "Denoising strength", step=0.01,
                value=defaults.value("img2img/Denoising strength/value", None), elem_id="img2img_denoising_strength"))
            with gr.Group(visible=False, elem_id="img2img_inpaint_controls") as inpaint_options:
                mask_blur = f.slider(Img2ImgRequest, "mask_blur", "Mask blur", elem_id="img2img_mask_blur")
                mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode", type="index",
                                     elem_id="img2img_mask_mode")
                masked_content = gr.Radio(list(INPAINTING_FILL.values()), value=INPAINTING_FILL[1],
                                          label="Masked content", type="index", elem_id="img2img_inpainting_fill")
                inpaint_area = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area",
                                        type="index", elem_id="img2img_inpaint_full_res",
                                        info=f.description(Img2ImgRequest, "inpaint_full_res"))
                padding = f.slider(Img2ImgRequest, "inpaint_full_res_padding", "Only masked padding, pixels",
                                   step=4, elem_id="img2img_inpaint_full_res_padding")
            build_refiner_controls(ctx, "img2img", controls, topbar)
            extensions = build_extension_controls(ctx, tab_ui)
        with gr.Column(scale=1, elem_id="img2img_results"):
            panel = build_output_panel(ctx, "img2img")

    for tab, name in ((tab_img2img, "img2img"), (tab_sketch, "sketch"), (tab_inpaint, "inpaint"),
                      (tab_up, "inpaint_upload")):
        tab.select(lambda name=name: (name, gr.update(visible=name.startswith("inpaint"))),
                   outputs=[mode, inpaint_options], show_progress="hidden", queue=False)

    ours = [mode, image, sketch, inpaint, inpaint_base, inpaint_mask, resize_mode, denoising, mask_blur, mask_mode,
            masked_content, inpaint_area, padding]

    def build_request(common: dict[str, Any], extra: list[Any]) -> Img2ImgRequest:
        (mode_value, image_value, sketch_value, inpaint_value, base_value, mask_value, resize, strength, blur,
         mask_mode_value, fill, area_value, pad) = extra[:len(ours)]
        alwayson, script_name, script_args = extensions.request_fields(extra[len(ours):])
        init, mask = source_images(mode_value, image_value, sketch_value, inpaint_value, base_value, mask_value)
        return Img2ImgRequest(**common, init_images=[init], mask=mask, resize_mode=resize or 0,
                              denoising_strength=strength, mask_blur=int(blur),
                              inpainting_mask_invert=bool(mask_mode_value), inpainting_fill=fill,
                              inpaint_full_res=bool(area_value), inpaint_full_res_padding=int(pad),
                              alwayson_scripts=alwayson, script_name=script_name, script_args=script_args)

    wire_generation(ctx, topbar, area, controls, panel, build_request, [*ours, *extensions.inputs])
    paste = PasteTarget.of(topbar, area, controls, {"denoising_strength": denoising, "mask_blur": mask_blur},
                           extensions)
    return Img2ImgTab(area, controls, panel, paste, mode, tabs, image, sketch, inpaint, inpaint_base, inpaint_mask,
                      inpaint_options, extensions)
