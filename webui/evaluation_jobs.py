"""Evaluation runs as queued, interruptible jobs, shared by ``/sdapi/v1/evaluate`` and the Evaluate tab.

:func:`checked_spec` validates what a user asked for before anything is queued: the prompt file, the reference
images it names and the reference folder must lie inside the allowed folders (:func:`pipelines.paths.confine`:
the data dir, the models and outputs folders, ``--allowed-dir`` where the server has it), so must the source
folder of an img2img / upscale run; every candidate's checkpoint and settings must plan on the engine (its
upscaler must exist, for an upscale run). Errors are :class:`~pipelines.plan.RequestError` naming the
field (the API answers 422 with it; the tab shows it).

:class:`EvaluationJobs` keeps the jobs of one app: :meth:`EvaluationJobs.start` runs the evaluation in a
background thread through the app's one :class:`~webui.job_queue.JobQueue` (so it never runs beside a
generation) and returns at once; :meth:`EvaluationJob.status` is its progress (phase ``queued`` /
``generating`` / ``measuring`` / ``done``, the phase's fraction and ETA) and, when done, its results.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipelines.evaluation.prompts import BUILTIN, read_prompt_set
from pipelines.evaluation.report import CHART, CONTACT_DIR
from pipelines.evaluation.runner import EvaluationResult, EvaluationSpec, run_evaluation
from pipelines.evaluation.training import training_evaluation
from pipelines.job_control import JobControl, JobInterrupted
from pipelines.paths import AllowedRoots, confine
from pipelines.plan import RequestError
from pipelines.training.dataset import resolve_dataset_folder
from pipelines.training.runs import TrainingRun
from webui.context import AppContext
from webui.job_queue import JobCancelled, Ticket

#: How many finished jobs are remembered (their files stay on disk regardless).
KEPT_JOBS = 50


def _confined(text: str, roots: AllowedRoots, field_name: str) -> Path:
    try:
        return confine(text, roots, field=field_name)
    except ValueError as error:
        raise RequestError(field_name, str(error)) from None


def checked_spec(ctx: AppContext, spec: EvaluationSpec) -> EvaluationSpec:
    """``spec`` with its prompt file and reference folder as confined absolute paths, after checking that the
    prompts read, every reference image lies inside the allowed folders and every candidate plans on the
    engine. Raises :class:`RequestError` naming the field."""
    roots = ctx.engine.roots
    changes: dict[str, Any] = {}
    if not spec.prompts and spec.prompt_set != BUILTIN:
        path = _confined(spec.prompt_set, roots, "prompt_set")
        try:
            prompts = read_prompt_set(path)
        except (ValueError, OSError, UnicodeDecodeError) as error:
            raise RequestError("prompt_set", f"prompt_set: {str(error).removeprefix('prompt_file: ')}") from None
        for number, prompt in enumerate(prompts, 1):
            if prompt.reference is not None:
                _confined(str(prompt.reference), roots, f"prompt_set (line {number}, reference)")
        changes["prompt_set"] = str(path)
    for name in ("reference_dir", "source_dir"):
        text = getattr(spec, name)
        if text:
            folder = _confined(text, roots, name)
            if not folder.is_dir():
                raise RequestError(name, f"{name}: {text!r} is not a folder")
            changes[name] = str(folder)
    spec = spec.model_copy(update=changes)
    try:
        prompts = spec.prompt_list()
    except ValueError as error:  # img2img / upscale without sources
        raise RequestError("source_dir", str(error)) from None
    if not prompts:
        raise RequestError("prompts", "prompts: no prompt to evaluate (give prompts or a prompt_set)")
    for index, candidate in enumerate(spec.candidates):
        where = f"candidates[{index}]"
        if spec.mode == "upscale":
            try:
                ctx.engine.upscalers.find(candidate.upscaler or "")
            except LookupError:
                raise RequestError(f"{where}.upscaler", f"{where}.upscaler: no upscaler named "
                                   f"{candidate.upscaler!r}; choose one of "
                                   f"{', '.join(ctx.engine.upscalers.names)}") from None
            continue
        try:
            ctx.engine.plan(spec.request(candidate, prompts[0], spec.seeds[0]))
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise RequestError(f"{where}.settings", f"{where}.settings: {problems}") from None
        except RequestError as error:
            raise RequestError(f"{where}.{error.field}", f"{where}.{error}") from None
    return spec


@dataclass
class EvaluationJob:
    """One evaluation: queued, running, then ``done`` / ``interrupted`` / ``failed`` / ``cancelled``."""

    id: str
    spec: EvaluationSpec
    control: JobControl = field(default_factory=JobControl)
    state: str = "queued"
    ticket: Ticket | None = None
    result: EvaluationResult | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def folder(self) -> Path | None:
        return self.result.folder if self.result is not None else None

    def progress(self) -> dict[str, Any]:
        """Phase, the phase's fraction done (0..1), its ETA in seconds (None when unknown) and the text line."""
        if self.state == "queued":
            return {"phase": "queued", "fraction": 0.0, "eta_seconds": None, "textinfo": "waiting in the queue"}
        if self.state != "running":
            return {"phase": "done", "fraction": 1.0, "eta_seconds": 0.0, "textinfo": self.state}
        p = self.control.progress
        phase = "measuring" if p.textinfo.startswith("Evaluation: measuring") else "generating"
        if p.sampling_steps:
            fraction = p.fraction
        else:
            fraction = min(p.job_no / p.job_count, 1.0) if p.job_count else 0.0
        elapsed = time.monotonic() - p.started_at
        eta = elapsed / fraction - elapsed if fraction > 0 else None
        return {"phase": phase, "fraction": fraction, "eta_seconds": eta, "textinfo": p.textinfo}

    def status(self, include_images: bool = False) -> dict[str, Any]:
        """What ``GET /sdapi/v1/evaluate/{id}`` answers."""
        answer: dict[str, Any] = {"id": self.id, "state": self.state, **self.progress(), "error": self.error,
                                  "folder": str(self.folder) if self.folder else None, "results": None}
        result = self.result
        if result is not None and result.report is not None:
            headers, rows = result.report.table()
            chart = result.folder / CHART
            sheets = sorted((result.folder / CONTACT_DIR).glob("*.png"))
            answer["results"] = {
                "table": {"headers": headers, "rows": rows}, "report": result.report.to_json(),
                "messages": result.messages, "chart": str(chart), "contact_sheets": [str(s) for s in sheets],
                "generation_seconds": result.generation_seconds, "scoring_seconds": result.scoring_seconds,
                "chart_image": _b64(chart) if include_images else None,
                "contact_sheet_images": [_b64(s) for s in sheets] if include_images else [],
            }
        return answer


