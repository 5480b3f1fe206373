"""Evaluation over HTTP: ``POST /sdapi/v1/evaluate`` queues a run and answers its id at once; ``GET
/sdapi/v1/evaluate/{id}`` gives its progress and, when done, the results; ``POST
/sdapi/v1/evaluate/{id}/interrupt`` (or the general ``/sdapi/v1/interrupt`` while it runs) stops it.
``POST /sdapi/v1/train/{id}/evaluate`` starts "Evaluate this run" for a finished training run (its saves against
the base model on its sample prompts; 409 while it has not finished).

The body is :class:`~pipelines.evaluation.runner.EvaluationSpec` (typed fields; a bad one is a 422 naming it).
Folders and files it names must lie inside the allowed folders (:func:`webui.evaluation_jobs.checked_spec`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from pipelines.evaluation.runner import EvaluationSpec
from webui.api.errors import StateConflict
from webui.api.routes_train import UNKNOWN_RUN, training_runs
from webui.context import AppContext
from webui.evaluation_jobs import EvaluationJob, RunNotFinished, evaluate_training_run, evaluation_jobs


class EvaluateStarted(BaseModel):
    id: str = Field(..., description="The job's id, for GET /sdapi/v1/evaluate/{id}.")
    state: str = Field(..., description="queued (or already running).")


class EvaluateTable(BaseModel):
    headers: list[str]
    rows: list[list[str]]


class EvaluateResults(BaseModel):
    table: EvaluateTable = Field(..., description="candidate x metric as shown: mean [95% interval], ★ best.")
    report: dict[str, Any] = Field(..., description="results.json: every figure, per image too.")
    messages: list[str] = Field(..., description="Metrics left out and why (missing weights or references).")
    chart: str = Field(..., description="Path of the bar chart on the server.")
    contact_sheets: list[str] = Field(..., description="Paths of the contact sheets (one per prompt).")
    generation_seconds: float
    scoring_seconds: float
    chart_image: str | None = Field(None, description="Base64 PNG of the chart (with include_images=true).")
    contact_sheet_images: list[str | None] = Field(default_factory=list,
                                                   description="Base64 PNGs of the sheets (include_images=true).")


class EvaluateStatus(BaseModel):
    id: str
    state: str = Field(..., description="queued, running, done, interrupted, cancelled or failed.")
    phase: str = Field(..., description="queued, generating, measuring or done.")
    fraction: float = Field(..., description="How much of the current phase is done, 0..1.")
    eta_seconds: float | None = Field(None, description="Seconds left in the current phase (None: not known yet).")
    textinfo: str = ""
    error: str | None = None
    folder: str | None = Field(None, description="The run's folder on the server (outputs/evaluations/<name>).")
    results: EvaluateResults | None = None


#: The answer for an id no evaluation job has (or one forgotten: only the last jobs are kept).
UNKNOWN_JOB: dict[int | str, dict] = {404: {"description": "No evaluation job has this id."}}


def router(ctx: AppContext, route_class: type) -> APIRouter:
    """The evaluation routes on ``ctx``."""
    api = APIRouter(route_class=route_class, tags=["evaluation"])
    jobs = evaluation_jobs(ctx)

    def find(job_id: str) -> EvaluationJob:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"id: no evaluation job {job_id!r}")
        return job

    @api.post("/sdapi/v1/evaluate", response_model=EvaluateStarted)
    def evaluate(body: EvaluationSpec) -> dict:
        """Queue an evaluation (candidates x prompts x seeds, then the metrics); answers its id at once."""
        job = jobs.start(body)
        return {"id": job.id, "state": job.state}

    @api.get("/sdapi/v1/evaluate/{job_id}", response_model=EvaluateStatus, responses=UNKNOWN_JOB)
    def evaluate_status(job_id: str, include_images: bool = Query(
            False, description="Add the chart and contact sheets as base64 PNGs.")) -> dict:
        """Progress of an evaluation and, when it is done, its results."""
        return find(job_id).status(include_images)

    @api.post("/sdapi/v1/evaluate/{job_id}/interrupt", response_model=EvaluateStatus, responses=UNKNOWN_JOB)
    def evaluate_interrupt(job_id: str) -> dict:
        """Stop an evaluation after its current step (or take it out of the queue if it waits)."""
        job = find(job_id)
        jobs.interrupt(job)
        return job.status()

    @api.post("/sdapi/v1/train/{run_id}/evaluate", response_model=EvaluateStarted,
              responses={**UNKNOWN_RUN, 409: {"description": "The training run has not finished or saved nothing."}})
    def train_run_evaluate(run_id: str) -> dict:
        """Queue an evaluation of a finished training run's saves against its base model (its sample prompts,
        the training images as the FID / KID reference); answers the evaluation's id."""
        run = training_runs(ctx).get(run_id)
        if run is None:
            raise HTTPException(404, f"id: no training run {run_id!r}")
        try:
            job = evaluate_training_run(ctx, run)
        except RunNotFinished as error:
            raise StateConflict("RunNotFinished", str(error)) from None
        return {"id": job.id, "state": job.state}

    return api
