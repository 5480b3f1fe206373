"""The Train tab: a LoRA or a fine-tuned checkpoint (the Method control) from a folder of captioned images, on the
engine's models and the app's one job queue.

The settings' controls are built from :class:`~pipelines.training.settings.TrainingSettings` (types, defaults,
bounds and descriptions are declared there once); runs are the same :class:`TrainingRuns` the API starts, so a
run started here is also visible at ``GET /sdapi/v1/train/{id}``. While a run is active a timer refreshes the
progress line, the loss plot and the sample gallery once a second.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
from pydantic import ValidationError

from pipelines.training.dataset import resolve_dataset_folder, scan_dataset
from pipelines.training.settings import DEFAULT_LEARNING_RATES, TrainingSettings
from pipelines.training.trainer import check_output, run_folder
from webui.api.routes_train import dataset_roots, describe, training_runs
from webui.context import AppContext
from webui.evaluation_jobs import evaluate_training_run
from webui.ui import fields
from webui.ui.generation import describe_error
from webui.ui.topbar import checkpoint_titles, initial_checkpoint

#: The settings' places in the tab; every field of TrainingSettings is in exactly one (a test checks it).
TOP_FIELDS = ("name", "dataset")
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Steps and optimizer", ("steps", "epochs", "batch_size", "gradient_accumulation", "learning_rate",
                             "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "optimizer", "weight_decay",
                             "max_grad_norm", "mixed_precision", "gradient_checkpointing", "min_snr_gamma",
                             "noise_offset", "seed")),
    ("Network", ("method", "rank", "alpha", "targets", "train_text_encoder")),
    ("Images and captions", ("resolution", "missing_captions", "crop", "flip", "shuffle_captions", "keep_tokens",
                             "caption_dropout", "clip_skip")),
    ("Saves and samples", ("save_every", "save_precision", "ema_decay", "sample_every", "sample_prompts",
                           "sample_seed", "sample_steps", "sample_size", "resume")),
)
#: Set apart from the generic controls: a dropdown of the engine's checkpoints.
CHECKPOINT = "checkpoint"
LABELS = {"ema_decay": "EMA decay", "lr_scheduler": "LR scheduler", "lr_warmup_steps": "LR warm-up steps",
          "text_encoder_lr": "Text encoder LR", "min_snr_gamma": "Min-SNR gamma", "max_grad_norm": "Max gradient norm",
          "clip_skip": "Clip skip", "name": "Output name", "dataset": "Dataset folder"}
PER_ROW = 3
FINISHED = ("done", "stopped", "failed")
SETTINGS_SUFFIX = ".train.json"


def setting_names() -> list[str]:
    """The TrainingSettings fields that have a generic control, in the tab's order."""
    return [*TOP_FIELDS, *(name for _, names in GROUPS for name in names)]


def label(name: str) -> str:
    return LABELS.get(name, name.replace("_", " ").capitalize())


@dataclass
class TrainTab:
    controls: dict[str, gr.Component]  # field name -> control, the checkpoint dropdown included
    run_id: gr.State
    timer: gr.Timer
    progress: gr.HTML
    report: gr.Textbox
    images: gr.Dataframe
    loss_plot: gr.LinePlot
    gallery: gr.Gallery


# --------------------------------------------------------------------------- helpers (no Gradio events)


def settings_from(values: dict[str, Any]) -> TrainingSettings:
    """TrainingSettings from the controls' values; ValueError lists every bad field and why."""
    data = {name: fields.value_for(TrainingSettings, name, value) for name, value in values.items()}
    try:
        return TrainingSettings(**data)
    except ValidationError as error:
        raise ValueError(describe_error(error)) from None


def _output_dirs(ctx: AppContext) -> list:
    """Where runs save, and their settings beside: LoRAs, and fine-tuned checkpoints."""
    return [*ctx.engine.paths.model_dirs("lora"), *ctx.engine.paths.model_dirs("checkpoint")]


def saved_settings(ctx: AppContext) -> list[str]:
    """Names of the runs whose settings lie beside their output (``NAME.train.json``), newest first."""
    files = [path for folder in _output_dirs(ctx) if folder.is_dir()
             for path in folder.glob(f"*{SETTINGS_SUFFIX}")]
    files.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    return list(dict.fromkeys(path.name[: -len(SETTINGS_SUFFIX)] for path in files))


def load_saved(ctx: AppContext, name: str) -> TrainingSettings:
    """The settings a run saved; ValueError naming the file when there is none or it does not validate."""
    for folder in _output_dirs(ctx):
        path = folder / f"{name}{SETTINGS_SUFFIX}"
        if path.is_file():
            try:
                return TrainingSettings.model_validate(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, OSError) as error:
                detail = describe_error(error) if isinstance(error, ValidationError) else str(error)
                raise ValueError(f"Load settings: {path} cannot be used: {detail}") from None
    raise ValueError(f"Load settings: no saved run {name!r}; allowed: {', '.join(saved_settings(ctx)) or 'none'}")


