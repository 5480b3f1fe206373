"""The Evaluate tab: compare checkpoints, LoRAs and settings on a prompt set with CLIP score, FID/KID, IS, SSIM;
or img2img settings and upscalers against source images with SSIM, PSNR and LPIPS (the Mode radio).

A run goes through :mod:`webui.evaluation_jobs`, the same queued, interruptible job as ``POST
/sdapi/v1/evaluate``, so it waits behind (and blocks) generation like any other job. The Run handler polls the
job and streams its progress line (phase, fraction, ETA), then shows the table, the bar chart and the contact
sheets; Interrupt stops it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
from pydantic import ValidationError

from pipelines.evaluation.metrics import METRIC_LABELS, METRICS
from pipelines.evaluation.prompts import BUILTIN
from pipelines.evaluation.report import CHART
from pipelines.evaluation.runner import CANDIDATE_FIELDS, FIDELITY_METRICS, Candidate, EvaluationSpec
from pipelines.plan import RequestError
from pipelines.sampling.samplers import SAMPLERS
from webui.context import AppContext
from webui.evaluation_jobs import EvaluationJob, evaluation_jobs
from webui.ui.generation import describe_error
from webui.ui.jobs import progress_html
from webui.ui.topbar import checkpoint_titles

POLL_SECONDS = 0.5
DEFAULT_METRICS = ["clip_score", "inception_score"]
#: The modes as the tab names them: what a candidate makes from a prompt.
MODES = [("txt2img", "txt2img"), ("img2img (from the sources)", "img2img"), ("Upscalers", "upscale")]


@dataclass
class EvaluateTab:
    run: gr.Button
    interrupt: gr.Button
    table: gr.Dataframe
    chart: gr.Image


def parse_seeds(text: str) -> list[int]:
    """'1, 2 3' -> [1, 2, 3]; ValueError naming the field."""
    parts = text.replace(",", " ").split()
    try:
        seeds = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"Seeds: whole numbers separated by commas, got {text!r}") from None
    if not seeds:
        raise ValueError("Seeds: give at least one seed")
    return seeds


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_candidates(checkpoints: list[str], extra: str) -> list[Candidate]:
    """One candidate per selected checkpoint, then one per line of ``extra``:
    ``name | checkpoint | prompt suffix | key=value, key=value`` (the parts after the name are optional)."""
    candidates = [Candidate(name=title.split(" [")[0][:80], checkpoint=title) for title in checkpoints or []]
    for number, line in enumerate((extra or "").splitlines(), 1):
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        settings: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in (parts[3] if len(parts) > 3 else "").split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"More candidates, line {number}: settings are key=value "
                                 f"({', '.join(CANDIDATE_FIELDS)}), got {item!r}")
            settings[key.strip()] = _value(value.strip())
        try:
            candidates.append(Candidate(name=parts[0], checkpoint=(parts[1] if len(parts) > 1 else "") or None,
                                        prompt_suffix=parts[2] if len(parts) > 2 else "", settings=settings))
        except ValidationError as error:
            raise ValueError(f"More candidates, line {number}: {describe_error(error)}") from None
    if not candidates:
        raise ValueError("Candidates: select at least one checkpoint or add a line under 'More candidates'")
    return candidates


def upscaler_candidates(names: list[str]) -> list[Candidate]:
    """Mode Upscalers: one candidate per chosen upscaler."""
    if not names:
        raise ValueError("Upscalers: select at least one upscaler to compare")
    return [Candidate(name=name[:80], upscaler=name) for name in names]


def metrics_for_mode(mode: str) -> list[str]:
    """The metrics ticked when the mode changes: fidelity against the sources, or the txt2img default."""
    return list(FIDELITY_METRICS) if mode != "txt2img" else list(DEFAULT_METRICS)


def _progress_line(ctx: AppContext, job: EvaluationJob) -> str:
    p = job.progress()
    if job.state == "queued":
        position = ctx.queue.position(job.ticket) if job.ticket is not None else -1
        return progress_html(0.0, f"In queue: position {position}" if position > 0 else "In queue")
    eta = p["eta_seconds"]
    text = f"{p['phase'].capitalize()}: {p['fraction'] * 100:.0f}%"
    if eta is not None:
        text += f" · ETA {eta:.0f}s" if eta >= 1 else " · ETA <1s"
    if p["textinfo"]:
        text += f" · {p['textinfo'].split(' · ')[0].removeprefix('Evaluation: ')}"
    return progress_html(p["fraction"], text)


def build_evaluate(ctx: AppContext) -> EvaluateTab:
    """The tab's controls, its Run / Interrupt buttons and the results."""
    jobs = evaluation_jobs(ctx)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            checkpoints = gr.Dropdown(checkpoint_titles(ctx), value=[], multiselect=True, label="Checkpoints",
                                      info="Each is a candidate (a column of the comparison).",
                                      elem_id="evaluate_checkpoints")
            extra = gr.Textbox(label="More candidates", lines=2, elem_id="evaluate_candidates",
                               placeholder="name | checkpoint | prompt suffix | key=value, ...   e.g.\n"
                                           "cfg4 | | | cfg_scale=4\nmy lora | | <lora:mine:0.8>")
            with gr.Row():
                prompt_set = gr.Textbox(BUILTIN, label="Prompt set", elem_id="evaluate_prompt_set",
                                        info=f"{BUILTIN}, or a .txt / .csv file inside the data folder")
                max_prompts = gr.Number(0, label="Only the first N prompts (0: all)", precision=0, minimum=0,
                                        elem_id="evaluate_max_prompts")
                seeds = gr.Textbox("1, 2", label="Seeds", elem_id="evaluate_seeds")
            metrics = gr.CheckboxGroup([(METRIC_LABELS[name], name) for name in METRICS], value=DEFAULT_METRICS,
                                       label="Metrics", elem_id="evaluate_metrics")
            reference_dir = gr.Textbox(label="Reference folder (FID, KID)", elem_id="evaluate_reference_dir",
                                       placeholder="A folder of images inside the data folder")
            with gr.Row():
                mode = gr.Radio(MODES, value="txt2img", label="Mode", elem_id="evaluate_mode",
                                info="img2img / Upscalers: each candidate remakes the source images; SSIM, PSNR "
                                     "and LPIPS compare with them")
                source_dir = gr.Textbox(label="Source folder (img2img, Upscalers)", elem_id="evaluate_source_dir",
                                        placeholder="Images inside the data folder (NAME.txt: the prompt); "
                                                    "empty: the prompt set's reference column")
                upscale_by = gr.Number(4, label="Shrink by (Upscalers)", minimum=1, maximum=8,
                                       elem_id="evaluate_upscale_by")
            upscalers = gr.Dropdown(ctx.engine.upscalers.names, value=[], multiselect=True, label="Upscalers",
                                    info="Mode Upscalers: each is a candidate", elem_id="evaluate_upscalers")
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampling method",
                                      elem_id="evaluate_sampler")
                steps = gr.Number(20, label="Steps", precision=0, minimum=1, maximum=150, elem_id="evaluate_steps")
                width = gr.Number(512, label="Width", precision=0, minimum=64, maximum=2048, step=8,
                                  elem_id="evaluate_width")
                height = gr.Number(512, label="Height", precision=0, minimum=64, maximum=2048, step=8,
                                   elem_id="evaluate_height")
            with gr.Row():
                run = gr.Button("Run evaluation", variant="primary", elem_id="evaluate_run")
                interrupt = gr.Button("Interrupt", elem_id="evaluate_interrupt")
            progress = gr.HTML("", elem_id="evaluate_progress")
        with gr.Column(scale=3):
            table = gr.Dataframe(label="Results (mean [95% interval], ★ best)", interactive=False,
                                 elem_id="evaluate_table")
            messages = gr.HTML("", elem_id="evaluate_messages")
            chart = gr.Image(label="Chart", type="filepath", interactive=False, elem_id="evaluate_chart")
            sheets = gr.Gallery(label="Contact sheets", columns=2, height=420, object_fit="contain",
                                interactive=False, elem_id="evaluate_sheets")
    job_id = gr.State("")

    def start(chosen, more, prompts, first_n, seed_text, wanted, references, sampler_name, n_steps, w, h,
              run_mode, sources, shrink, chosen_upscalers):
        try:
            candidates = (upscaler_candidates(chosen_upscalers) if run_mode == "upscale"
                          else parse_candidates(chosen, more))
            spec = EvaluationSpec(candidates=candidates, mode=run_mode or "txt2img",
                                  source_dir=(sources or "").strip() or None, upscale_by=float(shrink or 4),
                                  prompt_set=prompts or BUILTIN,
                                  max_prompts=int(first_n or 0), seeds=parse_seeds(seed_text),
                                  metrics=wanted or [], reference_dir=(references or "").strip() or None,
                                  sampler_name=sampler_name, steps=int(n_steps or 0), width=int(w or 0),
                                  height=int(h or 0))
            job = jobs.start(spec)
        except (ValueError, RequestError) as error:  # ValidationError is a ValueError
            raise gr.Error(describe_error(error)) from None
        yield job.id, progress_html(0.0, "Queued"), gr.skip(), "", gr.skip(), gr.skip()
        while not job.finished.wait(POLL_SECONDS):
            yield gr.skip(), _progress_line(ctx, job), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        status = job.status()
        results = status["results"]
        if results is None:
            reason = status["error"] or f"The evaluation was {status['state']}."
            yield "", f"<p class='sdui-error'>{html.escape(reason)}</p>", gr.skip(), "", None, []
            return
        headers, rows = results["table"]["headers"], results["table"]["rows"]
        notes = "".join(f"<p class='sdui-log'>{html.escape(line)}</p>" for line in results["messages"])
        seconds = results["generation_seconds"] + results["scoring_seconds"]
        name = job.folder.name if job.folder else ""
        done = progress_html(1.0, f"Done in {seconds:.1f}s · outputs/evaluations/{name}")
        yield ("", done, gr.update(value=rows, headers=headers), notes,
               str(job.folder / CHART) if job.folder else None, results["contact_sheets"])

    def stop(current: str) -> None:
        job = jobs.get(current) if current else None
        if job is not None:
            jobs.interrupt(job)

    run.click(start, inputs=[checkpoints, extra, prompt_set, max_prompts, seeds, metrics, reference_dir, sampler,
                             steps, width, height, mode, source_dir, upscale_by, upscalers],
              outputs=[job_id, progress, table, messages, chart, sheets], show_progress="hidden",
              api_visibility="private")
    interrupt.click(stop, inputs=[job_id], outputs=[], show_progress="hidden", queue=False,
                    api_visibility="private")
    mode.input(metrics_for_mode, inputs=[mode], outputs=[metrics], show_progress="hidden", api_visibility="private")
    shown = {"titles": checkpoint_titles(ctx)}

    def refresh_titles():
        """New checkpoints on disk since the page loaded; nothing is sent when the list is the same."""
        titles = checkpoint_titles(ctx)
        if titles == shown["titles"]:
            return gr.skip()
        shown["titles"] = titles
        return gr.update(choices=titles)

    checkpoints.focus(refresh_titles, outputs=[checkpoints], show_progress="hidden", api_visibility="private")
    return EvaluateTab(run, interrupt, table, chart)
