"""The Extras tab: upscale one image, several files, or a folder, with up to two upscalers blended; then restore
faces with GFPGAN and CodeFormer at their visibilities (A1111's order)."""

from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from pipelines.images.saving import embed_infotext
from pipelines.upscaling.extras import ExtrasResult, ExtrasSettings, folder_images, run_extras
from webui.context import AppContext
from webui.job_queue import JobCancelled
from webui.ui.images import ImageInput, NotAnImage
from webui.ui.output import infotext_html

SOURCES = ("single", "batch", "folder")


@dataclass
class ExtrasTab:
    source: gr.State
    tabs: gr.Tabs
    image: gr.Image
    gallery: gr.Gallery
    info: gr.HTML


def _folder_images(ctx: AppContext, folder: str) -> list[Path]:
    """The images of a folder inside the data dir or the folders the operator allowed (--allowed-dir)."""
    try:
        return folder_images(folder or "", ctx.engine.roots, field="Input directory")
    except ValueError as error:
        raise gr.Error(str(error)) from None


def _gallery_files(results: list[ExtrasResult]) -> list[str]:
    """Files with the infotext embedded (the saved ones, or scratch PNGs), so a dragged image keeps it."""
    scratch = None
    files = []
    for k, result in enumerate(results):
        if result.path is None:
            scratch = scratch or Path(tempfile.mkdtemp(prefix="sdui-extras-"))
            path = scratch / f"{k:05d}.png"
            path.write_bytes(embed_infotext(result.image, result.infotext, "png"))
            files.append(str(path))
        else:
            files.append(str(result.path))
    return files


def upscaler_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """(label, name) of every upscaler; a model file known to be unusable is still listed, its label giving
    the reason (the API's list leaves such files out)."""
    unusable = ctx.upscalers.unusable(probe=False)
    return [(f"{name} (cannot be used: {unusable[name]})" if name in unusable else name, name)
            for name in ctx.upscalers.names]


