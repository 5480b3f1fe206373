"""The engine pool's replicas as Ray actors (``--workers N``, ``--ray-address ADDR``); see :mod:`webui.pool`.

Imported only when one of those flags is given (Ray is an optional dependency: requirements-ray.txt).

Each replica is a Ray core actor holding one :class:`~pipelines.engine.Engine` (its own LRU model cache, the
extensions loaded as on the front) on one GPU (``num_gpus=1``) or, without GPUs, one CPU. Ray places the
actors (spread over the cluster's nodes) and restarts one whose process dies (``max_restarts``); the pool
then runs the lost part again elsewhere. An actor runs a few calls at once (``max_concurrency``): the job
in one thread, progress / interrupt / skip in the others.

Replicas get the front's EngineSettings: the same model folders by path. On a cluster whose nodes do not
share the front's disk, a model file missing on a node is reported by name (:class:`ModelMissingOnNode`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from pipelines.engine import Engine, EngineError
from pipelines.job_control import JobControl, Progress
from pipelines.options import Options
from pipelines.plan import RequestError
from pipelines.prompts.styles import Style, StyleDatabase
from pipelines.request import GenerationRequest
from pipelines.settings import EngineSettings
from webui.pool import EnginePool, ModelInfo, PartOutcome, ReplicaLost

log = logging.getLogger("webui.pool")
ROOT = Path(__file__).resolve().parent.parent
#: Restarts Ray allows each replica (a process that keeps dying is given up after this many).
MAX_RESTARTS = 4
#: Seconds a progress poll may take before the front stops waiting for it.
POLL_TIMEOUT_S = 2.0
#: Files never sent to a remote cluster's nodes with the code (``--ray-address``).
CODE_EXCLUDES = ["venv/", ".git/", "models/", "outputs/", "**/__pycache__/", "*.safetensors", "*.ckpt", "*.pt",
                 "*.pth", "*.bin"]
_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class ModelMissingOnNode(EngineError):
    """A model file the front has is not on the node a replica runs on."""


@ray.remote
class ReplicaActor:
    """One engine in its own process. ``run`` saves nothing: images come back to the front."""

    def __init__(self, name: str, settings: EngineSettings, options: Options, extensions: dict[str, Any],
                 threads: int | None = None):
        from webui.extensions import load_extensions  # the front's extensions, for their engine parts

        if threads:
            # Ray gives a CPU actor one thread; a CPU result depends (by a pixel level) on the thread count, so a
            # CPU replica uses the front's, and its images equal the front's engine's.
            torch.set_num_threads(threads)
        self.name = name
        self.engine = Engine(settings, options)
        load_extensions(self.engine, Path(extensions["dir"]) if extensions.get("dir") else None,
                        disable_all=extensions.get("disable_all", False),
                        disable_extra=extensions.get("disable_extra", False),
                        disabled=extensions.get("disabled", ()))
        self.jobs: dict[str, JobControl] = {}
        self.lock = threading.Lock()

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "node": socket.gethostname(),
                "device": str(self.engine.models.device.device), "loaded": self.engine.models.loaded_titles()}

    def run(self, key: str, request: GenerationRequest, options: Options, styles: tuple[Style, ...]) -> PartOutcome:
        control = JobControl(preview_every=options.show_progress_every_n_steps)
        with self.lock:
            self.jobs[key] = control
        try:
            self.engine.models.cache_size = options.sd_checkpoint_cache
            # The front's styles (its styles.csv), not this node's: the ones the job names, as planned there.
            self.engine.styles = StyleDatabase(os.devnull)
            self.engine.styles._styles = {style.name: style for style in styles}
            try:
                plan = self.engine.plan(request)
            except RequestError as error:
                if error.field in ("checkpoint", "vae", "hr_checkpoint_name", "hr_upscaler"):
                    raise ModelMissingOnNode(
                        f"{error.field}: {getattr(request, error.field, '')!r} is on the front but not on node "
                        f"{socket.gethostname()} (replica {self.name}); copy the file to the same folder there "
                        f"({self.engine.paths.models_dir}). {error}") from None
                raise
            result = self.engine.generate(plan, control=control, options=options)
            model = self.engine.models.current
            info = ModelInfo(file=model.file, vae_file=model.vae_file, is_inpainting=model.is_inpainting) \
                if model is not None else None
            return PartOutcome(result=result, model=info, loaded=self.engine.models.loaded_titles())  # type: ignore[arg-type]
        finally:
            with self.lock:
                self.jobs.pop(key, None)

    def poll(self, key: str) -> Progress | None:
        control = self.jobs.get(key)
        return control.progress if control is not None else None

    def interrupt(self, key: str) -> None:
        control = self.jobs.get(key)
        if control is not None:
            control.interrupt()

    def skip(self, key: str) -> None:
        control = self.jobs.get(key)
        if control is not None:
            control.skip()


class RayPartHandle:
    def __init__(self, actor: Any, key: str, ref: Any):
        self.actor, self.key, self.ref = actor, key, ref

    def done(self) -> bool:
        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def outcome(self) -> PartOutcome:
        try:
            return ray.get(self.ref)
        except _LOST as error:
            raise ReplicaLost(type(error).__name__) from error
        except RayTaskError as error:
            cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
            if cause is not None:
                raise cause from None
            raise

    def progress(self) -> Progress | None:
        try:
            return ray.get(self.actor.poll.remote(self.key), timeout=POLL_TIMEOUT_S)
        except (GetTimeoutError, *_LOST):
            return None

    def interrupt(self) -> None:
        self.actor.interrupt.remote(self.key)

    def skip(self) -> None:
        self.actor.skip.remote(self.key)


class RayReplica:
    """The front's handle of one :class:`ReplicaActor`."""

    def __init__(self, name: str, actor: Any):
        self.name = name
        self.actor = actor
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        self.info = ray.get(self.actor.ready.remote(), timeout=timeout)
        return self.info

    def submit(self, key: str, request: GenerationRequest, options: Options,
               styles: tuple[Style, ...]) -> RayPartHandle:
        try:
            return RayPartHandle(self.actor, key, self.actor.run.remote(key, request, options, styles))
        except _LOST as error:
            raise ReplicaLost(type(error).__name__) from error

    def recover(self, timeout: float = 600) -> bool:
        """Wait until Ray has restarted the actor (it answers ``ready``); False when it is gone for good."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
                return True
            except ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    log.error("replica %s did not come back within %.0f s", self.name, timeout)
                    return False
                time.sleep(0.5)
            except Exception as error:  # the actor is gone for good (restarts used up, node lost)
                log.error("replica %s: %s", self.name, error)
                return False

    def loaded(self) -> list[str]:
        return list(self.wait_ready(timeout=POLL_TIMEOUT_S)["loaded"])

    def pid(self) -> int:
        return int(self.wait_ready(timeout=60)["pid"])

    def close(self) -> None:
        ray.kill(self.actor, no_restart=True)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_mb: int = 200, log_to_driver: bool = True) -> bool:
    """Start a local Ray instance (no dashboard, a small object store), or join ``address``; True when this
    call started or joined it (and :func:`shutdown_ray` should end it)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"working_dir": str(ROOT), "excludes": CODE_EXCLUDES})
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=log_to_driver,
                 object_store_memory=object_store_mb * 1024 * 1024,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    return True


