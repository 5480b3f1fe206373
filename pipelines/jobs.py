"""Job control: progress reports, live previews, interrupt and skip from another thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image


class JobInterrupted(Exception):
    """The user pressed Interrupt: stop the whole job, keep what finished."""


class BatchSkipped(Exception):
    """The user pressed Skip: drop the batch being sampled, go on with the next one."""


@dataclass
class Progress:
    """A snapshot of where a job is. ``preview`` is a cheap image of the current latents, when made."""

    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started_at: float = field(default_factory=time.monotonic)
    preview: Image.Image | None = None
    textinfo: str = ""

    @property
    def fraction(self) -> float:
        """Progress of the whole job in 0..1."""
        if not self.job_count or not self.sampling_steps:
            return 0.0
        done = self.job_no + self.sampling_step / self.sampling_steps
        return min(done / self.job_count, 1.0)

    @property
    def eta_seconds(self) -> float | None:
        """Estimated seconds left, from the time spent so far."""
        fraction = self.fraction
        if fraction <= 0:
            return None
        elapsed = time.monotonic() - self.started_at
        return elapsed / fraction - elapsed


ProgressCallback = Callable[[Progress], None]


class JobControl:
    """Shared between the thread running a job and the threads that watch or stop it.

    The engine calls :meth:`check` at the start of every sampling step, so an interrupt or skip takes
    effect within one step.
    """

    def __init__(self, on_progress: ProgressCallback | None = None, preview_every: int = 0):
        self._interrupted = threading.Event()
        self._skipped = threading.Event()
        self._lock = threading.Lock()
        self._progress = Progress()
        self.on_progress = on_progress
        #: Make a preview every N sampling steps; 0 turns previews off.
        self.preview_every = preview_every

    # --- called from other threads
    def interrupt(self) -> None:
        """Stop the job at the next step; finished images are kept."""
        self._interrupted.set()

    def skip(self) -> None:
        """Drop the current batch at the next step and continue with the next one."""
        self._skipped.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    @property
    def progress(self) -> Progress:
        """A copy of the latest progress snapshot."""
        with self._lock:
            return Progress(**vars(self._progress))

    # --- called by the engine
    def check(self) -> None:
        """Raise if the user asked to stop."""
        if self._interrupted.is_set():
            raise JobInterrupted()
        if self._skipped.is_set():
            self._skipped.clear()
            raise BatchSkipped()

    def start(self, job_count: int, sampling_steps: int) -> None:
        with self._lock:
            self._progress = Progress(job_count=job_count, sampling_steps=sampling_steps)
        self._notify()

    def update(self, *, job_no: int | None = None, step: int | None = None, steps: int | None = None,
               preview: Image.Image | None = None, textinfo: str | None = None) -> None:
        with self._lock:
            p = self._progress
            if job_no is not None:
                p.job_no = job_no
            if step is not None:
                p.sampling_step = step
            if steps is not None:
                p.sampling_steps = steps
            if preview is not None:
                p.preview = preview
            if textinfo is not None:
                p.textinfo = textinfo
        self._notify()

    def wants_preview(self, step: int) -> bool:
        return self.preview_every > 0 and step % self.preview_every == 0

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)