def dataset_check(ctx: AppContext, folder: str, resolution: float | None, missing: str) -> tuple[str, list[list]]:
    """The dataset report (summary and problems by file) and one row per usable image."""
    path = resolve_dataset_folder(folder or "", dataset_roots(ctx))
    resolution = int(resolution or 0)
    try:
        TrainingSettings.model_validate({"name": "check", "dataset": folder, "resolution": resolution,
                                         "missing_captions": missing})
    except ValidationError as error:
        raise ValueError(describe_error(error)) from None
    report = scan_dataset(path, resolution, missing_captions=missing)
    rows = [[item["file"], "x".join(map(str, item["size"])), "x".join(map(str, item["bucket"])), item["repeats"],
             item["caption"]] for item in report.as_dict()["items"]]
    return report.summary(), rows


def method_learning_rate(method: str, current: float | None) -> float | None:
    """The learning rate after choosing ``method``: its default when the box still holds a method's default
    (a fine-tune wants a smaller one than a LoRA), else None (the user's own value is kept)."""
    if current is None or current in DEFAULT_LEARNING_RATES.values():
        return DEFAULT_LEARNING_RATES.get(method)
    return None


def progress_html(state: dict) -> str:
    """One line: status, step x/y, it/s, ETA, the last loss; the error in red when the run failed."""
    status = state["status"]
    if status == "failed":
        return f"<p class='sdui-error' role='alert'>Training failed: {html.escape(state['error'] or '')}</p>"
    parts = [status, f"step {state['step']}/{state['total_steps']}", f"{state['it_per_s']:.2f} it/s"]
    eta = state["eta_seconds"]
    if eta is not None and status == "running":
        minutes, seconds = divmod(round(eta), 60)
        parts.append(f"ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}")
    if state["losses"]["loss"]:
        parts.append(f"loss {state['losses']['loss'][-1]:.4f}")
    if state["output"] and status in FINISHED:
        parts.append(f"saved {state['output']}")
    return f"<p class='sdui-log' id='train_progress_line'>{html.escape(' · '.join(parts))}</p>"


def loss_frame(state: dict | None) -> pd.DataFrame:
    losses = state["losses"] if state else {"step": [], "loss": []}
    return pd.DataFrame({"step": losses["step"], "loss": losses["loss"]})


def gallery_items(state: dict) -> list[tuple[str, str]]:
    """The sample files (infotext embedded), captioned with their step and prompt."""
    return [(sample["file"], f"step {sample['step']}: {sample['prompt']}") for sample in state["samples"]]


def evaluate_run(ctx: AppContext, current: str | None) -> None:
    """"Evaluate this run": queue an evaluation of the run's saves against its base model (a toast names it)."""
    run = training_runs(ctx).get(current) if current else None
    if run is None:
        raise gr.Error("Evaluate this run: no training run started from this page")
    try:
        job = evaluate_training_run(ctx, run)
    except (ValueError, LookupError) as error:
        raise gr.Error(f"Evaluate this run: {error}") from None
    gr.Info(f"Evaluation {job.id} queued: {', '.join(c.name for c in job.spec.candidates)}; results in the "
            f"folder outputs/evaluations/{job.spec.name} and at GET /sdapi/v1/evaluate/{job.id}")


# --------------------------------------------------------------------------- the tab


