"""An engine pool: many engine replicas (processes, GPUs, machines) behind the one UI, API and job queue.

This module is the pool's one small interface and knows nothing of Ray: :class:`EnginePool` is the
:class:`~pipelines.engine.JobExecutor` the front's engine hands its ordinary jobs to
(``Engine.executor``), so the UI, the API, the scripts and the queue call ``Engine.generate`` as always.
The replicas behind it are :class:`Replica` objects; :mod:`webui.ray_pool` makes them Ray actors (imported
only for ``--workers`` / ``--ray-address``).

What the pool does with a job:

- **split**: a job of ``n_iter`` batches becomes one part per batch, each with the seeds that batch has in
  the whole job (the images' seeds, prompts and infotexts do not depend on the batch they ran in); the
  cells of an X/Y/Z plot, prompt matrix or prompts-from-file job are jobs of their own
  (``JobRunner.map``). A job that cannot be split that way (always-on scripts such as ControlNet, img2img
  with several init images) is one part;
- **place**: a part goes to a free replica that has its checkpoint loaded (model affinity), else to the free
  replica with the fewest models loaded and jobs run;
- **watch**: the job's JobControl gets the replicas' progress and previews; its interrupt and skip are sent
  to every replica running a part of it;
- **faults**: a replica that dies (:class:`ReplicaLost`) is replaced by its backend, and the part it ran runs
  again on another one, at most ``max_retries`` times, then :class:`PoolError` says so;
- **gather**: the parts' results are put together in order, and the front saves images and grid exactly as
  one engine would have (replicas never write files; they send images back).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from pipelines.engine import EngineError
from pipelines.job_control import BatchSkipped, JobControl, JobInterrupted, Progress
from pipelines.models.catalog import ModelFile
from pipelines.options import Options
from pipelines.plan import JobPlan
from pipelines.processing import GenerationResult, PreparedPrompts, save_grid, save_sample
from pipelines.prompts.styles import Style
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.sampling.seeds import SeedPlan

log = logging.getLogger("webui.pool")

#: How often the front looks at its running parts (finished? interrupt or skip pressed?).
POLL_S = 0.01
#: How often the front asks a running part for its progress and preview.
PROGRESS_S = 0.25


class PoolError(EngineError):
    """A job part failed on every replica it was tried on."""


class ReplicaLost(Exception):
    """The replica's process died (or its node went away) while it ran a part; its backend replaces it."""


@dataclass(frozen=True)
class ModelInfo:
    """What the API's answer says about the model a replica used (the parts of a LoadedModel it reads)."""

    file: ModelFile
    vae_file: ModelFile | None
    is_inpainting: bool


@dataclass
class PartOutcome:
    """What a replica sends back for one part: its result (images included), the model it used, and the
    checkpoints it now has loaded (for model affinity)."""

    result: GenerationResult
    model: ModelInfo
    loaded: list[str]


class PartHandle(Protocol):
    """A part running on a replica."""

    def done(self) -> bool:
        """Whether it finished (its result or error is ready); never blocks."""

    def outcome(self) -> PartOutcome:
        """Its outcome; raises :class:`ReplicaLost`, or the job's own error (e.g. a RequestError)."""

    def progress(self) -> Progress | None:
        """Its latest progress, preview included (None when the replica does not answer in time)."""

    def interrupt(self) -> None: ...

    def skip(self) -> None: ...


class Replica(Protocol):
    """One engine replica (its backend makes it: :mod:`webui.ray_pool`)."""

    name: str

    def submit(self, key: str, request: GenerationRequest, options: Options, styles: tuple[Style, ...]) -> PartHandle:
        """Start ``request`` (saving nothing) with the front's ``styles`` under ``key``; raises
        :class:`ReplicaLost` if it is down."""

    def recover(self) -> bool:
        """After :class:`ReplicaLost`: wait until its replacement is up; False when it cannot come back."""

    def loaded(self) -> list[str]:
        """The checkpoints it has loaded now."""

    def close(self) -> None: ...


@dataclass
class Part:
    """A piece of one job: batches ``first_batch`` .. ``first_batch + batches - 1`` of ``plan``."""

    job: int  # index of the job in the call
    index: int  # index of the part in its job
    request: GenerationRequest  # what the replica runs (its seeds set, saving off)
    checkpoint: str
    first_batch: int
    batches: int
    styles: tuple[Style, ...] = ()  # the front's styles the job names (a replica has not the front's styles.csv)
    attempts: list[str] = field(default_factory=list)
    lost_on: list[str] = field(default_factory=list)  # replicas it was lost on: tried last


