"""The Checkpoint Merger tab: A1111's fields and labels; the merge itself is pipelines/models/merge.py."""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass

import gradio as gr
from pydantic import ValidationError

from pipelines.job_control import BatchSkipped, JobControl, JobInterrupted
from pipelines.models.merge import CONFIG_SOURCES, INTERP_METHODS, MergeResult, MergeSettings, merge_checkpoints
from webui.context import AppContext
from webui.job_queue import JobCancelled, QueueFull
from webui.ui.jobs import progress_html
from webui.ui.topbar import TopBar, checkpoint_titles

DESCRIPTIONS = {
    "No interpolation": "No interpolation will be used. Requires one model; A. Allows for format conversion and VAE "
                        "baking.",
    "Weighted sum": "A weighted sum will be used for interpolation. Requires two models; A and B. The result is "
                    "calculated as A * (1 - M) + B * M",
    "Add difference": "The difference between the last two models will be added to the first. Requires three "
                      "models; A, B and C. The result is calculated as A + (B - C) * M",
}
NOTE = ("Inputs are single-file checkpoints (.safetensors, .ckpt); diffusers folders cannot be merged. The result "
        "is saved as .safetensors (written tensor by tensor, so merging needs little memory) into the first "
        "checkpoint folder and appears in the checkpoint list at once.")


@dataclass
class MergerTab:
    primary: gr.Dropdown
    secondary: gr.Dropdown
    tertiary: gr.Dropdown
    result: gr.HTML


def mergeable_titles(ctx: AppContext) -> list[str]:
    """The checkpoints that can be merged: single files (diffusers folders are left out)."""
    return [m.title for m in ctx.engine.registry.checkpoints if not m.is_folder]


def vae_names(ctx: AppContext) -> list[str]:
    return ["None", *(m.name for m in ctx.engine.registry.vaes)]


def _description(method: str) -> str:
    return f"<p class='sdui-merge-description'>{html.escape(DESCRIPTIONS.get(method, ''))}</p>"


def _reason(error: ValidationError) -> str:
    return "; ".join(str(item["msg"]).removeprefix("Value error, ") if str(item["msg"]).startswith("Value error, ")
                     and ":" in str(item["msg"]) else f"{'.'.join(map(str, item['loc']))}: {item['msg']}"
                     for item in error.errors())


