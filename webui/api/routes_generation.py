"""txt2img, img2img, and watching or stopping the running job (progress, interrupt, skip).

Every job goes through the shared queue (``ctx.queue``), so an API job never runs beside a UI job.
The generation routes are ``async``: a job waits for its turn on the event loop, holding no thread, and
runs in a worker thread only once its turn comes; so however many jobs wait, the server's threads stay
free and progress, interrupt and skip answer at once. A full queue answers 503 with ``Retry-After``.
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from pipelines.images.saving import encode_base64_png
from pipelines.job_control import JobControl
from pipelines.models.weights import ModelFileError
from webui.api.errors import StateConflict, model_file_error, model_file_loc
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

#: The answers of a queued job besides its result and the common errors.
QUEUED: dict[int | str, dict] = {
    409: {"description": "The job was cancelled before it started, or the selected checkpoint or VAE (not one "
                         "the request chose) cannot be used."},
    503: {"description": "The queue is full (--queue-size); try again after Retry-After seconds."},
}


async def run_prepared(ctx: AppContext, selection: ApiSelection, job: PreparedJob) -> dict:
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
        model = ctx.model_of(result)
        if job.checkpoint_override and model is not None:
            selection.loaded_for_override(model.file.title)
        return result, model

    description = f"{job.request.mode}: {job.request.prompt[:60]}"
    try:
        result, model = await ctx.queue.run_async(work, source="api", description=description, control=control,
                                                  task_id=job.parameters.get("force_task_id"), pooled=True)
    except ModelFileError as error:
        loc = model_file_loc(error, job.parameters.get("override_settings") or {})
        if loc in (("sd_model_checkpoint",), ("sd_vae",)):  # not chosen by this request: the selected one
            raise StateConflict("ModelFileError", f"the selected {loc[0]} cannot be used: {error}; choose "
                                                  "another with POST /sdapi/v1/options") from None
        raise model_file_error(error, loc) from None
    options = job.options(ctx.options)
    if job.persist is not None:  # override_settings_restore_afterwards: false keeps them, as in A1111
        fields, changes = job.persist
        title = job.request.checkpoint if "checkpoint" in fields else None
        await run_in_threadpool(selection.select, title, job.request.vae if "vae" in fields else None,
                                job.request.clip_skip if "clip_skip" in fields else None, changes)
    return await run_in_threadpool(build_response, job, result, model, options)


def router(ctx: AppContext, selection: ApiSelection, route_class: type) -> APIRouter:
    """The generation routes on ``ctx``."""
    api = APIRouter(route_class=route_class)

    @api.post("/sdapi/v1/txt2img", response_model=GenerationResponse, tags=["generation"], responses=QUEUED)
    async def txt2img(body: StableDiffusionTxt2ImgProcessingAPI) -> dict:
        """Make images from a prompt."""
        job = await run_in_threadpool(prepare, body, ctx.engine, selection, ctx.options)
        return await run_prepared(ctx, selection, job)

    @api.post("/sdapi/v1/img2img", response_model=GenerationResponse, tags=["generation"], responses=QUEUED)
    async def img2img(body: StableDiffusionImg2ImgProcessingAPI) -> dict:
        """Redraw images; with ``mask``, only the white part of the mask (inpaint)."""
        job = await run_in_threadpool(prepare, body, ctx.engine, selection, ctx.options)
        return await run_prepared(ctx, selection, job)

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
    async def interrupt() -> dict:
        """Stop the running job after its current step; finished images are kept."""
        ctx.queue.interrupt()
        return {}

    @api.post("/sdapi/v1/skip", tags=["jobs"])
    async def skip() -> dict:
        """Drop the running job's current batch and go on with the next one."""
        ctx.queue.skip()
        return {}

    return api