def splittable(request: GenerationRequest) -> bool:
    """Whether a job's batches can run apart with the same images: no always-on script (they may see the
    batch number), at most one init image (img2img takes init image ``k % len`` for image ``k``)."""
    if request.alwayson_scripts:
        return False
    return not (isinstance(request, Img2ImgRequest) and len(request.init_images) > 1)


def split(plan: JobPlan, job: int = 0) -> list[Part]:
    """The parts of a planned job: one per batch when :func:`splittable`, else one. Random seeds are drawn
    once here, as the one engine would draw them for the whole job."""
    request = plan.request
    checkpoint = plan.checkpoint.title
    common: dict[str, Any] = {"save_images": False, "checkpoint": checkpoint}
    if request.n_iter == 1 or not splittable(request):
        return [Part(job, 0, request.model_copy(update=common), checkpoint, 0, request.n_iter, plan.styles)]
    seeds = SeedPlan.for_job(request.seed, request.subseed, request.image_count, request.subseed_strength)
    size = request.batch_size
    return [Part(job, k, request.model_copy(update={**common, "n_iter": 1, "seed": seeds.seeds[k * size],
                                                   "subseed": seeds.subseeds[k * size]}), checkpoint, k, 1,
                 plan.styles)
            for k in range(request.n_iter)]


def real_steps(request: GenerationRequest) -> int:
    """Sampling steps each batch runs (img2img: about denoising strength x steps), as the engine counts them."""
    if isinstance(request, Img2ImgRequest):
        return max(min(int(request.steps * request.denoising_strength), request.steps), 1)
    return request.steps


@dataclass
class _Running:
    part: Part
    replica: Replica
    handle: PartHandle
    progress: Progress | None = None
    submitted: float = field(default_factory=time.perf_counter)
    interrupted: bool = False


