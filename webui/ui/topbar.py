"""The bar above the tabs: checkpoint (with refresh), SD VAE and Clip skip; and the no-model notice."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import httpx

from pipelines.models import families
from pipelines.models.families.base import Family
from pipelines.request import GenerationRequest
from webui.context import AppContext
from webui.ui import fields as f
from webui.ui.download import download_model, network_problem
from webui.ui.jobs import progress_html


@dataclass
class TopBar:
    checkpoint: gr.Dropdown
    refresh: gr.Button
    vae: gr.Dropdown
    #: Forge's "VAE / Text Encoder": files completing a checkpoint stored without them (a Flux.1 transformer).
    modules: gr.Dropdown
    clip_skip: gr.Slider
    notice: gr.Markdown
    download: gr.Button
    download_status: gr.HTML
    queue_status: gr.HTML
    #: Events after which the checkpoint list may have changed (Refresh, a finished download): other
    #: checkpoint dropdowns chain their own refresh with ``.then``.
    list_changed: list = field(default_factory=list)


def checkpoint_titles(ctx: AppContext) -> list[str]:
    return [m.title for m in ctx.engine.registry.checkpoints]


def vae_choices(ctx: AppContext) -> list[str]:
    return ["Automatic", *(m.name for m in ctx.engine.registry.vaes)]


def module_choices(ctx: AppContext) -> list[str]:
    return [m.name for m in ctx.engine.registry.modules]


def checkpoint_family(ctx: AppContext, title: str | None) -> Family | None:
    """The family of the checkpoint called ``title`` (from its header), or None."""
    if not title:
        return None
    try:
        return families.family_of_path(ctx.engine.registry.find_checkpoint(title).path)
    except LookupError:
        return None


def initial_checkpoint(ctx: AppContext) -> str | None:
    """The loaded model, else the one --ckpt names, else the first one found."""
    current = ctx.engine.models.current
    if current is not None:
        return current.file.title
    try:
        return ctx.engine.models.resolve(None).title
    except LookupError:
        return None


def no_model_notice(ctx: AppContext) -> str:
    folder = ctx.engine.registry.paths.model_dirs("checkpoint")[0]
    return (f"**No checkpoint found.** Put a Stable Diffusion checkpoint (a `.safetensors` or `.ckpt` file, or a "
            f"diffusers folder) into `{folder}` and press 🔄 next to the checkpoint list, "
            f"or download the default model (`{Path(urlparse(ctx.default_model_url).path).name}`; the server's "
            "operator sets the URL with --default-model-url).")


def initial_vae(ctx: AppContext) -> str:
    """The VAE chosen last (kept in config.json), if it is still there."""
    saved = ctx.options.sd_vae
    return saved if saved in vae_choices(ctx) else "Automatic"


def build_topbar(ctx: AppContext) -> TopBar:
    """Checkpoint, SD VAE and Clip skip as chosen last (options in config.json), a line about other users' and
    API jobs, and the no-model notice."""
    titles = checkpoint_titles(ctx)
    with gr.Row(elem_id="quicksettings"):
        # A callable value is evaluated at every page load, so a new tab shows the model loaded now.
        checkpoint = gr.Dropdown(titles, value=lambda: initial_checkpoint(ctx), label="Stable Diffusion checkpoint",
                                 elem_id="setting_sd_model_checkpoint", scale=4, min_width=300)
        refresh = gr.Button("🔄", elem_id="refresh_sd_model_checkpoint", size="sm", min_width=40, scale=0,
                            elem_classes="sdui-tool")
        vae = gr.Dropdown(vae_choices(ctx), value=lambda: initial_vae(ctx), label="SD VAE", elem_id="setting_sd_vae",
                          scale=3, min_width=200, info=None)
        modules = gr.Dropdown(module_choices(ctx), value=[], multiselect=True, label="VAE / Text Encoder",
                              elem_id="setting_forge_additional_modules", scale=3, min_width=200,
                              info=None)
        clip_skip = f.slider(GenerationRequest, "clip_skip", "Clip skip",
                             value=lambda: ctx.options.CLIP_stop_at_last_layers,
                             elem_id="setting_CLIP_stop_at_last_layers", scale=3, min_width=200)
    queue_status = gr.HTML("", elem_id="queue_status")
    with gr.Group(visible=not titles, elem_id="no_model_notice") as notice_box:
        notice = gr.Markdown(no_model_notice(ctx))
        with gr.Row():
            download = gr.Button("Download the default model", elem_id="download_default_model", size="sm",
                                 scale=0, min_width=240)
            download_status = gr.HTML("", elem_id="download_default_model_status")
    bar = TopBar(checkpoint, refresh, vae, modules, clip_skip, notice, download, download_status, queue_status)
    _wire(ctx, bar, notice_box)
    return bar


def _wire(ctx: AppContext, bar: TopBar, notice_box: gr.Group) -> None:
    def refresh(current: str | None):
        ctx.engine.registry.refresh()
        ctx.engine.upscalers.refresh()  # for the Hires. fix upscaler list, refreshed after this
        titles = checkpoint_titles(ctx)
        value = current if current in titles else (titles[0] if titles else None)
        return (gr.update(choices=titles, value=value), gr.update(choices=vae_choices(ctx)),
                gr.update(choices=module_choices(ctx)), gr.update(visible=not titles))

    bar.list_changed.append(bar.refresh.click(refresh, inputs=[bar.checkpoint],
                                              outputs=[bar.checkpoint, bar.vae, bar.modules, notice_box],
                                              show_progress="hidden"))

    def load(title: str | None, vae: str, modules: list[str] | None) -> None:
        if not title:
            return
        # Loading goes through the job queue like a generation: it must not swap models under a running job.
        try:
            ctx.queue.run(lambda _control: ctx.engine.models.get(title, vae, modules or []), source="ui",
                          description=f"load {title}")
        except (LookupError, OSError, ValueError) as error:
            raise gr.Error(f"Could not load {title}: {error}") from error
        ctx.update_options({"sd_model_checkpoint": title})

    bar.checkpoint.input(load, inputs=[bar.checkpoint, bar.vae, bar.modules], show_progress="minimal")

    # A page opened later lists the models there now (a merge, a download), not those of the start: its
    # value (the loaded model) may be one of them.
    gr.on(None, lambda: (gr.update(choices=checkpoint_titles(ctx)), gr.update(choices=vae_choices(ctx))),
          outputs=[bar.checkpoint, bar.vae], show_progress="hidden", queue=False, api_visibility="private")

    # Kept for the next start and for API requests that name none, as A1111's quicksettings are.
    def keep_vae(vae: str | None) -> None:
        ctx.update_options({"sd_vae": vae or "Automatic"})

    def keep_clip_skip(value: float) -> None:
        ctx.update_options({"CLIP_stop_at_last_layers": int(value)})

    bar.vae.input(keep_vae, inputs=[bar.vae], show_progress="hidden", queue=False)
    bar.clip_skip.input(keep_clip_skip, inputs=[bar.clip_skip], show_progress="hidden", trigger_mode="always_last",
                        queue=False)

    def download(current: str | None):
        # Only for a fresh install, as the notice shows it: never a second checkpoint, nor a probe of the
        # network, once one is there.
        ctx.engine.registry.refresh()
        if ctx.engine.registry.checkpoints:
            yield ("<p class='sdui-error'>A checkpoint is already there; the default model is downloaded only "
                   "when there is none.</p>", gr.update(), gr.update())
            return
        url = ctx.default_model_url  # the operator's (flag or config.json), never a request's
        problem = network_problem(url)
        if problem:
            yield (f"<p class='sdui-error'>Cannot download the default model: {html.escape(problem)} Download "
                   f"<code>{html.escape(url)}</code> on a machine that is online and copy it into "
                   f"<code>{html.escape(str(ctx.engine.registry.paths.model_dirs('checkpoint')[0]))}</code>.</p>",
                   gr.update(), gr.update())
            return
        folder = ctx.engine.registry.paths.model_dirs("checkpoint")[0]
        try:
            for fraction, text in download_model(url, folder):
                yield progress_html(fraction, text), gr.update(), gr.update()
        except (OSError, httpx.HTTPError) as error:
            yield f"<p class='sdui-error'>Download failed: {html.escape(str(error))}</p>", gr.update(), gr.update()
            return
        checkpoint, _, notice = refresh(current)
        yield progress_html(1.0, "Done."), checkpoint, notice

    bar.list_changed.append(bar.download.click(download, inputs=[bar.checkpoint],
                                               outputs=[bar.download_status, bar.checkpoint, notice_box]))
