"""img2img's "Inpaint sketch" and "Batch" sub-tabs: their controls and what they turn into.

*Inpaint sketch*: a colour painting on the picture that is both the mask and the colour guide
(:func:`pipelines.images.sketch.inpaint_sketch`), with the inpaint controls and "Mask transparency".
*Batch*: A1111's "From directory" batch, every image of a folder through the tab's settings as one queued,
interruptible job (:mod:`pipelines.img2img_batch`); folders are confined to the allowed folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.images.sketch import inpaint_sketch
from pipelines.img2img_batch import (
    FIELDS,
    IMAGE_SUFFIXES,
    PNG_INFO_PROPS,
    BatchReport,
    BatchSettings,
    check_batch,
    check_template,
    run_img2img_batch,
)
from pipelines.processing import GenerationResult
from pipelines.request import Img2ImgRequest
from webui.context import AppContext
from webui.ui.images import ImageEditorInput, NotAnImage, check_image, not_an_image_message
from webui.ui.jobs import CustomJob

INPAINT_SKETCH, BATCH = "inpaint_sketch", "batch"
#: The sub-tabs that show the inpaint controls (mask blur, masked content, ...): the batch too, for its masks.
INPAINT_MODES = ("inpaint", INPAINT_SKETCH, "inpaint_upload", BATCH)


def inpaint_controls_visible(mode: str) -> bool:
    return mode in INPAINT_MODES


#: The hidden box where script.js notes, per editor (by elem_id), the name of an upload the browser could not
#: decode: such a file never reaches the server (the editor decodes uploads in the browser) and the editor
#: stays empty, so without it Generate could only say that no image was uploaded.
UNREADABLE_BOX = "img2img_unreadable_uploads"


def build_unreadable_box() -> gr.Textbox:
    return gr.Textbox("", elem_id=UNREADABLE_BOX, elem_classes=["sdui-hidden"], show_label=False, container=False)


def editor_value(value: Any, editor: gr.ImageEditor, unreadable: str | None) -> Any:
    """``value`` of ``editor``, or a :class:`NotAnImage` naming the file when the editor is empty because the
    browser could not read the file the user gave it."""
    if isinstance(value, NotAnImage) or (value and (value.get("background") is not None
                                                     or value.get("composite") is not None)):
        return value
    try:
        names = json.loads(unreadable or "{}")
    except ValueError:
        names = {}
    name = names.get(editor.elem_id) if isinstance(names, dict) else None
    return NotAnImage(not_an_image_message(editor.label, str(name))) if name else value


def build_inpaint_sketch_tab() -> tuple[gr.Tab, gr.ImageEditor]:
    """The "Inpaint sketch" sub-tab: an editor whose brush paints in colour (A1111's color-sketch)."""
    with gr.Tab("Inpaint sketch", id=INPAINT_SKETCH, elem_id="img2img_inpaint_sketch_tab") as tab:
        editor = ImageEditorInput(label="Color sketch inpainting", type="pil", elem_id="inpaint_sketch", height=400,
                                  sources=["upload", "clipboard"], brush=gr.Brush(color_mode="defaults"),
                                  format="png", transforms=())
    return tab, editor


def build_mask_alpha() -> gr.Slider:
    """A1111's "Mask transparency", shown only in the Inpaint sketch sub-tab."""
    return gr.Slider(0, 100, value=0, step=1, label="Mask transparency", visible=False, elem_id="img2img_mask_alpha",
                     info="How much of the original shows through the painting (0: redraw it fully).")


def inpaint_sketch_source(editor: Any, mask_blur: int, mask_alpha: float) -> tuple[Image.Image, Image.Image]:
    """(init image, mask) of the Inpaint sketch sub-tab; ValueError saying what is missing."""
    editor = check_image(editor)
    if not editor or editor.get("background") is None or editor.get("composite") is None:
        raise ValueError("init_images: upload an image in the Inpaint sketch tab first")
    painted, original = editor["composite"].convert("RGB"), editor["background"].convert("RGB")
    if painted.size == original.size and not np.any(np.asarray(painted) != np.asarray(original)):
        raise ValueError("mask: paint over the part of the image to redraw (the painted colours guide it)")
    return inpaint_sketch(painted, original, mask_blur=int(mask_blur), mask_alpha=float(mask_alpha or 0))


@dataclass
class BatchControls:
    input_dir: gr.Textbox
    output_dir: gr.Textbox
    inpaint_mask_dir: gr.Textbox
    use_png_info: gr.Checkbox
    png_info_dir: gr.Textbox
    png_info_props: gr.CheckboxGroup

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.input_dir, self.output_dir, self.inpaint_mask_dir, self.use_png_info, self.png_info_dir,
                self.png_info_props]