class EnginePool:
    """The :class:`~pipelines.engine.JobExecutor` over ``replicas``; images are saved under ``outputs_dir``."""

    def __init__(self, replicas: Sequence[Replica], outputs_dir: Path, *, max_retries: int = 2,
                 on_close: Any = None):
        if not replicas:
            raise ValueError("workers: an engine pool needs at least one replica")
        self.replicas = list(replicas)
        self.outputs_dir = outputs_dir
        self.max_retries = max_retries
        self._on_close = on_close
        self._cond = threading.Condition()
        self._busy: set[str] = set()
        self._dead: set[str] = set()  # could not be replaced
        self._loaded: dict[str, list[str]] = {r.name: [] for r in self.replicas}
        self._jobs_run: dict[str, int] = {r.name: 0 for r in self.replicas}
        self._where: dict[int, list[str]] = {}  # id(JobControl) -> replicas running its parts
        self._models: dict[int, ModelInfo] = {}  # id(GenerationResult) -> the model its first part used
        self._keys = itertools.count(1)
        #: (job part, replica) for every part that finished, in order: which replica ran what.
        self.history: deque[tuple[str, str]] = deque(maxlen=1000)
        #: (seconds the replica's engine spent, seconds from submitting to having the outcome) per finished part:
        #: the difference is the pool's own cost per part (benchmarks/ray_pool.py).
        self.timings: deque[tuple[float, float]] = deque(maxlen=1000)

    @property
    def size(self) -> int:
        return len(self.replicas)

    # --- what the rest of the web UI asks

    def where(self, control: JobControl) -> str:
        """The replicas running the job of ``control`` now, for the queue line ("" when none)."""
        with self._cond:
            return ", ".join(sorted(set(self._where.get(id(control), []))))

    def model_of(self, result: GenerationResult) -> ModelInfo | None:
        """The model a result of this pool was made with (what ``engine.models.current`` is for one engine)."""
        return self._models.get(id(result))

    def loaded(self) -> dict[str, list[str]]:
        """Checkpoints loaded per replica, as last reported."""
        with self._cond:
            return {name: list(titles) for name, titles in self._loaded.items()}

    def close(self) -> None:
        for replica in self.replicas:
            try:
                replica.close()
            except Exception as error:  # closing must go on for the others
                log.warning("could not close replica %s: %s", replica.name, error)
        if self._on_close is not None:
            self._on_close()

    # --- JobExecutor

    def run(self, plan: JobPlan, control: JobControl, options: Options) -> GenerationResult:
        started = time.perf_counter()
        parts = split(plan)
        control.start(plan.request.n_iter, real_steps(plan.request))
        outcomes = self._execute(parts, control, options, whole_job=plan.request.n_iter)
        return self._gather(plan, parts, outcomes, options, time.perf_counter() - started)

    def run_many(self, plans: Sequence[JobPlan], control: JobControl,
                 options: Options) -> Iterator[GenerationResult]:
        """All parts of all ``plans`` start at once (as replicas free up); results come back in order."""
        started = time.perf_counter()
        per_job = [split(plan, k) for k, plan in enumerate(plans)]
        parts = [part for job_parts in per_job for part in job_parts]
        outcomes: dict[tuple[int, int], PartOutcome] = {}
        state = {"finished": False, "error": None}
        stop = threading.Event()

        def work() -> None:
            try:
                self._execute(parts, control, options, results=outcomes, stop=stop)
            except BaseException as error:  # handed to the consumer below
                state["error"] = error
            finally:
                with self._cond:
                    state["finished"] = True
                    self._cond.notify_all()

        worker = threading.Thread(target=work, name="pool-run-many", daemon=True)
        worker.start()
        try:
            for k, plan in enumerate(plans):
                keys = [(part.job, part.index) for part in per_job[k]]
                with self._cond:
                    while not all(key in outcomes for key in keys) and not state["finished"]:
                        self._cond.wait(0.1)
                if state["error"] is not None and not all(key in outcomes for key in keys):
                    raise state["error"]  # type: ignore[misc]
                yield self._gather(plan, per_job[k], [outcomes.get(key) for key in keys], options,
                                   time.perf_counter() - started)
        finally:
            stop.set()
            worker.join()

    # --- running parts

    def _execute(self, parts: list[Part], control: JobControl, options: Options, *,
                 results: dict[tuple[int, int], PartOutcome] | None = None, whole_job: int | None = None,
                 stop: threading.Event | None = None) -> list[PartOutcome | None]:
        """Run ``parts`` on free replicas until all finished (or an interrupt / ``stop`` leaves the rest);
        forward interrupt and skip, report progress. Outcomes in the order of ``parts`` (None: not run)."""
        results = {} if results is None else results
        pending = deque(parts)
        running: list[_Running] = []
        next_progress = 0.0
        batches_done = 0
        try:
            while pending or running:
                stopping = control.interrupted or (stop is not None and stop.is_set())
                if stopping:
                    pending.clear()
                while pending:
                    replica = self._acquire(pending[0].checkpoint, pending[0].lost_on)
                    if replica is None:
                        break
                    part = pending.popleft()
                    try:
                        handle = replica.submit(f"p{next(self._keys)}", part.request, options, part.styles)
                    except ReplicaLost as error:
                        self._lost(replica, part, error, pending)
                        continue
                    running.append(_Running(part, replica, handle))
                    self._set_where(control, running)
                if pending and self._all_dead():
                    raise PoolError("no replica is left to run the job: every one died and could not be replaced "
                                    "(see the log)")
                try:
                    control.check()
                except JobInterrupted:
                    for item in running:
                        if not item.interrupted:
                            item.interrupted = True
                            item.handle.interrupt()
                except BatchSkipped:
                    for item in running:
                        item.handle.skip()
                for item in [item for item in running if item.handle.done()]:
                    running.remove(item)
                    self._set_where(control, running)
                    try:
                        outcome = item.handle.outcome()
                    except ReplicaLost as error:
                        self._lost(item.replica, item.part, error, pending)
                        continue
                    except BaseException:
                        self._release(item.replica, None)
                        raise
                    self._release(item.replica, outcome.loaded)
                    self.history.append((f"{item.part.job}.{item.part.index}", item.replica.name))
                    self.timings.append((outcome.result.seconds, time.perf_counter() - item.submitted))
                    batches_done += item.part.batches
                    with self._cond:
                        results[(item.part.job, item.part.index)] = outcome
                        self._cond.notify_all()
                now = time.monotonic()
                if running and now >= next_progress:
                    next_progress = now + PROGRESS_S
                    self._report(control, running, batches_done if whole_job else None)
                time.sleep(POLL_S)
        finally:
            for item in running:  # an error or a closed generator: nothing more is wanted from them
                item.handle.interrupt()
                self._release(item.replica, None)
            with self._cond:
                self._where.pop(id(control), None)
        return [results.get((part.job, part.index)) for part in parts]

    def _acquire(self, checkpoint: str, avoid: Sequence[str] = ()) -> Replica | None:
        """A free replica for ``checkpoint`` (one that has it loaded first; one not in ``avoid``, the replicas
        the part was lost on, while another is free), marked busy; None if all are busy."""
        with self._cond:
            free = [r for r in self.replicas if r.name not in self._busy]
            if not free:
                return None
            free = [r for r in free if r.name not in avoid] or free
            warm = [r for r in free if checkpoint in self._loaded[r.name]]
            pick = warm[0] if warm else min(free, key=lambda r: (len(self._loaded[r.name]), self._jobs_run[r.name]))
            self._busy.add(pick.name)
            return pick

    def _release(self, replica: Replica, loaded: list[str] | None) -> None:
        with self._cond:
            self._busy.discard(replica.name)
            if loaded is not None:
                self._loaded[replica.name] = list(loaded)
                self._jobs_run[replica.name] += 1
            self._cond.notify_all()

    def _lost(self, replica: Replica, part: Part, error: BaseException, pending: deque[Part]) -> None:
        """``replica`` died running ``part``: it stays busy until its replacement is up; the part goes first
        in line again, unless it has been tried ``max_retries`` + 1 times."""
        part.attempts.append(f"{replica.name}: {error}")
        part.lost_on.append(replica.name)
        log.warning("replica %s was lost running a job part (%s); it is being replaced", replica.name, error)
        with self._cond:
            self._loaded[replica.name] = []
        threading.Thread(target=self._recover, args=(replica,), name=f"recover-{replica.name}", daemon=True).start()
        if len(part.attempts) > self.max_retries:
            raise PoolError(f"a job part failed on {len(part.attempts)} replicas ("
                            + "; ".join(part.attempts) + f"); gave up after {self.max_retries} retries")
        pending.appendleft(part)

    def _recover(self, replica: Replica) -> None:
        if replica.recover():
            log.info("replica %s is back", replica.name)
            self._release(replica, [])
        else:
            log.error("replica %s could not be replaced; the pool goes on without it", replica.name)
            with self._cond:
                self._dead.add(replica.name)

    def _all_dead(self) -> bool:
        with self._cond:
            return len(self._dead) == len(self.replicas)

    def _set_where(self, control: JobControl, running: list[_Running]) -> None:
        with self._cond:
            self._where[id(control)] = [item.replica.name for item in running]

    def _report(self, control: JobControl, running: list[_Running], batches_done: int | None) -> None:
        """The most advanced running part's step, the latest preview; for a whole job also the batch count."""
        for item in running:
            item.progress = item.handle.progress() or item.progress
        known = [item.progress for item in running if item.progress is not None]
        if not known:
            return
        lead = max(known, key=lambda p: (p.job_no, p.sampling_step))
        preview = next((p.preview for p in reversed(known) if p.preview is not None), None)
        job_no = None
        if batches_done is not None:
            job_no = batches_done + sum(p.job_no for p in known)
        control.update(job_no=job_no, step=lead.sampling_step, steps=lead.sampling_steps or None, preview=preview)

    # --- gathering and saving

    def _gather(self, plan: JobPlan, parts: list[Part], outcomes: Sequence[PartOutcome | None], options: Options,
                seconds: float) -> GenerationResult:
        """One result from the parts' results in order, saved by the front as one engine saves."""
        request = plan.request
        done = [(part, outcome) for part, outcome in zip(parts, outcomes) if outcome is not None]
        if not done:
            return GenerationResult(request=request, interrupted=True, seconds=seconds)
        first = done[0][1].result
        result = GenerationResult(
            request=first.request.model_copy(update={
                "n_iter": request.n_iter, "seed": request.seed, "subseed": request.subseed,
                "save_images": request.save_images, "checkpoint": request.checkpoint}),
            extra_params=first.extra_params, model_title=first.model_title, job_timestamp=first.job_timestamp,
            seconds=seconds, interrupted=len(done) < len(parts))
        incomplete: set[int] = set()
        for part, outcome in done:
            part_result = outcome.result
            offset = len(result.images)
            size = request.batch_size
            stopped = [*part_result.skipped_batches]
            if part_result.interrupted:
                result.interrupted = True
                stopped.append(len(part_result.images) // size - 1)
            for batch in stopped:
                incomplete.update(range(offset + batch * size, offset + (batch + 1) * size))
            result.skipped_batches.extend(part.first_batch + batch for batch in part_result.skipped_batches)
            result.extend(part_result)
            result.extra_images.extend(part_result.extra_images)
            result.warnings.extend(w for w in part_result.warnings if w not in result.warnings)
        model = done[0][1].model
        self._models[id(result)] = model
        weakref.finalize(result, self._models.pop, id(result), None)
        self._save(result, model, options, incomplete)
        return result

    def _save(self, result: GenerationResult, model: ModelInfo, options: Options, incomplete: set[int]) -> None:
        """Save the images and the grid as ``processing.run_job`` does on one engine."""
        request = result.request
        if not request.save_images:
            return
        ctx = SimpleNamespace(options=options, outputs_dir=self.outputs_dir)
        prompts = PreparedPrompts(result.prompts, result.negative_prompts, [], [], [])
        seeds = SeedPlan(result.seeds, result.subseeds)
        if options.samples_save:
            for i, (image, infotext) in enumerate(zip(result.images, result.infotexts)):
                if i in incomplete and not options.save_incomplete_images:
                    continue
                result.paths.append(save_sample(request, ctx, model, image, infotext,  # type: ignore[arg-type]
                                                prompts, seeds, i, result))
        save_grid(request, ctx, result)  # type: ignore[arg-type]