def _b64(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


class EvaluationJobs:
    """The evaluation jobs of one app, by id."""

    def __init__(self, ctx: AppContext):
        self._ctx = ctx
        self._lock = threading.Lock()
        self._jobs: dict[str, EvaluationJob] = {}
        self._ids = itertools.count(1)

    def start(self, spec: EvaluationSpec) -> EvaluationJob:
        """Check ``spec`` (RequestError naming the field), queue it and return the job at once."""
        spec = checked_spec(self._ctx, spec)
        number = next(self._ids)
        job_id = f"eval-{number}"
        if not spec.name:  # two runs started in the same second get folders of their own
            spec = spec.model_copy(update={"name": f"{datetime.now():%Y%m%d-%H%M%S}-{number}"})
        job = EvaluationJob(job_id, spec)
        with self._lock:
            self._jobs[job_id] = job
            finished = [key for key, old in self._jobs.items() if old.finished.is_set()]
            for key in finished[:max(0, len(self._jobs) - KEPT_JOBS)]:
                del self._jobs[key]
        threading.Thread(target=self._work, args=(job,), name=f"evaluation-{number}", daemon=True).start()
        return job

    def _work(self, job: EvaluationJob) -> None:
        ctx = self._ctx

        def on_ticket(ticket: Ticket) -> None:
            job.ticket = ticket

        def run(control: JobControl) -> EvaluationResult:
            job.state = "running"
            return run_evaluation(ctx.engine, job.spec, control)

        description = f"evaluation: {len(job.spec.candidates)} candidate(s)"
        try:
            job.result = ctx.queue.run(run, source="evaluation", description=description, control=job.control,
                                       on_ticket=on_ticket)
            job.state = "interrupted" if job.result.interrupted else "done"
        except JobCancelled:
            job.state = "cancelled"
        except JobInterrupted:
            job.state = "interrupted"
        except Exception as error:  # kept for the status answer; the job thread has no one else to tell
            job.state, job.error = "failed", f"{type(error).__name__}: {error}"
        finally:
            job.finished.set()

    def get(self, job_id: str) -> EvaluationJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def interrupt(self, job: EvaluationJob) -> None:
        """Stop a running job after its current step, or take a waiting one out of the queue."""
        job.control.interrupt()
        if job.ticket is not None:
            self._ctx.queue.cancel(job.ticket)

    def stop_all(self) -> None:
        """Interrupt every job (on shutdown)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            self.interrupt(job)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all for every job to finish; True when every one has."""
        deadline = time.monotonic() + timeout
        with self._lock:
            jobs = list(self._jobs.values())
        return all(job.finished.wait(max(0.0, deadline - time.monotonic())) for job in jobs)


#: The states of a training run whose saves can be evaluated.
FINISHED_TRAINING = ("done", "stopped")


class RunNotFinished(ValueError):
    """A training run still queued or running (or failed before any save): nothing to evaluate yet."""


def training_run_spec(ctx: AppContext, run: TrainingRun) -> EvaluationSpec:
    """"Evaluate this run": the run's saves against its base model on its sample prompts, the training images
    as the FID / KID reference (:func:`pipelines.evaluation.training.training_evaluation`). Raises
    :class:`RunNotFinished` while the run has not finished or saved nothing."""
    saves = list(run.state.saves) if run.state is not None else []
    if run.status not in FINISHED_TRAINING or not saves:
        raise RunNotFinished(f"id: training run {run.id} is {run.status}"
                             + ("" if saves else " and has saved nothing")
                             + f"; its saves can be evaluated once it is {' or '.join(FINISHED_TRAINING)}")
    try:
        dataset: Path | None = resolve_dataset_folder(run.settings.dataset, list(ctx.engine.roots.folders))
    except ValueError:  # moved or deleted since: no FID / KID reference
        dataset = None
    return training_evaluation(run.settings, saves, ctx.engine.paths.model_dirs("lora"), dataset=dataset)


def evaluate_training_run(ctx: AppContext, run: TrainingRun) -> EvaluationJob:
    """Queue "Evaluate this run" for ``run``; RunNotFinished, or RequestError naming the field."""
    return evaluation_jobs(ctx).start(training_run_spec(ctx, run))


_REGISTRIES: weakref.WeakKeyDictionary[AppContext, EvaluationJobs] = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def evaluation_jobs(ctx: AppContext) -> EvaluationJobs:
    """The app's evaluation jobs (one registry per :class:`AppContext`, made when first asked for)."""
    with _REGISTRIES_LOCK:
        jobs = _REGISTRIES.get(ctx)
        if jobs is None:
            jobs = _REGISTRIES[ctx] = EvaluationJobs(ctx)
            ctx.add_background_runs(jobs)
        return jobs