def build_batch_tab(ctx: AppContext) -> tuple[gr.Tab, BatchControls]:
    """The "Batch" sub-tab (A1111's "From directory" batch with its PNG info accordion)."""
    roots = ", ".join(str(folder) for folder in ctx.engine.roots.folders)
    with gr.Tab("Batch", id=BATCH, elem_id="img2img_batch_tab") as tab:
        gr.HTML("<p class='sdui-batch-help'>Process the images of a folder on the server "
                f"({', '.join(IMAGE_SUFFIXES)}, sub-folders included) with the settings below. Folders are "
                "relative to the data folder, or inside one of the allowed folders. Leave the output directory "
                "empty to save the pictures as usual; add an inpaint batch mask directory to inpaint each image "
                "with the mask of its name (or the only mask there).</p>", elem_id="img2img_batch_help")
        input_dir = gr.Textbox(label=FIELDS["input_dir"], elem_id="img2img_batch_input_dir",
                               placeholder=f"A folder inside {roots}")
        output_dir = gr.Textbox(label=FIELDS["output_dir"], elem_id="img2img_batch_output_dir",
                                placeholder="Empty: the usual img2img outputs folder")
        mask_dir = gr.Textbox(label=f"{FIELDS['inpaint_mask_dir']} (required for inpaint batch processing only)",
                              elem_id="img2img_batch_inpaint_mask_dir")
        with gr.Accordion("PNG info", open=False, elem_id="img2img_batch_png_info"):
            use_png_info = gr.Checkbox(label="Append png info to prompts", elem_id="img2img_batch_use_png_info")
            png_info_dir = gr.Textbox(label=FIELDS["png_info_dir"], elem_id="img2img_batch_png_info_dir",
                                      placeholder="Leave empty to use input directory")
            png_info_props = gr.CheckboxGroup(list(PNG_INFO_PROPS), label=FIELDS["png_info_props"],
                                              elem_id="img2img_batch_png_info_props",
                                              info="Prompts from png info will be appended to prompts set in ui.")
    return tab, BatchControls(input_dir, output_dir, mask_dir, use_png_info, png_info_dir, png_info_props)


@dataclass
class _Outcome:
    report: BatchReport | None = None
    extra: list[str] = field(default_factory=list)


def batch_job(ctx: AppContext, template: dict[str, Any], values: list[Any]) -> CustomJob:
    """The Batch sub-tab's job: folders and settings checked now (ValueError / ValidationError / LookupError
    naming the field, shown under Generate), the images processed when the queue gets to it."""
    input_dir, output_dir, mask_dir, use_png_info, png_info_dir, props = values
    settings = BatchSettings(input_dir=str(input_dir or ""), output_dir=str(output_dir or ""),
                             inpaint_mask_dir=str(mask_dir or ""), use_png_info=bool(use_png_info),
                             png_info_props=tuple(props or ()), png_info_dir=str(png_info_dir or ""))
    folders = check_batch(settings, ctx.engine.roots)
    check_template(ctx.engine, template)
    probe = Img2ImgRequest(**{**template, "init_images": [Image.new("RGB", (8, 8))]})
    outcome = _Outcome()
    options = ctx.options

    def run(control) -> GenerationResult:
        result, outcome.report = run_img2img_batch(ctx.engine, template, folders, settings, control, options)
        return result

    def notes(result: GenerationResult) -> list[str]:
        lines = outcome.report.notes() if outcome.report else []
        return [*lines, *result.warnings, f"Time taken: {result.seconds:.2f} s"]

    return CustomJob(request=probe, run=run, notes=notes,
                     description=f"img2img batch: {len(folders.images)} image(s) from {folders.input_dir.name}")

