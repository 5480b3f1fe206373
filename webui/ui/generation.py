"""Wiring of Generate / Interrupt / Skip for a tab: controls -> request -> queued engine job -> gallery."""

from __future__ import annotations

import html
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from pydantic import ValidationError

from pipelines.processing import GenerationResult
from pipelines.request import GenerationRequest
from webui.context import AppContext
from webui.job_queue import JobCancelled
from webui.ui.controls import GenerationControls
from webui.ui.jobs import CustomJob, Session, run_job
from webui.ui.output import OutputPanel, gallery_entries, infotext_html
from webui.ui.prompts import NEGATIVE_PLACEHOLDER, PromptArea
from webui.ui.topbar import TopBar, checkpoint_family

#: Builds the tab's request from the common fields and the values of the tab's extra inputs (or a job of the
#: tab's own, as img2img's Batch).
RequestBuilder = Callable[[dict[str, Any], list[Any]], GenerationRequest | CustomJob]


def describe_error(error: BaseException) -> str:
    """A one-paragraph message for the user; pydantic errors list each field with its problem."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in error.errors())
    return str(error) or type(error).__name__


def _log_html(lines: list[str], error: bool = False) -> str:
    if not lines:
        return ""
    css = "sdui-error" if error else "sdui-log"
    return "".join(f"<p class='{css}'>{html.escape(line)}</p>" for line in lines)


def error_line(message: str) -> str:
    """The red line under Generate."""
    return f"<p class='sdui-error' role='alert'>{html.escape(message)}</p>"


def stale_infotext(text: str) -> str:
    """The previous job's infotext, dimmed, under a note that it is not from the refused request."""
    note = ("<p class='sdui-stale-note'>This request was refused (see the message under Generate); the image "
            "and parameters below are from the previous job.</p>")
    return note + (f"<div class='sdui-stale'>{infotext_html(text)}</div>" if text else "")


def result_notes(request: GenerationRequest, result: GenerationResult) -> list[str]:
    """The lines under a finished job's gallery: its warnings, how far an interrupted job got, the time."""
    notes = list(result.warnings)
    if result.interrupted and request.script_name:  # its images include grids: the script says what it did
        notes.append("Interrupted: what the script finished is shown.")
    elif result.interrupted:
        notes.append(f"Interrupted: {len(result.images)} of {request.image_count} images; the last batch is "
                     "shown as it was at the interrupted step.")
    if result.skipped_batches and not request.script_name:
        batches = ", ".join(str(number + 1) for number in result.skipped_batches)
        notes.append(f"Skipped batch {batches} of {request.n_iter}: its images are shown as they were when "
                     "skipped.")
    notes.append(f"Time taken: {result.seconds:.2f} s")
    return notes


