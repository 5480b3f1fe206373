"""Running a UI job through the shared queue while streaming its progress to the browser.

The job runs in a worker thread (the queue runs jobs in the caller's thread, one at a time for UI and
API together); the Gradio handler is a generator that polls the job's :class:`JobControl` and yields
queue position, step x/y, ETA and the live preview until the job ends.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image

from pipelines.job_control import JobControl
from pipelines.processing import GenerationResult
from pipelines.request import GenerationRequest
from webui.context import AppContext
from webui.job_queue import JobCancelled, JobQueue, Ticket

#: How often the browser hears about a running job, in seconds.
POLL_SECONDS = 0.25


@dataclass
class Session:
    """One user's state for one generation tab; kept in ``gr.State`` so that every user has their own."""

    ticket: Ticket | None = None
    images: list[str] = field(default_factory=list)  # files shown in the gallery, infotext embedded
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    selected: int = 0
    job_timestamp: str = ""
    #: Index of the first image in ``images`` (1 when the batch's grid is shown first, as A1111's
    #: index_of_first_image).
    first_image: int = 0

    def stop(self, queue: JobQueue) -> None:
        """Interrupt this user's job if it runs, or take it out of the queue if it waits."""
        if self.ticket is not None:
            queue.cancel(self.ticket)

    def skip(self, queue: JobQueue) -> None:
        """Drop the batch being sampled and go on with the next one (only if this user's job runs)."""
        ticket = self.ticket
        if ticket is not None and queue.running is ticket:
            ticket.control.skip()

    @property
    def selected_infotext(self) -> str:
        if not self.infotexts:
            return ""
        return self.infotexts[min(self.selected, len(self.infotexts) - 1)]

    @property
    def selected_image(self) -> str | None:
        if not self.images:
            return None
        return self.images[min(self.selected, len(self.images) - 1)]


@dataclass
class CustomJob:
    """A tab's own job in place of ``Engine.generate(request)`` (img2img's Batch): ``run(control)`` does the work
    inside the queue and returns what the gallery shows; ``notes(result)`` are the lines under it; ``request``
    stands for the job (its prompt, its settings) where one is needed."""

    request: GenerationRequest
    run: Callable[[JobControl], GenerationResult]
    notes: Callable[[GenerationResult], list[str]]
    description: str = ""


@dataclass
class JobUpdate:
    """What the browser shows about a job at one moment; ``result`` or ``error`` is set at the end."""

    progress_html: str
    preview: Image.Image | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None


def progress_html(fraction: float, text: str) -> str:
    """The progress bar: a filled bar with a line of text (step x/y, ETA or queue position) over it."""
    percent = max(0.0, min(fraction, 1.0)) * 100
    return (f'<div class="sdui-progress"><div class="sdui-progress-bar" style="width:{percent:.1f}%"></div>'
            f'<span class="sdui-progress-text">{html.escape(text)}</span></div>')


#: How the queue lines name a running job that is not this browser's, by the source it was queued with.
JOB_NAMES = {"api": "an API job", "train": "a training run", "evaluation": "an evaluation run"}


def job_name(ticket: Ticket) -> str:
    """"an API job", "a training run", "an evaluation run", or "another job" (another browser's)."""
    return JOB_NAMES.get(ticket.source, "another job")


def queue_status_html(ctx: AppContext, own: Iterable[Session]) -> str:
    """The line above the tabs about the running job when it is not one of ``own`` (an API job, another
    browser's job, with its step and how many wait); empty when nothing runs. Cheap enough for a timer."""
    running = ctx.queue.running
    if running is None or any(session.ticket is running for session in own):
        return ""
    progress = running.control.progress
    name = job_name(running)
    text = f"{name[0].upper()}{name[1:]} is running"
    if progress.sampling_steps:
        text += f": step {progress.sampling_step}/{progress.sampling_steps}"
        if progress.job_count > 1:
            text += f", batch {min(progress.job_no + 1, progress.job_count)}/{progress.job_count}"
    waiting = ctx.queue.waiting
    where = ctx.queue.where(running)
    if where:
        text += f" on {where}"
    if waiting:
        text += f" · {waiting} waiting"
    return f"<div class='sdui-queue-status'>{html.escape(text)}</div>"


def _describe(ctx: AppContext, ticket: Ticket | None) -> tuple[float, str, Image.Image | None]:
    if ticket is None:
        return 0.0, "Starting...", None
    position = ctx.queue.position(ticket)
    if position > 0:
        running = ctx.queue.running
        who = f" ({job_name(running)} is running)" if running and running.source != "ui" else ""
        return 0.0, f"In queue: position {position}{who}", None
    progress = ticket.control.progress
    if not progress.sampling_steps:
        where = ctx.queue.where(ticket)
        return 0.0, "Loading model..." + (f" on {where}" if where else ""), None
    eta = progress.eta_seconds
    text = f"Step {progress.sampling_step}/{progress.sampling_steps}"
    if progress.job_count > 1:
        text = f"Batch {progress.job_no + 1}/{progress.job_count}, " + text
    if eta is not None:
        text += f" · ETA {eta:.0f}s" if eta >= 1 else " · ETA <1s"
    where = ctx.queue.where(ticket)
    if where:
        text += f" · on {where}"
    return progress.fraction, text, progress.preview


def run_job(ctx: AppContext, session: Session, request: GenerationRequest,
            custom: CustomJob | None = None) -> Iterator[JobUpdate]:
    """Queue ``request`` (or ``custom``'s work) behind other UI and API jobs, yield progress while it waits and
    runs, then the result.

    If the browser goes away (the generator is closed), the job is cancelled.
    """
    control = JobControl(preview_every=ctx.options.show_progress_every_n_steps)
    outcome: dict[str, object] = {}
    ready = threading.Event()

    def on_ticket(ticket: Ticket) -> None:
        session.ticket = ticket
        ready.set()

    def work() -> None:
        try:
            job = custom.run if custom is not None else (
                lambda job_control: ctx.engine.generate(request, control=job_control, options=ctx.options))
            description = custom.description if custom is not None and custom.description else \
                f"{request.mode}: {request.prompt[:40]}"
            outcome["result"] = ctx.queue.run(job, source="ui", description=description, control=control,
                                              on_ticket=on_ticket, pooled=True)
        except BaseException as error:  # handed to the browser below, not swallowed
            outcome["error"] = error
        finally:
            ready.set()

    worker = threading.Thread(target=work, name="ui-job", daemon=True)
    worker.start()
    ready.wait()
    try:
        while worker.is_alive():
            fraction, text, preview = _describe(ctx, session.ticket)
            yield JobUpdate(progress_html(fraction, text), preview)
            worker.join(POLL_SECONDS)
    except GeneratorExit:
        session.stop(ctx.queue)
        raise
    finally:
        if not worker.is_alive():
            session.ticket = None
    error = outcome.get("error")
    if isinstance(error, JobCancelled):
        yield JobUpdate(progress_html(0, "Cancelled before it started"), error=error)
    elif error is not None:
        yield JobUpdate("", error=error)  # type: ignore[arg-type]
    else:
        yield JobUpdate("", result=outcome["result"])  # type: ignore[arg-type]
