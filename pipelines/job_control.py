"""Job control: progress reports, live previews, interrupt and skip from another thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class JobStopped(Exception):
    """Interrupt or Skip. The loop that stops sets ``latents`` to its best estimate of the finished image
    at that point (and ``model`` to the model whose VAE decodes it, when not the job's first one), so the
    batch's images are kept, decoded from them, as A1111 does."""

    latents: Any = None
    model: Any = None


class JobInterrupted(JobStopped):
    """The user pressed Interrupt: stop the whole job; the current batch is decoded from its latents."""


class BatchSkipped(JobStopped):
    """The user pressed Skip: stop sampling the current batch (decoded from its latents), go on with the next."""


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
        # The batch being sampled was dropped by Skip; reported until the next batch starts.
        self._batch_skipped = False
        self._lock = threading.Lock()
        self._progress = Progress()
        # (batches before the current job, batches in all, text) while a script runs several jobs as one
        self._series: tuple[int, int, str] | None = None
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
    def skipped(self) -> bool:
        """Skip was pressed: until the next batch starts (as A1111's ``state.skipped`` reads)."""
        return self._skipped.is_set() or self._batch_skipped

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
            with self._lock:
                self._batch_skipped = True
                self._skipped.clear()
            raise BatchSkipped()

    def start(self, job_count: int, sampling_steps: int) -> None:
        """A job of ``job_count`` batches begins; inside a series it continues the series' count instead."""
        with self._lock:
            if self._series is None:
                self._progress = Progress(job_count=job_count, sampling_steps=sampling_steps)
            else:
                offset, total, text = self._series
                p = self._progress
                p.job_no, p.job_count, p.sampling_step, p.sampling_steps = offset, total, 0, sampling_steps
                p.textinfo = text
        self._notify()

    # --- called by a selectable script that runs several jobs (X/Y/Z plot, prompt matrix, ...)
    def start_series(self, batch_count: int, textinfo: str = "") -> None:
        """Report the next jobs as one: progress, ETA and ``job_no``/``job_count`` count ``batch_count``
        batches in all, so a plot of 12 images reads "image 5 of 12" rather than "batch 1 of 1" twelve times."""
        with self._lock:
            self._series = (0, batch_count, textinfo)
            self._progress = Progress(job_count=batch_count, textinfo=textinfo)
        self._notify()

    def series_position(self, batches_done: int, textinfo: str = "") -> None:
        """The next job of the series starts after ``batches_done`` batches."""
        with self._lock:
            if self._series is None:
                raise RuntimeError("series_position() called before start_series()")
            total = self._series[1]
            self._series = (batches_done, total, textinfo)
            self._progress.job_no = batches_done
            self._progress.textinfo = textinfo
        self._notify()

    def end_series(self) -> None:
        """Back to reporting each job on its own."""
        with self._lock:
            if self._series is not None:
                self._progress.job_no = self._progress.job_count
            self._series = None
        self._notify()

    def update(self, *, job_no: int | None = None, step: int | None = None, steps: int | None = None,
               preview: Image.Image | None = None, textinfo: str | None = None) -> None:
        with self._lock:
            p = self._progress
            if job_no is not None:
                job_no += self._series[0] if self._series else 0
                if job_no != p.job_no:
                    self._batch_skipped = False
                p.job_no = job_no
            if step is not None:
                p.sampling_step = step
            if steps is not None:
                p.sampling_steps = steps
            if preview is not None:
                p.preview = preview
            if textinfo is not None:
                p.textinfo = f"{self._series[2]} · {textinfo}" if self._series and self._series[2] else textinfo
        self._notify()

    def wants_preview(self, step: int) -> bool:
        return self.preview_every > 0 and step % self.preview_every == 0

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)