def build_train(ctx: AppContext) -> TrainTab:
    controls: dict[str, gr.Component] = {}

    def make(name: str) -> None:
        controls[name] = fields.control(TrainingSettings, name, label(name), elem_id=f"train_{name}")

    run_id = gr.State(None)
    shown = gr.State((0, 0))  # (losses, samples) already sent to this page
    timer = gr.Timer(1.0, active=False)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            with gr.Row():
                load = gr.Dropdown(saved_settings(ctx), value=None, label="Load settings", elem_id="train_load",
                                   info="The settings of a run saved beside its LoRA or checkpoint "
                                        "(NAME.train.json)", scale=4)
                refresh = gr.Button("🔄", elem_id="train_load_refresh", scale=0, min_width=40)
            make("name")
            with gr.Row(equal_height=True):
                make("dataset")
                check = gr.Button("Check dataset", elem_id="train_check", scale=0, min_width=140)
            with gr.Accordion("Dataset report", open=True, visible=False, elem_id="train_report_box") as report_box:
                report = gr.Textbox("", show_label=False, lines=4, max_lines=30, interactive=False,
                                    elem_id="train_dataset_report")
                images = gr.Dataframe(headers=["file", "size", "bucket", "repeats", "caption"], value=None,
                                      label="Usable images", interactive=False, elem_id="train_dataset_images",
                                      wrap=True, max_height=300)
            controls[CHECKPOINT] = gr.Dropdown(
                checkpoint_titles(ctx), value=lambda: initial_checkpoint(ctx), label="Checkpoint",
                info=fields.description(TrainingSettings, CHECKPOINT), elem_id="train_checkpoint")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train_start")
                stop = gr.Button("Stop", variant="stop", elem_id="train_stop")
                evaluate = gr.Button("Evaluate this run", elem_id="train_evaluate")
            for number, (title, names) in enumerate(GROUPS):
                with gr.Accordion(title, open=number == 0, elem_id=f"train_group_{number}"):
                    for first in range(0, len(names), PER_ROW):
                        with gr.Row(equal_height=True):
                            for name in names[first: first + PER_ROW]:
                                make(name)
        with gr.Column(scale=1):
            progress = gr.HTML("", elem_id="train_progress")
            loss_plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Loss", label="Loss",
                                    elem_id="train_loss_plot", height=260)
            loss_csv = gr.Textbox("", label="Loss log (CSV)", interactive=False, elem_id="train_loss_csv")
            gallery = gr.Gallery(label="Samples", elem_id="train_gallery", columns=4, height="auto",
                                 object_fit="contain", interactive=False)

    order = setting_names()
    inputs = [controls[name] for name in order] + [controls[CHECKPOINT]]

    def method_changed(method: str, current: float | None):
        rate = method_learning_rate(method, current)
        return gr.skip() if rate is None else rate

    controls["method"].input(method_changed, inputs=[controls["method"], controls["learning_rate"]],
                             outputs=[controls["learning_rate"]], queue=False, show_progress="hidden")

    def check_dataset(folder: str, resolution: float | None, missing: str):
        try:
            summary, rows = dataset_check(ctx, folder, resolution, missing)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        return gr.Accordion(visible=True), summary, rows

    check.click(check_dataset, inputs=[controls["dataset"], controls["resolution"], controls["missing_captions"]],
                outputs=[report_box, report, images])

    def start_run(*values: Any):
        *generic, checkpoint = values
        try:
            settings = settings_from({**dict(zip(order, generic)), CHECKPOINT: checkpoint or None})
            folder = resolve_dataset_folder(settings.dataset, dataset_roots(ctx))
            ctx.engine.models.resolve(settings.checkpoint)
            check_output(ctx.engine, settings)
        except (ValueError, LookupError) as error:
            raise gr.Error(str(error).strip("'\"")) from None
        run = training_runs(ctx).start(settings, folder)
        state = describe(run, images=False)
        return (run.id, gr.Timer(active=True), progress_html(state), loss_frame(None),
                str(run_folder(ctx.engine, settings.name) / "loss.csv"), [], (0, 0))

    start.click(start_run, inputs=inputs, outputs=[run_id, timer, progress, loss_plot, loss_csv, gallery, shown],
                concurrency_limit=None)

    def stop_run(current: str | None):
        run = training_runs(ctx).get(current) if current else None
        if run is None:
            raise gr.Error("Stop: no training run started from this page")
        run.stop()
        return "<p class='sdui-log' id='train_progress_line'>stopping at the next step; the state is saved</p>"

    stop.click(stop_run, inputs=[run_id], outputs=[progress], queue=False)
    evaluate.click(lambda current: evaluate_run(ctx, current), inputs=[run_id], outputs=None)

    def tick(current: str | None, seen: tuple[int, int]):
        run = training_runs(ctx).get(current) if current else None
        if run is None:
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip(), seen
        state = describe(run, images=False)
        counts = (len(state["losses"]["step"]), len(state["samples"]))
        active = state["status"] not in FINISHED
        return (gr.Timer(active=active), progress_html(state),
                loss_frame(state) if counts[0] != seen[0] else gr.skip(),
                gallery_items(state) if counts[1] != seen[1] else gr.skip(), counts)

    timer.tick(tick, inputs=[run_id, shown], outputs=[timer, progress, loss_plot, gallery, shown],
               show_progress="hidden", queue=False, api_visibility="private")

    def load_settings(name: str | None):
        if not name:
            return [gr.skip()] * len(inputs)
        try:
            settings = load_saved(ctx, name)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        values = [fields.control_value(TrainingSettings, field, getattr(settings, field)) for field in order]
        try:
            checkpoint = ctx.engine.models.resolve(settings.checkpoint).title if settings.checkpoint else None
        except LookupError:
            gr.Warning(f"Load settings: checkpoint {settings.checkpoint!r} is not here; keeping the chosen one")
            checkpoint = None
        return [*values, checkpoint if checkpoint else gr.skip()]

    load.input(load_settings, inputs=[load], outputs=inputs)

    def refresh_saved(current: str | None):
        names = saved_settings(ctx)
        titles = checkpoint_titles(ctx)
        return gr.update(choices=names, value=current if current in names else None), gr.update(choices=titles)

    refresh.click(refresh_saved, inputs=[load], outputs=[load, controls[CHECKPOINT]], show_progress="hidden")
    return TrainTab(controls, run_id, timer, progress, report, images, loss_plot, gallery)

