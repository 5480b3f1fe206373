"""The img2img tab with its sub-tabs: img2img, Sketch, Inpaint (mask drawn in the browser), Inpaint sketch,
Inpaint upload and Batch (the last two's own parts are in :mod:`webui.ui.img2img_modes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.images.sketch import sketch_init_image
from pipelines.request import INPAINTING_FILL, RESIZE_MODES, Img2ImgRequest
from webui.context import AppContext
from webui.extension_api import TabUi
from webui.ui import fields as f
from webui.ui.controls import GenerationControls, build_sampling_controls
from webui.ui.extension_ui import ExtensionControls, build_extension_controls, build_prompt_panels
from webui.ui.generation import wire_generation
from webui.ui.images import ImageEditorInput, ImageInput, check_image
from webui.ui.img2img_modes import (
    BATCH,
    INPAINT_SKETCH,
    BatchControls,
    batch_job,
    build_batch_tab,
    build_inpaint_sketch_tab,
    build_mask_alpha,
    build_unreadable_box,
    editor_value,
    inpaint_controls_visible,
    inpaint_sketch_source,
)
from webui.ui.jobs import CustomJob
from webui.ui.output import OutputPanel, build_output_panel
from webui.ui.paste import PasteTarget
from webui.ui.prompts import PromptArea, build_prompt_area
from webui.ui.refiner import build_refiner_controls
from webui.ui.tokens import TokenCounter
from webui.ui.topbar import TopBar
from webui.ui.ui_config import UiDefaults

MODES = ("img2img", "sketch", "inpaint", INPAINT_SKETCH, "inpaint_upload", BATCH)
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
    inpaint_sketch: gr.ImageEditor
    inpaint_base: gr.Image
    inpaint_mask: gr.Image
    inpaint_options: gr.Group
    extensions: ExtensionControls
    batch: BatchControls


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


def source_images(mode: str, image, sketch, inpaint, base, mask, color_sketch=None, mask_blur: int = 4,
                  mask_alpha: float = 0) -> tuple[Image.Image, Image.Image | None]:
    """The init image and mask of the active sub-tab; ValueError says what is missing (or not an image).
    Only the active sub-tab's inputs are looked at: an unreadable upload left in another one does not matter."""
    if mode == INPAINT_SKETCH:
        return inpaint_sketch_source(color_sketch, mask_blur, mask_alpha)
    if mode == "sketch":
        sketch = check_image(sketch)
        if not sketch or sketch.get("composite") is None:
            raise ValueError("init_images: draw or upload an image in the Sketch tab first")
        return sketch_init_image(sketch["composite"]), None
    if mode == "inpaint":
        inpaint = check_image(inpaint)
        if not inpaint or inpaint.get("background") is None:
            raise ValueError("init_images: upload an image in the Inpaint tab first")
        drawn = mask_from_layers(inpaint)
        if drawn is None:
            raise ValueError("mask: paint over the part of the image to redraw")
        return inpaint["background"].convert("RGB"), drawn
    if mode == "inpaint_upload":
        base, mask = check_image(base), check_image(mask)
        if base is None or mask is None:
            raise ValueError("init_images/mask: upload both the image and the mask in the Inpaint upload tab")
        return base.convert("RGB"), mask.convert("L")
    image = check_image(image)
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
                    sketch = ImageEditorInput(label="Sketch", type="pil", elem_id="img2img_sketch", height=400,
                                            sources=["upload", "clipboard"],
                                            brush=gr.Brush(color_mode="defaults"), format="png")
                with gr.Tab("Inpaint", id="inpaint", elem_id="img2img_inpaint_tab") as tab_inpaint:
                    inpaint = ImageEditorInput(label="Image for inpainting with mask", type="pil",
                                               elem_id="img2maskimg", height=400,
                                               sources=["upload", "clipboard"],
                                               brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                               format="png", transforms=())
                tab_color, color_sketch = build_inpaint_sketch_tab()
                with gr.Tab("Inpaint upload", id="inpaint_upload", elem_id="img2img_inpaint_upload_tab") as tab_up:
                    with gr.Row():
                        inpaint_base = ImageInput(label="Image", type="pil", elem_id="img_inpaint_base", height=300)
                        inpaint_mask = ImageInput(label="Mask", type="pil", elem_id="img_inpaint_mask", height=300,
                                                image_mode="L")
                tab_batch, batch = build_batch_tab(ctx)
            unreadable = build_unreadable_box()
            resize_mode = gr.Radio(list(RESIZE_MODES.values()), value=RESIZE_MODES[0], label="Resize mode",
                                   type="index", elem_id="resize_mode",
                                   info=f.description(Img2ImgRequest, "resize_mode"))
            controls = build_sampling_controls(ctx, "img2img", defaults, Img2ImgRequest)
            denoising = defaults.register("img2img/Denoising strength/value", f.slider(
                Img2ImgRequest, "denoising_strength", "Denoising strength", step=0.01,
                value=defaults.value("img2img/Denoising strength/value", None), elem_id="img2img_denoising_strength"))
            with gr.Group(visible=False, elem_id="img2img_inpaint_controls") as inpaint_options:
                mask_blur = f.slider(Img2ImgRequest, "mask_blur", "Mask blur", elem_id="img2img_mask_blur")
                mask_alpha = build_mask_alpha()
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
                      (tab_color, INPAINT_SKETCH), (tab_up, "inpaint_upload"), (tab_batch, BATCH)):
        tab.select(lambda name=name: (name, gr.update(visible=inpaint_controls_visible(name)),
                                      gr.update(visible=name == INPAINT_SKETCH)),
                   outputs=[mode, inpaint_options, mask_alpha], show_progress="hidden", queue=False)

    ours = [mode, image, sketch, inpaint, inpaint_base, inpaint_mask, resize_mode, denoising, mask_blur, mask_mode,
            masked_content, inpaint_area, padding, color_sketch, mask_alpha, unreadable, *batch.inputs]

    def build_request(common: dict[str, Any], extra: list[Any]) -> Img2ImgRequest | CustomJob:
        (mode_value, image_value, sketch_value, inpaint_value, base_value, mask_value, resize, strength, blur,
         mask_mode_value, fill, area_value, pad, color_value, alpha, unreadable_value) = extra[:16]
        alwayson, script_name, script_args = extensions.request_fields(extra[len(ours):])
        fields = dict(**common, resize_mode=resize or 0, denoising_strength=strength, mask_blur=int(blur),
                      inpainting_mask_invert=bool(mask_mode_value), inpainting_fill=fill,
                      inpaint_full_res=bool(area_value), inpaint_full_res_padding=int(pad),
                      alwayson_scripts=alwayson, script_name=script_name, script_args=script_args)
        if mode_value == BATCH:
            return batch_job(ctx, fields, list(extra[16:len(ours)]))
        sketch_value, inpaint_value, color_value = (
            editor_value(value, editor, unreadable_value)
            for value, editor in ((sketch_value, sketch), (inpaint_value, inpaint), (color_value, color_sketch)))
        init, mask = source_images(mode_value, image_value, sketch_value, inpaint_value, base_value, mask_value,
                                   color_value, int(blur), alpha or 0)
        return Img2ImgRequest(**fields, init_images=[init], mask=mask)

    wire_generation(ctx, topbar, area, controls, panel, build_request, [*ours, *extensions.inputs])
    paste = PasteTarget.of(topbar, area, controls, {"denoising_strength": denoising, "mask_blur": mask_blur},
                           extensions)
    return Img2ImgTab(area, controls, panel, paste, mode, tabs, image, sketch, inpaint, color_sketch, inpaint_base,
                      inpaint_mask, inpaint_options, extensions, batch)
