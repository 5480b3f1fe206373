"""The one job queue that the UI and the API share: first come, first served, one job on the device at a time.

A job runs in the thread of whoever queued it (:meth:`JobQueue.run`), or, for a caller on the event loop
(the API), waits without holding any thread and runs in a worker thread only once its turn comes
(:meth:`JobQueue.run_async`); the queue only decides when. At most ``max_waiting`` jobs wait: one more is
refused with :class:`QueueFull`. Interrupt, skip and progress reach the running job through its
:class:`~pipelines.job_control.JobControl`.

With an engine pool (``--workers`` / ``--ray-address``, :mod:`webui.pool`) the queue stays one line, first come
first served, but up to ``slots`` generation jobs (queued with ``pooled=True``) run at once, one per replica;
other jobs (model loads, merges, extras: the front process's own engine) still run one at a time.
``placement`` names the replicas a job runs on, for the queue line.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.to_thread

from pipelines.job_control import JobControl, Progress

T = TypeVar("T")


class JobCancelled(Exception):
    """A queued job was cancelled before it started."""


class QueueFull(Exception):
    """The queue already holds its most waiting jobs; ``retry_after`` estimates when a place frees."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full: {waiting} jobs are waiting (--queue-size); try again later")
        self.retry_after = retry_after


@dataclass
class Ticket:
    """A job waiting in, or running from, the queue."""

    id: int
    source: str  # "ui", "api", "train" or "evaluation"
    description: str
    control: JobControl
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    cancelled: bool = False
    #: A1111's ``id_task`` ("task(...)"): the client's ``force_task_id``, else made from ``id``.
    task_id: str = ""
    #: A generation job an engine pool runs (several may run at once); else a job of the front's own engine.
    pooled: bool = False

    def __post_init__(self) -> None:
        if not self.task_id:
            self.task_id = f"task({self.source}-{self.id})"


#: How many finished task ids the queue remembers (for ``POST /internal/progress``'s ``completed``).
FINISHED_TASKS_KEPT = 1000
#: How often a job waiting on the event loop looks whether its turn has come.
ASYNC_POLL_S = 0.02