def shutdown_ray() -> None:
    ray.shutdown()


def start_replicas(count: int, settings: EngineSettings, options: Options, extensions: dict[str, Any], *,
                   gpus_per_replica: float = 0, cpus_per_replica: float = 1, threads: int | None = None,
                   settings_for: Any = None) -> list[RayReplica]:
    """``count`` replicas, spread over the cluster's nodes, each ready (models are loaded by the first job).
    CPU replicas use ``threads`` torch threads (default: as many as this process). ``settings_for(i)`` may give
    replica ``i`` other EngineSettings (tests: a node without a model file)."""
    if not gpus_per_replica and threads is None:
        threads = torch.get_num_threads()
    replicas = []
    for i in range(count):
        name = f"replica-{i + 1}"
        actor = ReplicaActor.options(  # type: ignore[attr-defined]
            name=None, num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, max_restarts=MAX_RESTARTS,
            max_task_retries=0, max_concurrency=4, scheduling_strategy="SPREAD",
        ).remote(name, settings_for(i) if settings_for else settings, options, extensions,
                 None if gpus_per_replica else threads)
        replicas.append(RayReplica(name, actor))
    for replica in replicas:
        info = replica.wait_ready()
        log.info("%s ready: pid %s on %s, %s", replica.name, info["pid"], info["node"], info["device"])
    return replicas


def start_pool(*, workers: int, address: str | None, engine: Engine, extensions: dict[str, Any]) -> EnginePool:
    """The pool of ``--workers N`` (local Ray: one replica per GPU, or N CPU replicas) or ``--ray-address``
    (an existing cluster: N replicas, one per GPU of the cluster when N is 0)."""
    if address:
        started = init_ray(address)
    else:
        import torch

        local_gpus = torch.cuda.device_count()
        count = workers or max(local_gpus, 1)
        started = init_ray(num_cpus=max(count, 1) + 1, num_gpus=local_gpus)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or max(gpus, 1)
    if gpus and count > gpus:
        raise ValueError(f"workers: {count} replicas need one GPU each, the cluster has {gpus}")
    replicas = start_replicas(count, engine.settings, engine.options, extensions,
                              gpus_per_replica=1 if gpus else 0, cpus_per_replica=1)
    return EnginePool(replicas, engine.paths.outputs_dir, on_close=shutdown_ray if started else None)