def build_merger(ctx: AppContext, topbar: TopBar) -> MergerTab:
    """A1111's Checkpoint Merger layout: models and options left, the result right."""
    titles = mergeable_titles(ctx)
    with gr.Row(equal_height=False):
        with gr.Column(variant="compact"):
            description = gr.HTML(_description("Weighted sum"), elem_id="modelmerger_interp_description")
            with gr.Row(elem_id="modelmerger_models"):
                primary = gr.Dropdown(titles, value=None, label="Primary model (A)",
                                      elem_id="modelmerger_primary_model_name", min_width=240)
                secondary = gr.Dropdown(titles, value=None, label="Secondary model (B)",
                                        elem_id="modelmerger_secondary_model_name", min_width=240)
                tertiary = gr.Dropdown(titles, value=None, label="Tertiary model (C)",
                                       elem_id="modelmerger_tertiary_model_name", min_width=240)
                refresh = gr.Button("🔄", elem_id="modelmerger_refresh", size="sm", min_width=40, scale=0,
                                    elem_classes="sdui-tool")
            custom_name = gr.Textbox(label="Custom Name (Optional)", elem_id="modelmerger_custom_name")
            multiplier = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                                   elem_id="modelmerger_interp_amount")
            method = gr.Radio(list(INTERP_METHODS), value="Weighted sum", label="Interpolation Method",
                              elem_id="modelmerger_interp_method")
            with gr.Row():
                gr.Radio(["safetensors"], value="safetensors", label="Checkpoint format",
                         elem_id="modelmerger_checkpoint_format",
                         info=".ckpt is not offered: it is a pickle, and cannot be written tensor by tensor")
                half = gr.Checkbox(False, label="Save as float16", elem_id="modelmerger_save_as_half")
            with gr.Row():
                config_source = gr.Radio(list(CONFIG_SOURCES), value="A, B or C", label="Copy config from",
                                         elem_id="modelmerger_config_method")
                bake_vae = gr.Dropdown(vae_names(ctx), value="None", label="Bake in VAE",
                                       elem_id="modelmerger_bake_in_vae")
            discard = gr.Textbox("", label="Discard weights with matching name", elem_id="modelmerger_discard_weights",
                                 placeholder="a regular expression, e.g. ^model_ema\\.")
            with gr.Accordion("Metadata", open=False):
                with gr.Row():
                    save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="modelmerger_save_metadata")
                    add_recipe = gr.Checkbox(True, label="Add merge recipe metadata", elem_id="modelmerger_add_recipe")
                    copy_metadata = gr.Checkbox(True, label="Copy metadata from merged models",
                                                elem_id="modelmerger_copy_metadata")
            merge = gr.Button("Merge", variant="primary", elem_id="modelmerger_merge")
            gr.Markdown(NOTE, elem_id="modelmerger_note")
        with gr.Column(variant="compact", elem_id="modelmerger_results_container"):
            result = gr.HTML("", elem_id="modelmerger_result")

    method.change(_description, inputs=[method], outputs=[description], show_progress="hidden", queue=False)

    def lists(a: str | None, b: str | None, c: str | None, vae: str | None):
        ctx.engine.registry.refresh()
        choices = mergeable_titles(ctx)
        vaes = vae_names(ctx)
        return (*(gr.update(choices=choices, value=v if v in choices else None) for v in (a, b, c)),
                gr.update(choices=vaes, value=vae if vae in vaes else "None"))

    refresh.click(lists, inputs=[primary, secondary, tertiary, bake_vae],
                  outputs=[primary, secondary, tertiary, bake_vae], show_progress="hidden")
    gr.on(None, lambda: (*(gr.update(choices=mergeable_titles(ctx)) for _ in range(3)),
                         gr.update(choices=vae_names(ctx))),
          outputs=[primary, secondary, tertiary, bake_vae], show_progress="hidden", queue=False,
          api_visibility="private")
    for event in topbar.list_changed:
        event.then(lists, inputs=[primary, secondary, tertiary, bake_vae],
                   outputs=[primary, secondary, tertiary, bake_vae], show_progress="hidden", queue=False)

    def run(a, b, c, interp, m, as_half, name, config, vae, discard_re, with_metadata, recipe, copy_fields, current):
        try:
            settings = MergeSettings(
                primary_model_name=a or "", secondary_model_name=b or "", tertiary_model_name=c or "",
                interp_method=interp, multiplier=m, save_as_half=as_half, custom_name=name or "",
                config_source=config, bake_in_vae=vae or "None", discard_weights=discard_re or "",
                save_metadata=with_metadata, add_merge_recipe=recipe, copy_metadata_fields=copy_fields)
        except ValidationError as error:
            raise gr.Error(_reason(error)) from None
        control = JobControl()
        outcome: dict[str, object] = {}

        def job() -> None:
            try:
                outcome["result"] = ctx.queue.run(lambda ctl: merge_checkpoints(ctx.engine.registry, settings, ctl),
                                                  source="ui", control=control,
                                                  description=f"merge {settings.primary_model_name}")
            except Exception as error:  # reported on the page below, with its message
                outcome["error"] = error

        worker = threading.Thread(target=job, name="checkpoint-merge", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            progress = control.progress
            text = progress.textinfo or "Waiting in the queue…"
            if progress.sampling_steps:
                text = f"{text}: {progress.sampling_step}/{progress.sampling_steps} tensors"
            yield progress_html(progress.fraction, text), gr.update(), gr.update(), gr.update(), gr.update()
        error = outcome.get("error")
        if error is not None:
            known = (ValueError, LookupError, OSError, JobCancelled, QueueFull, JobInterrupted, BatchSkipped)
            if not isinstance(error, known):
                raise error  # type: ignore[misc]
            message = str(error) or "the merge was interrupted"
            yield (f"<p class='sdui-error'>Error merging checkpoints: {html.escape(message)}</p>",
                   gr.update(), gr.update(), gr.update(), gr.update())
            gr.Warning(f"Error merging checkpoints: {message}")
            return
        merged: MergeResult = outcome["result"]  # type: ignore[assignment]
        choices = mergeable_titles(ctx)
        everything = checkpoint_titles(ctx)
        config_line = f"<br>Config copied to {html.escape(str(merged.config))}" if merged.config else ""
        yield (f"<p id='modelmerger_saved'>Checkpoint saved to {html.escape(str(merged.path))}{config_line}</p>",
               gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=choices),
               gr.update(choices=everything, value=current if current in everything else merged.title))

    merge.click(run, inputs=[primary, secondary, tertiary, method, multiplier, half, custom_name, config_source,
                             bake_vae, discard, save_metadata, add_recipe, copy_metadata, topbar.checkpoint],
                outputs=[result, primary, secondary, tertiary, topbar.checkpoint], show_progress="hidden")
    return MergerTab(primary, secondary, tertiary, result)