class JobQueue:
    """First come, first served; one job runs at a time. The job runs in the caller's thread."""

    def __init__(self, max_waiting: int | None = None, *, slots: int = 1,
                 placement: Callable[[JobControl], str] | None = None):
        #: Most jobs that may wait (None: no limit).
        self.max_waiting = max_waiting
        #: Most pooled jobs that run at once (an engine pool's replicas); 1: one job at a time, of any kind.
        self.slots = max(1, slots)
        self._placement = placement
        self._durations: deque[float] = deque(maxlen=20)
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []  # in the order they started
        self._ids = itertools.count(1)
        self.finished_jobs = 0
        self._finished_tasks: deque[str] = deque(maxlen=FINISHED_TASKS_KEPT)

    def _enqueue(self, source: str, description: str, control: JobControl | None, task_id: str | None,
                 on_ticket: Callable[[Ticket], None] | None, pooled: bool = False) -> Ticket:
        ticket = Ticket(next(self._ids), source, description, control or JobControl(), task_id=task_id or "",
                        pooled=pooled)
        with self._cond:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(ticket)
        if on_ticket is not None:
            on_ticket(ticket)
        return ticket

    def _retry_after(self) -> int:
        """Seconds until a place in line is likely to free: the mean duration of recent jobs (1 s at least)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(600, math.ceil(mean)))

    def _try_start(self, ticket: Ticket) -> bool:
        """Under the lock: start ``ticket`` if its turn has come; JobCancelled if it was cancelled."""
        if ticket.cancelled:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._cond.notify_all()
            raise JobCancelled(f"job {ticket.id} was cancelled before it started")
        if self._waiting[0] is not ticket or not self._room_for(ticket):
            return False
        self._waiting.popleft()
        self._running.append(ticket)
        ticket.started_at = time.time()
        return True

    def _room_for(self, ticket: Ticket) -> bool:
        """Under the lock: whether ``ticket`` may start beside the running jobs."""
        if self.slots == 1:
            return not self._running
        if ticket.pooled:
            return sum(t.pooled for t in self._running) < self.slots
        return not any(not t.pooled for t in self._running)

    def _leave(self, ticket: Ticket) -> None:
        """A waiting job gives up its place (its caller went away)."""
        with self._cond:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def _finish(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._running:
                self._running.remove(ticket)
            self.finished_jobs += 1
            self._finished_tasks.append(ticket.task_id)
            if ticket.started_at is not None:
                self._durations.append(time.time() - ticket.started_at)
            self._cond.notify_all()

    def run(self, job: Callable[[JobControl], T], *, source: str, description: str = "",
            control: JobControl | None = None, on_ticket: Callable[[Ticket], None] | None = None,
            task_id: str | None = None, pooled: bool = False) -> T:
        """Wait for our turn, then run ``job(control)``. Raises JobCancelled if cancelled while waiting,
        QueueFull when ``max_waiting`` jobs already wait.

        ``task_id`` names the job as A1111's ``id_task`` does (default: made from the ticket number).
        ``pooled``: a generation job (``Engine.generate``), which an engine pool runs beside others."""
        ticket = self._enqueue(source, description, control, task_id, on_ticket, pooled)
        try:
            with self._cond:
                while not self._try_start(ticket):
                    self._cond.wait()
        except BaseException:
            self._leave(ticket)
            raise
        try:
            return job(ticket.control)
        finally:
            self._finish(ticket)

    async def run_async(self, job: Callable[[JobControl], T], *, source: str, description: str = "",
                        control: JobControl | None = None, on_ticket: Callable[[Ticket], None] | None = None,
                        task_id: str | None = None, pooled: bool = False) -> T:
        """:meth:`run` for a caller on the event loop: waiting holds no thread; ``job`` runs in a worker
        thread once its turn comes (and runs to its end even if the caller goes away meanwhile)."""
        ticket = self._enqueue(source, description, control, task_id, on_ticket, pooled)
        try:
            while True:
                with self._cond:
                    if self._try_start(ticket):
                        break
                await anyio.sleep(ASYNC_POLL_S)
        except BaseException:
            self._leave(ticket)
            raise
        try:
            return await anyio.to_thread.run_sync(job, ticket.control)
        finally:
            self._finish(ticket)

    def position(self, ticket: Ticket) -> int:
        """0 while running, 1 for next in line, ...; -1 when not in the queue."""
        with self._cond:
            if ticket in self._running:
                return 0
            try:
                return list(self._waiting).index(ticket) + 1
            except ValueError:
                return -1

    def cancel(self, ticket: Ticket) -> bool:
        """Take a waiting job out of the queue, or interrupt it if it is running."""
        with self._cond:
            if ticket in self._running:
                ticket.control.interrupt()
                return True
            if ticket in self._waiting:
                ticket.cancelled = True
                self._cond.notify_all()
                return True
            return False

    @property
    def running(self) -> Ticket | None:
        """The running job (with an engine pool: the one that started first)."""
        with self._cond:
            return self._running[0] if self._running else None

    @property
    def running_tickets(self) -> list[Ticket]:
        """Every running job, in the order they started (several only with an engine pool)."""
        with self._cond:
            return list(self._running)

    def where(self, ticket: Ticket) -> str:
        """The engine pool's replicas the job runs on ("" without a pool, or before it reaches one)."""
        return self._placement(ticket.control) if self._placement is not None else ""

    def task_state(self, task_id: str) -> tuple[Ticket | None, int, bool]:
        """(the running ticket if it is ``task_id``, else None; its place in line, 1-based, 0 if not waiting;
        whether a job of that id has finished)."""
        with self._cond:
            running = next((t for t in self._running if t.task_id == task_id), None)
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
        """Interrupt the running job (the Interrupt button, POST /sdapi/v1/interrupt); every running one with
        an engine pool."""
        for ticket in self.running_tickets:
            ticket.control.interrupt()

    def skip(self) -> None:
        """Skip the running job's current batch (every running job's, with an engine pool)."""
        for ticket in self.running_tickets:
            ticket.control.skip()
