"""The output column of a generation tab: progress bar, live preview, gallery, infotext and the buttons under it."""

from __future__ import annotations

import html
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from pipelines.images.saving import embed_infotext
from pipelines.processing import GenerationResult
from webui.context import AppContext
from webui.ui.jobs import Session


@dataclass
class OutputPanel:
    """The output controls of one tab, and its user's :class:`Session` state."""

    session: gr.State
    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    infotext: gr.HTML
    log: gr.HTML
    folder: gr.Button
    save: gr.Button
    zip: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button
    download: gr.File
    send_extras: gr.Button


def infotext_html(text: str) -> str:
    """The infotext under the gallery, escaped, line breaks kept."""
    if not text:
        return ""
    return "<div class='sdui-infotext'>" + html.escape(text).replace("\n", "<br>") + "</div>"


def build_output_panel(ctx: AppContext, tab: str) -> OutputPanel:
    """Gallery with progress and preview above it; infotext and Save / Zip / Send to ... below."""
    session = gr.State(Session())
    progress = gr.HTML("", elem_id=f"{tab}_progress", elem_classes="sdui-progress-box")
    preview = gr.Image(label="Preview", visible=False, interactive=False, elem_id=f"{tab}_preview",
                       height=320, type="pil")
    gallery = gr.Gallery(label="Output", show_label=False, elem_id=f"{tab}_gallery", columns=4, height=420,
                         object_fit="contain", preview=True, allow_preview=True, interactive=False)
    with gr.Row(elem_id=f"image_buttons_{tab}", elem_classes="sdui-image-buttons"):
        folder = gr.Button("📂", elem_id=f"{tab}_open_folder", size="sm", min_width=40, scale=0)
        save = gr.Button("Save", elem_id=f"{tab}_save", size="sm")
        zip_button = gr.Button("Zip", elem_id=f"{tab}_save_zip", size="sm")
        send_img2img = gr.Button("Send to img2img", elem_id=f"{tab}_send_to_img2img", size="sm")
        send_inpaint = gr.Button("Send to inpaint", elem_id=f"{tab}_send_to_inpaint", size="sm")
        send_extras = gr.Button("Send to extras", elem_id=f"{tab}_send_to_extras", size="sm")
    download = gr.File(label="Download", visible=False, interactive=False, elem_id=f"{tab}_download_files",
                       file_count="multiple")
    infotext = gr.HTML("", elem_id=f"html_info_{tab}")
    log = gr.HTML("", elem_id=f"html_log_{tab}")
    panel = OutputPanel(session, progress, preview, gallery, infotext, log, folder, save, zip_button,
                        send_img2img, send_inpaint, download, send_extras)
    _wire(ctx, panel, tab)
    return panel


def gallery_files(result: GenerationResult, scratch: Path) -> list[str]:
    """A file per image with its infotext embedded: the saved file, or a PNG in ``scratch`` when not saved.

    Files (not bare images) go to the gallery so that an image dragged out of it keeps its parameters.
    """
    if len(result.paths) == len(result.images):
        return [str(path) for path in result.paths]
    scratch.mkdir(parents=True, exist_ok=True)
    files = []
    for k, (image, infotext) in enumerate(zip(result.images, result.infotexts)):
        path = scratch / f"{result.job_timestamp}-{k:02d}-{result.seeds[k]}.png"
        path.write_bytes(embed_infotext(image, infotext, "png"))
        files.append(str(path))
    return files


def gallery_entries(result: GenerationResult, scratch: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    """(files, infotexts, seeds, subseeds) of the gallery, one per entry: as A1111 shows a batch, the grid
    first (with the first image's infotext and seeds) when the job made one, then the images, then the
    always-on scripts' extra images (ControlNet's detected maps; no infotext, the first image's seeds)."""
    files = gallery_files(result, scratch)
    infotexts, seeds, subseeds = list(result.infotexts), list(result.seeds), list(result.subseeds)
    if result.extra_images and result.images:
        scratch.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(result.extra_images):
            path = scratch / f"{result.job_timestamp}-extra-{k:02d}-{result.seeds[0]}.png"
            image.save(path, "PNG")
            files.append(str(path))
        infotexts += [""] * len(result.extra_images)
        seeds += [seeds[0]] * len(result.extra_images)
        subseeds += [subseeds[0]] * len(result.extra_images) if subseeds else []
    grid = result.grid
    if grid is None or not result.images or any(image is grid for image in result.images):
        return files, infotexts, seeds, subseeds
    if result.grid_path is not None:
        grid_file = str(result.grid_path)
    else:
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"{result.job_timestamp}-grid-{result.seeds[0]}.png"
        path.write_bytes(embed_infotext(grid, result.infotexts[0], "png"))
        grid_file = str(path)
    return ([grid_file, *files], [infotexts[0], *infotexts], [seeds[0], *seeds],
            [subseeds[0], *subseeds] if subseeds else subseeds)


def _wire(ctx: AppContext, panel: OutputPanel, tab: str) -> None:
    def select(session: Session, event: gr.SelectData):
        session.selected = event.index if isinstance(event.index, int) else 0
        return infotext_html(session.selected_infotext)

    panel.gallery.select(select, inputs=[panel.session], outputs=[panel.infotext], show_progress="hidden")

    def open_folder() -> None:
        folder = ctx.options.outdir_txt2img_samples if tab == "txt2img" else ctx.options.outdir_img2img_samples
        where = Path(folder) if folder else ctx.engine.paths.outputs_dir / f"{tab}-images"
        # The browser may be on another machine, so the folder is named rather than opened.
        gr.Info(f"Images are saved in {where}")

    panel.folder.click(open_folder, show_progress="hidden")

    def save(session: Session):
        if session.selected_image is None:
            raise gr.Error("Nothing to save yet: generate an image first.")
        return gr.update(value=[session.selected_image], visible=True)

    panel.save.click(save, inputs=[panel.session], outputs=[panel.download])

    def zip_all(session: Session):
        if not session.images:
            raise gr.Error("Nothing to zip yet: generate an image first.")
        target = Path(tempfile.mkdtemp(prefix="sdui-zip-")) / f"images-{session.job_timestamp or 'job'}.zip"
        with zipfile.ZipFile(target, "w") as archive:
            for path in session.images[session.first_image:]:  # the images, not the grid shown first
                archive.write(path, Path(path).name)
        return gr.update(value=[str(target)], visible=True)

    panel.zip.click(zip_all, inputs=[panel.session], outputs=[panel.download])
