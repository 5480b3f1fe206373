"""txt2img, img2img, and watching or stopping the running job (progress, interrupt, skip).

Every job goes through the shared queue (``ctx.queue``), so an API job never runs beside a UI job.
Routes are plain ``def``: FastAPI runs them in its thread pool, and a job blocks only its own thread.
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from pipelines.images.saving import encode_base64_png
from pipelines.job_control import JobControl
from webui.api.models import (
    GenerationResponse,
    ProgressResponse,
    ProgressState,
    StableDiffusionImg2ImgProcessingAPI,
    StableDiffusionTxt2ImgProcessingAPI,
)
from webui.api.state import ApiSelection
from webui.api.translate import PreparedJob, build_response, job_timestamp, prepare
from webui.context import AppContext


def run_prepared(ctx: AppContext, selection: ApiSelection, job: PreparedJob) -> dict:
    """Queue the job, run it on the engine when its turn comes, and build the A1111 answer."""
    engine = ctx.engine
    control = JobControl(preview_every=job.options(ctx.options).show_progress_every_n_steps)

    def work(control: JobControl):
        # Decided at the job's turn: the model a request without override uses is the one selected then.
        selected = selection.checkpoint(engine.models)
        request = job.request
        if not job.checkpoint_override:
            request = request.model_copy(update={"checkpoint": selected})
        result = engine.generate(request, control=control, options=job.options(ctx.options))
        model = engine.models.current
        if job.checkpoint_override and model is not None:
            selection.loaded_for_override(model.file.title)
        return result, model

    description = f"{job.request.mode}: {job.request.prompt[:60]}"
    result, model = ctx.queue.run(work, source="api", description=description, control=control,
                                  task_id=job.parameters.get("force_task_id"))
    options = job.options(ctx.options)
    if job.persist is not None:  # override_settings_restore_afterwards: false keeps them, as in A1111
        fields, changes = job.persist
        title = job.request.checkpoint if "checkpoint" in fields else None
        selection.select(title, job.request.vae if "vae" in fields else None,
                         job.request.clip_skip if "clip_skip" in fields else None, changes)
    return build_response(job, result, model, options)


def router(ctx: AppContext, selection: ApiSelection, route_class: type) -> APIRouter:
    """The generation routes on ``ctx``."""
    api = APIRouter(route_class=route_class)

    @api.post("/sdapi/v1/txt2img", response_model=GenerationResponse, tags=["generation"])
    def txt2img(body: StableDiffusionTxt2ImgProcessingAPI) -> dict:
        """Make images from a prompt."""
        return run_prepared(ctx, selection, prepare(body, ctx.engine, selection, ctx.options))

    @api.post("/sdapi/v1/img2img", response_model=GenerationResponse, tags=["generation"])
    def img2img(body: StableDiffusionImg2ImgProcessingAPI) -> dict:
        """Redraw images; with ``mask``, only the white part of the mask (inpaint)."""
        return run_prepared(ctx, selection, prepare(body, ctx.engine, selection, ctx.options))

    @api.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["jobs"])
    def progress(skip_current_image: bool = Query(False, description="Leave out the live preview.")) -> dict:
        """Progress of the running job, whoever sent it, with a live preview."""
        ticket = ctx.queue.running
        if ticket is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": ProgressState(), "current_image": None,
                    "textinfo": None, "current_task": None}
        p = ticket.control.progress
        preview = None
        if not skip_current_image and p.preview is not None:
            preview = encode_base64_png(p.preview, "")
        state = ProgressState(
            skipped=ticket.control.skipped, interrupted=ticket.control.interrupted,
            stopping_generation=ticket.control.interrupted,
            job=ticket.description, job_count=p.job_count, job_timestamp=job_timestamp(ticket.started_at),
            job_no=p.job_no, sampling_step=p.sampling_step, sampling_steps=p.sampling_steps,
        )
        return {"progress": p.fraction, "eta_relative": p.eta_seconds or 0.0, "state": state,
                "current_image": preview, "textinfo": p.textinfo or None, "current_task": ticket.task_id}

    @api.post("/sdapi/v1/interrupt", tags=["jobs"])
    def interrupt() -> dict:
        """Stop the running job after its current step; finished images are kept."""
        ctx.queue.interrupt()
        return {}

    @api.post("/sdapi/v1/skip", tags=["jobs"])
    def skip() -> dict:
        """Drop the running job's current batch and go on with the next one."""
        ctx.queue.skip()
        return {}

    return api