def wire_generation(ctx: AppContext, topbar: TopBar, area: PromptArea, controls: GenerationControls,
                    panel: OutputPanel, build_request: RequestBuilder,
                    extra_inputs: list[gr.components.Component] = ()) -> None:
    """Connect the tab's Generate button (and its Interrupt / Skip replacements) to the engine."""
    names = list(controls.fields)
    scratch = Path(tempfile.gettempdir()) / "sdui-gallery"
    inputs = [panel.session, topbar.checkpoint, topbar.vae, topbar.modules, topbar.clip_skip, area.prompt,
              area.negative_prompt, area.styles, *controls.fields.values(), *extra_inputs]
    running = {area.generate: gr.update(visible=False), area.interrupt: gr.update(visible=True),
               area.skip: gr.update(visible=True), area.error: ""}
    idle = {area.generate: gr.update(visible=True), area.interrupt: gr.update(visible=False),
            area.skip: gr.update(visible=False), panel.preview: gr.update(visible=False, value=None),
            panel.progress: ""}

    def generate(session: Session, checkpoint: str | None, vae: str, modules: list[str] | None, clip_skip: int,
                 prompt: str, negative: str, styles: list[str], *values: Any):
        common = dict(zip(names, values[:len(names)]))
        common.update(prompt=prompt or "", negative_prompt=negative or "", styles=styles or [],
                      checkpoint=checkpoint or None, vae=vae or "Automatic", clip_skip=int(clip_skip or 1),
                      additional_modules=list(modules or []))
        def refused(message: str) -> dict:
            # A toast, a red line right under Generate, and the old result marked as not being this request's.
            gr.Warning(message)
            return {**idle, area.error: error_line(message), panel.log: _log_html([message], error=True),
                    panel.gallery: gr.update(elem_classes=["sdui-stale"]),
                    panel.infotext: stale_infotext(session.selected_infotext) if session.images else ""}

        try:
            built = build_request(common, list(values[len(names):]))
        except (ValidationError, ValueError, LookupError) as error:
            yield refused(describe_error(error))
            return
        custom = built if isinstance(built, CustomJob) else None
        request = built.request if isinstance(built, CustomJob) else built
        yield {**running, panel.log: "", panel.preview: gr.update(visible=True, value=None)}
        shown_preview = None
        for update in run_job(ctx, session, request, custom):
            if update.result is None and update.error is None:
                changes: dict = {panel.progress: update.progress_html}
                if update.preview is not None and update.preview is not shown_preview:
                    shown_preview = update.preview
                    changes[panel.preview] = gr.update(value=update.preview)
                yield changes
                continue
            if isinstance(update.error, JobCancelled):
                yield {**idle, panel.log: _log_html(["Cancelled before it started."], error=True)}
                return
            if update.error is not None:
                yield refused(f"Error: {describe_error(update.error)}")
                return
            result = update.result
            session.images, session.infotexts, session.seeds, session.subseeds = gallery_entries(result, scratch)
            extras = len(result.extra_images) if result.images else 0  # shown after the images
            session.first_image = len(session.images) - len(result.images) - extras
            session.selected = 0
            session.job_timestamp = result.job_timestamp
            yield {**idle, panel.gallery: gr.update(value=session.images, selected_index=0 if session.images else None,
                                                    elem_classes=[]),
                   panel.infotext: infotext_html(session.selected_infotext),
                   panel.log: _log_html(custom.notes(result) if custom else result_notes(request, result))}

    outputs = [panel.gallery, panel.preview, panel.progress, panel.infotext, panel.log, area.generate,
               area.interrupt, area.skip, area.error]
    # No Gradio-side limit: the engine's JobQueue orders UI and API jobs and tells each its position.
    area.generate.click(generate, inputs=inputs, outputs=outputs, concurrency_limit=None,
                        show_progress="hidden")
    area.interrupt.click(lambda s: s.stop(ctx.queue), inputs=[panel.session], queue=False)
    area.skip.click(lambda s: s.skip(ctx.queue), inputs=[panel.session], queue=False)

    def reuse(session: Session, seeds: list[int]) -> int:
        if not seeds:
            raise gr.Error("No image yet: generate one first, then reuse its seed.")
        return seeds[min(session.selected, len(seeds) - 1)]

    _wire_family_controls(ctx, topbar, area, controls)

    controls.reuse_seed.click(lambda s: reuse(s, s.seeds), inputs=[panel.session],
                              outputs=[controls.fields["seed"]], show_progress="hidden")
    controls.reuse_subseed.click(lambda s: reuse(s, s.subseeds), inputs=[panel.session],
                                 outputs=[controls.fields["subseed"]], show_progress="hidden")


def _wire_family_controls(ctx: AppContext, topbar: TopBar, area: PromptArea, controls: GenerationControls) -> None:
    """Choosing a checkpoint of a family with its own defaults (Flux.1: Euler, Simple, CFG scale 1; schnell: 4
    steps) sets them in the tab, shows the controls only that family uses (Distilled CFG Scale), and notes in the
    negative prompt box when the family reads it only sometimes. Steps a family set go back to the tab's default
    when a checkpoint without such a default is chosen."""
    names = ("sampler_name", "scheduler", "cfg_scale")
    if not all(name in controls.fields for name in (*names, "steps", "distilled_cfg_scale")):
        return
    steps = controls.fields["steps"]
    tab_steps = steps.value
    steps_from_family = gr.State(False)

    def follow(title: str | None, family_set_steps: bool) -> list:
        family = checkpoint_family(ctx, title)
        defaults = family.defaults_for(ctx.engine.registry.find_checkpoint(title).path) if family else {}
        updates = [gr.update(value=defaults[name]) if name in defaults else gr.update() for name in names]
        if "steps" in defaults:
            steps_update = gr.update(value=defaults["steps"])
        else:
            steps_update = gr.update(value=tab_steps) if family_set_steps else gr.update()
        note = family.negative_prompt_note if family is not None else None
        return [*updates, steps_update, "steps" in defaults,
                gr.update(visible=family is not None and family.infotext_fields is not None),
                gr.update(placeholder=note or NEGATIVE_PLACEHOLDER)]

    targets = [*(controls.fields[name] for name in names), steps, steps_from_family,
               controls.fields["distilled_cfg_scale"], area.negative_prompt]
    topbar.checkpoint.change(follow, inputs=[topbar.checkpoint, steps_from_family], outputs=targets,
                             show_progress="hidden", queue=False)
