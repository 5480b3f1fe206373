"""Training runs as jobs: each run is started in a background thread through a job runner (the app's queue),
and can be watched (step, it/s, ETA, losses, samples) and stopped by its id. When the app shuts down, every run
is asked to stop (:meth:`TrainingRuns.stop_all`) and waited for (:meth:`TrainingRuns.wait`), so that no run is
still on the device when the process exits."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.job_control import JobControl
from pipelines.training.settings import TrainingSettings
from pipelines.training.trainer import TrainingState, train

if TYPE_CHECKING:
    from pipelines.engine import Engine

#: ``runner(job, description)`` runs ``job(control)`` when its turn comes (e.g. ``JobQueue.run``).
Runner = Callable[[Callable[[JobControl], Any], str], Any]


@dataclass
class TrainingRun:
    id: str
    settings: TrainingSettings
    control: JobControl = field(default_factory=JobControl)
    status: str = "queued"  # queued, running, done, stopped, failed
    error: str | None = None
    state: TrainingState | None = None
    thread: threading.Thread | None = None

    def stop(self) -> None:
        self.control.interrupt()


class TrainingRuns:
    """The runs one app started, by id."""

    def __init__(self, engine: Engine, runner: Runner):
        self.engine, self.runner = engine, runner
        self._runs: dict[str, TrainingRun] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, settings: TrainingSettings, dataset: Path) -> TrainingRun:
        run = TrainingRun(f"train-{next(self._ids)}", settings)

        def job(control: JobControl) -> None:
            if control.interrupted:  # stopped while it waited for its turn: nothing to train or save
                run.status = "stopped"
                return
            run.status = "running"

            def on_step(state: TrainingState) -> None:
                run.state = state

            run.state = train(self.engine, settings, dataset, control=control, on_step=on_step)
            run.status = "stopped" if run.state.interrupted else "done"

        def thread() -> None:
            try:
                self.runner(lambda control: job(_bind(control, run)), f"train {settings.name}")
            except Exception as error:  # reported on the run; the app goes on
                run.status, run.error = "failed", str(error)

        with self._lock:
            self._runs[run.id] = run
        run.thread = threading.Thread(target=thread, name=run.id, daemon=True)
        run.thread.start()
        return run

    def get(self, run_id: str) -> TrainingRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def all(self) -> list[TrainingRun]:
        with self._lock:
            return list(self._runs.values())

    def stop_all(self) -> None:
        """Ask every run to stop: a running one saves its resumable state at the step reached and ends, a
        waiting one ends when its turn comes without training."""
        for run in self.all():
            run.stop()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all for the runs' threads to end; True when every one has."""
        deadline = time.monotonic() + timeout
        for run in self.all():
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(run.thread is not None and run.thread.is_alive() for run in self.all())


def _bind(control: JobControl, run: TrainingRun) -> JobControl:
    """Let the run's own control stop the queue's job too (Stop before the job started, or during it)."""
    if run.control.interrupted:
        control.interrupt()
    run.control = control
    return control
