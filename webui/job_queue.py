"""The one job queue that the UI and the API share: first come, first served, one job on the device at a time.

A job runs in the thread of whoever queued it; the queue only decides when. Interrupt, skip and progress
reach the running job through its :class:`~pipelines.job_control.JobControl`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pipelines.job_control import JobControl, Progress

T = TypeVar("T")


class JobCancelled(Exception):
    """A queued job was cancelled before it started."""


@dataclass
class Ticket:
    """A job waiting in, or running from, the queue."""

    id: int
    source: str  # "ui" or "api"
    description: str
    control: JobControl
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    cancelled: bool = False
    #: A1111's ``id_task`` ("task(...)"): the client's ``force_task_id``, else made from ``id``.
    task_id: str = ""

    def __post_init__(self) -> None:
        if not self.task_id:
            self.task_id = f"task({self.source}-{self.id})"


#: How many finished task ids the queue remembers (for ``POST /internal/progress``'s ``completed``).
FINISHED_TASKS_KEPT = 1000


class JobQueue:
    """First come, first served; one job runs at a time. The job runs in the caller's thread."""

    def __init__(self):
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: Ticket | None = None
        self._ids = itertools.count(1)
        self.finished_jobs = 0
        self._finished_tasks: deque[str] = deque(maxlen=FINISHED_TASKS_KEPT)

    def run(self, job: Callable[[JobControl], T], *, source: str, description: str = "",
            control: JobControl | None = None, on_ticket: Callable[[Ticket], None] | None = None,
            task_id: str | None = None) -> T:
        """Wait for our turn, then run ``job(control)``. Raises JobCancelled if cancelled while waiting.

        ``task_id`` names the job as A1111's ``id_task`` does (default: made from the ticket number)."""
        ticket = Ticket(next(self._ids), source, description, control or JobControl(), task_id=task_id or "")
        if on_ticket is not None:
            on_ticket(ticket)
        with self._cond:
            self._waiting.append(ticket)
            while not ticket.cancelled and (self._running is not None or self._waiting[0] is not ticket):
                self._cond.wait()
            self._waiting.remove(ticket)
            if ticket.cancelled:
                self._cond.notify_all()
                raise JobCancelled(f"job {ticket.id} was cancelled before it started")
            self._running = ticket
            ticket.started_at = time.time()
        try:
            return job(ticket.control)
        finally:
            with self._cond:
                self._running = None
                self.finished_jobs += 1
                self._finished_tasks.append(ticket.task_id)
                self._cond.notify_all()

    def position(self, ticket: Ticket) -> int:
        """0 while running, 1 for next in line, ...; -1 when not in the queue."""
        with self._cond:
            if self._running is ticket:
                return 0
            try:
                return list(self._waiting).index(ticket) + 1
            except ValueError:
                return -1

    def cancel(self, ticket: Ticket) -> bool:
        """Take a waiting job out of the queue, or interrupt it if it is running."""
        with self._cond:
            if self._running is ticket:
                ticket.control.interrupt()
                return True
            if ticket in self._waiting:
                ticket.cancelled = True
                self._cond.notify_all()
                return True
            return False

    @property
    def running(self) -> Ticket | None:
        with self._cond:
            return self._running

    def task_state(self, task_id: str) -> tuple[Ticket | None, int, bool]:
        """(the running ticket if it is ``task_id``, else None; its place in line, 1-based, 0 if not waiting;
        whether a job of that id has finished)."""
        with self._cond:
            running = self._running if self._running is not None and self._running.task_id == task_id else None
            place = next((i for i, t in enumerate(self._waiting, 1) if t.task_id == task_id), 0)
            return running, place, task_id in self._finished_tasks

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def progress(self) -> Progress | None:
        """The running job's progress, whoever sent it."""
        running = self.running
        return running.control.progress if running else None

    def interrupt(self) -> None:
        """Interrupt the running job (the Interrupt button, POST /sdapi/v1/interrupt)."""
        running = self.running
        if running:
            running.control.interrupt()

    def skip(self) -> None:
        """Skip the running job's current batch."""
        running = self.running
        if running:
            running.control.skip()
