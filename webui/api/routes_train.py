"""Training routes (ours; A1111 has only textual inversion / hypernetwork training):

- ``POST /sdapi/v1/train``: start a training run (the fields of ``TrainingSettings``; ``method`` "lora" writes a
  LoRA into models/Lora/, "fine-tune" a checkpoint into models/Stable-diffusion/); answers its id;
- ``GET /sdapi/v1/train/{id}``: status, step, it/s, ETA, loss history, sample images (base64 PNG), output;
- ``POST /sdapi/v1/train/{id}/stop``: stop it at the next step (it saves a resumable state);
- ``POST /sdapi/v1/train/embedding`` and ``/hypernetwork``: 422, not supported.

Runs go through the app's one job queue, so training and generation never share the device.
"""

from __future__ import annotations

import weakref

from fastapi import APIRouter, HTTPException

from pipelines.images.saving import encode_base64_png
from pipelines.training.dataset import resolve_dataset_folder
from pipelines.training.runs import TrainingRun, TrainingRuns
from pipelines.training.settings import TrainingSettings
from pipelines.training.trainer import check_output, loss_curve
from webui.api.errors import ApiError
from webui.context import AppContext

_RUNS: weakref.WeakKeyDictionary[AppContext, TrainingRuns] = weakref.WeakKeyDictionary()


#: The answer for an id no training run has.
UNKNOWN_RUN: dict[int | str, dict] = {404: {"description": "No training run has this id."}}


def training_runs(ctx: AppContext) -> TrainingRuns:
    """The app's training runs (shared by the API and the Train tab)."""
    if ctx not in _RUNS:
        _RUNS[ctx] = TrainingRuns(ctx.engine, lambda job, description: ctx.queue.run(
            job, source="train", description=description))
        ctx.add_background_runs(_RUNS[ctx])
    return _RUNS[ctx]


def dataset_roots(ctx: AppContext) -> list:
    """Where a dataset folder may be: the data dir (relative names start there) and the allowed folders."""
    return list(ctx.engine.roots.folders)


def describe(run: TrainingRun, images: bool = True) -> dict:
    state = run.state
    return {
        "id": run.id, "status": run.status, "error": run.error, "name": run.settings.name,
        "step": state.step if state else 0, "total_steps": state.total_steps if state else 0,
        "it_per_s": state.it_per_s if state else 0.0, "eta_seconds": state.eta_seconds if state else None,
        "losses": loss_curve(state.losses) if state else {"step": [], "loss": []},
        "samples": [{"step": s.step, "prompt": s.prompt, "file": str(s.path), "infotext": s.infotext,
                     **({"image": encode_base64_png(s.image, s.infotext)} if images else {})}
                    for s in (state.samples if state else [])],
        "output": str(state.output) if state and state.output else None,
        "settings": run.settings.model_dump(mode="json"),
    }


def router(ctx: AppContext, route_class: type) -> APIRouter:
    api = APIRouter(route_class=route_class, tags=["train"])

    @api.post("/sdapi/v1/train/embedding")
    def train_embedding() -> dict:
        raise ApiError(("method",), "textual inversion training is not supported; train a LoRA with "
                                    "POST /sdapi/v1/train")

    @api.post("/sdapi/v1/train/hypernetwork")
    def train_hypernetwork() -> dict:
        raise ApiError(("method",), "hypernetwork training is not supported; train a LoRA with POST /sdapi/v1/train")

    @api.post("/sdapi/v1/train")
    def start(body: TrainingSettings) -> dict:
        try:
            folder = resolve_dataset_folder(body.dataset, dataset_roots(ctx))
        except ValueError as error:
            raise ApiError(("dataset",), str(error)) from None
        try:
            ctx.engine.models.resolve(body.checkpoint)
        except LookupError as error:
            raise ApiError(("checkpoint",), str(error)) from None
        try:
            check_output(ctx.engine, body)
        except ValueError as error:
            raise ApiError(("name",), str(error)) from None
        run = training_runs(ctx).start(body, folder)
        return {"id": run.id, "status": run.status}

    @api.get("/sdapi/v1/train/{run_id}", responses=UNKNOWN_RUN)
    def progress(run_id: str, images: bool = True) -> dict:
        run = training_runs(ctx).get(run_id)
        if run is None:
            raise HTTPException(404, f"no training run {run_id!r}")
        return describe(run, images)

    @api.post("/sdapi/v1/train/{run_id}/stop", responses=UNKNOWN_RUN)
    def stop(run_id: str) -> dict:
        run = training_runs(ctx).get(run_id)
        if run is None:
            raise HTTPException(404, f"no training run {run_id!r}")
        run.stop()
        return {"id": run.id, "status": run.status}

    return api