def build_extras(ctx: AppContext) -> ExtrasTab:
    """The tab's controls and its Generate button."""
    names = upscaler_choices(ctx)
    source = gr.State("single")
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Tabs(elem_id="mode_extras") as tabs:
                with gr.Tab("Single Image", id="single", elem_id="extras_single_tab") as single_tab:
                    # A file path, not a decoded image, so the source's infotext can be carried over.
                    image = ImageInput(label="Source", type="filepath", image_mode=None, elem_id="extras_image",
                                     sources=["upload", "clipboard"], height=360)
                with gr.Tab("Batch Process", id="batch", elem_id="extras_batch_process_tab") as batch_tab:
                    files = gr.File(label="Batch Process", file_count="multiple", file_types=["image"],
                                    elem_id="extras_image_batch")
                with gr.Tab("Batch from Directory", id="folder", elem_id="extras_batch_directory_tab") as dir_tab:
                    folder = gr.Textbox(label="Input directory", elem_id="extras_batch_input_dir",
                                        placeholder="A folder on the server; its images are upscaled")
            for tab, name in ((single_tab, "single"), (batch_tab, "batch"), (dir_tab, "folder")):
                tab.select(lambda name=name: name, outputs=[source], show_progress="hidden")
            with gr.Tabs(elem_id="extras_resize_mode"):
                with gr.Tab("Scale by", id="scale_by", elem_id="extras_scale_by_tab") as scale_by_tab:
                    scale = gr.Slider(1.0, 8.0, value=2.0, step=0.05, label="Resize", elem_id="extras_upscaling_resize")
                with gr.Tab("Scale to", id="scale_to", elem_id="extras_scale_to_tab") as scale_to_tab:
                    with gr.Row():
                        width = gr.Number(512, label="Width", precision=0, minimum=1, maximum=8192,
                                          elem_id="extras_upscaling_resize_w")
                        height = gr.Number(512, label="Height", precision=0, minimum=1, maximum=8192,
                                           elem_id="extras_upscaling_resize_h")
                        crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop")
            resize_mode = gr.State(0)
            scale_by_tab.select(lambda: 0, outputs=[resize_mode], show_progress="hidden")
            scale_to_tab.select(lambda: 1, outputs=[resize_mode], show_progress="hidden")
            with gr.Row():
                upscaler_1 = gr.Dropdown(names, value="None", label="Upscaler 1", elem_id="extras_upscaler_1")
                upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
            visibility = gr.Slider(0.0, 1.0, value=0.0, step=0.001, label="Upscaler 2 visibility",
                                   elem_id="extras_upscaler_2_visibility")
            with gr.Accordion("GFPGAN", open=False, elem_id="extras_gfpgan"):
                gfpgan = gr.Slider(0.0, 1.0, value=0.0, step=0.001, label="Visibility",
                                   elem_id="extras_gfpgan_visibility")
            with gr.Accordion("CodeFormer", open=False, elem_id="extras_codeformer"):
                codeformer = gr.Slider(0.0, 1.0, value=0.0, step=0.001, label="Visibility",
                                       elem_id="extras_codeformer_visibility")
                codeformer_weight = gr.Slider(0.0, 1.0, value=0.0, step=0.001,
                                              label="Weight (0 = maximum effect, 1 = minimum effect)",
                                              elem_id="extras_codeformer_weight")
            run = gr.Button("Generate", variant="primary", elem_id="extras_generate")
        with gr.Column():
            # "auto": the box grows to the result (a fixed height cut a 512 px result off).
            gallery = gr.Gallery(label="Output", show_label=False, elem_id="extras_gallery", columns=4, height="auto",
                                 object_fit="contain", preview=True, interactive=False)
            info = gr.HTML("", elem_id="html_info_extras")

    def refresh_names():
        ctx.upscalers.refresh()
        choices = upscaler_choices(ctx)
        return gr.update(choices=choices), gr.update(choices=choices)

    upscaler_1.focus(refresh_names, outputs=[upscaler_1, upscaler_2], show_progress="hidden")

    def process(mode: str, single: str | NotAnImage | None, batch: list[str] | None, directory: str, resize: int,
                by: float, w: float, h: float, fit: bool, first: str, second: str, weight: float,
                gfpgan_visibility: float, codeformer_visibility: float, cf_weight: float):
        if mode == "single":
            if isinstance(single, NotAnImage):
                raise gr.Error(single.message)
            if not single:
                raise gr.Error("Drop an image first.")
            paths = [single]
        elif mode == "batch":
            paths = [getattr(item, "name", item) for item in batch or []]
        else:
            paths = _folder_images(ctx, directory)
        if not paths:
            raise gr.Error("No images to process.")
        settings = ExtrasSettings(resize_mode=resize, scale=by, width=int(w or 0), height=int(h or 0), crop=fit,
                                  upscaler_1=first or "None", upscaler_2=second or "None",
                                  upscaler_2_visibility=weight, gfpgan_visibility=gfpgan_visibility,
                                  codeformer_visibility=codeformer_visibility, codeformer_weight=cf_weight)
        try:
            settings.check(ctx.upscalers, ctx.engine.face_restorers)
            # Paths, not images: run_extras opens each file in turn, so a large folder is never all in memory.
            options = ctx.options
            results = ctx.queue.run(
                lambda control: run_extras(ctx.upscalers, paths, settings, options, ctx.engine.paths.outputs_dir,
                                           control, faces=ctx.engine.face_restorers),
                source="ui", description=f"extras: {len(paths)} image(s) with {settings.upscaler_1}")
        except (ValueError, LookupError, JobCancelled) as error:
            raise gr.Error(str(error)) from None
        text = infotext_html(results[0].infotext) if results else ""
        sizes = ", ".join(sorted({f"{r.image.width}x{r.image.height}" for r in results}))
        summary = f"<p class='sdui-extras-size'>{len(results)} image(s), {html.escape(sizes)}</p>"
        return _gallery_files(results), text + summary

    run.click(process, inputs=[source, image, files, folder, resize_mode, scale, width, height, crop,
                               upscaler_1, upscaler_2, visibility, gfpgan, codeformer, codeformer_weight],
              outputs=[gallery, info])
    return ExtrasTab(source, tabs, image, gallery, info)
