"""What the UI and the API share: the engine, the user options, and one job queue.

UI jobs and API jobs go through the same :class:`JobQueue`, so they run on the device one at a time in
the order they came, a queued job knows its position and can be cancelled, and either client can see
and stop the job that is running, whoever sent it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from pathlib import Path
from typing import Protocol

from pipelines.engine import Engine
from pipelines.models.manager import LoadedModel
from pipelines.options import OUTDIR_OPTIONS, Options
from pipelines.paths import confine_writable
from pipelines.settings import Paths
from pipelines.upscaling import Upscalers
from webui.extensions import LoadedExtensions, load_extensions
from webui.flags import Flags
from webui.job_queue import JobQueue
from webui.pool import EnginePool, ModelInfo

log = logging.getLogger("webui")
_TITLE_HASH = re.compile(r" \[[0-9a-f]{8,64}\]$")
#: How long a shutdown waits, at most, for the training and evaluation runs it stopped to end.
SHUTDOWN_WAIT_S = 60.0


class BackgroundRuns(Protocol):
    """Runs that work in threads of their own (training runs, evaluation jobs), stopped on shutdown."""

    def stop_all(self) -> None:
        """Ask every run to stop; returns at once."""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every run's thread to end; True when all have."""


def _file_name(title: str) -> str:
    """``"sub/model.safetensors [abcd1234]"`` -> ``"sub/model.safetensors"``: the file may have changed since."""
    return _TITLE_HASH.sub("", title.strip())


def saved_selection_or_fallback(options: Options, paths: Paths) -> Options:
    """``options`` with a saved checkpoint or VAE that is no longer on disk replaced by the default, logged.

    Only file names are checked, so that starting does not wait for hashing every checkpoint.
    """
    changes: dict[str, str] = {}
    for key, kind, fallback in (("sd_model_checkpoint", "checkpoint", ""), ("sd_vae", "vae", "Automatic")):
        saved = getattr(options, key)
        if saved in ("", "Automatic", "None"):
            continue
        if not any((folder / _file_name(saved)).exists() for folder in paths.model_dirs(kind)):
            log.warning("the saved %s %r (config.json) is no longer in %s; using %s instead", key, saved,
                        ", ".join(map(str, paths.model_dirs(kind))), fallback or "the first checkpoint found")
            changes[key] = fallback
    return options.model_copy(update=changes) if changes else options


def outdirs_inside_roots(options: Options, paths: Paths) -> Options:
    """``options`` with each saved ``outdir_*`` folder (config.json) that lies outside the allowed folders or
    cannot be written replaced by the default folder, logged with the reason and how to allow it."""
    roots = paths.allowed_roots()
    changes: dict[str, str] = {}
    for key in OUTDIR_OPTIONS:
        value = getattr(options, key)
        if not value.strip():
            continue
        try:
            confine_writable(value, roots, field=key)
        except ValueError as error:
            log.warning("config.json: %s; using the default folder (allow a folder with --allowed-dir)", error)
            changes[key] = ""
    return options.model_copy(update=changes) if changes else options


def create_model_dirs(paths: Paths) -> None:
    """Create the missing model folders under the models dir; a failure is logged, the app starts anyway."""
    try:
        created = paths.create_model_dirs()
    except OSError as error:
        log.warning("could not create the model folders under %s: %s", paths.models_dir, error)
        return
    if created:
        log.info("created model folders: %s", ", ".join(str(path) for path in created))


def extension_settings(flags: Flags, options: Options) -> dict:
    """Which extensions an engine pool's replicas load: the same as the front."""
    return {"dir": flags.extensions_dir, "disable_all": flags.disable_all_extensions,
            "disable_extra": flags.disable_extra_extensions, "disabled": tuple(options.disabled_extensions)}


class AppContext:
    """Built once by :func:`webui.app.serve` and handed to the UI and the API."""

    def __init__(self, flags: Flags, engine: Engine, options_path: Path,
                 extensions: LoadedExtensions | None = None, pool: EnginePool | None = None):
        self.flags = flags
        self.engine = engine
        #: What the extensions registered for the UI and the API (their engine parts live in the engine).
        self.extensions = extensions or LoadedExtensions()
        #: The engine pool generation jobs run on (``--workers`` / ``--ray-address``); None: this process.
        self.pool = pool
        if pool is not None:
            engine.executor = pool
            self.queue = JobQueue(max_waiting=flags.queue_size, slots=pool.size, placement=pool.where)
        else:
            self.queue = JobQueue(max_waiting=flags.queue_size)
        self.options_path = options_path
        self._lock = threading.Lock()
        self._background: list[BackgroundRuns] = []

    @classmethod
    def create(cls, flags: Flags) -> AppContext:
        """Engine and options from the flags; options persist in ``config.json`` in the data dir.

        The checkpoint saved there (the last one chosen) loads first unless ``--ckpt`` names one. A model
        folder missing from the models dir (one per model kind, e.g. removed by the user) is created again.
        """
        settings = flags.engine_settings()
        create_model_dirs(settings.paths)
        options_path = settings.paths.data_dir / "config.json"
        options = saved_selection_or_fallback(Options.load(options_path), settings.paths)
        options = outdirs_inside_roots(options, settings.paths)
        settings = flags.engine_settings(checkpoint_cache=options.sd_checkpoint_cache)
        if not flags.ckpt and options.sd_model_checkpoint:
            settings = dataclasses.replace(settings, default_checkpoint=_file_name(options.sd_model_checkpoint))
        engine = Engine(settings, options)
        extensions = load_extensions(engine, Path(flags.extensions_dir) if flags.extensions_dir else None,
                                     disable_all=flags.disable_all_extensions,
                                     disable_extra=flags.disable_extra_extensions,
                                     disabled=options.disabled_extensions)
        pool = None
        if flags.workers or flags.ray_address:
            from webui.ray_pool import start_pool  # Ray is imported only for these flags

            pool = start_pool(workers=flags.workers, address=flags.ray_address, engine=engine,
                              extensions=extension_settings(flags, options))
        return cls(flags, engine, options_path, extensions, pool)

    def model_of(self, result) -> ModelInfo | LoadedModel | None:
        """The model ``result`` was made with: the pool's replica's, else this engine's current one."""
        if self.pool is not None:
            return self.pool.model_of(result)
        return self.engine.models.current

    def add_background_runs(self, runs: BackgroundRuns) -> None:
        """Have :meth:`close` stop ``runs`` (the training runs, the evaluation jobs) and wait for them."""
        self._background.append(runs)

    def close(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Ask every training and evaluation run to stop, wait for them (``timeout`` seconds at most in all),
        then stop the engine pool's replicas. A run still on the device when the process exits would abort it."""
        for runs in self._background:
            runs.stop_all()
        deadline = time.monotonic() + timeout
        for runs in self._background:
            if not runs.wait(max(0.0, deadline - time.monotonic())):
                log.warning("a training or evaluation run did not stop within %.0f s of the shutdown", timeout)
        if self.pool is not None:
            self.pool.close()

    @property
    def options(self) -> Options:
        return self.engine.options

    @property
    def default_model_url(self) -> str:
        """What the Download button fetches: ``--default-model-url``, else the option (config.json on disk;
        the UI and the API cannot change it)."""
        return self.flags.default_model_url or self.options.default_model_url

    @property
    def upscalers(self) -> Upscalers:
        """The image upscalers of the Extras tab and the extras API: the engine's own library, so hires
        fix and extras share one loaded model."""
        return self.engine.upscalers

    def update_options(self, changes: dict) -> Options:
        """Validate, apply and persist option changes; KeyError/ValidationError name a bad key or value."""
        with self._lock:
            options = self.engine.options.with_overrides(changes)
            options.save(self.options_path)
            self.engine.options = options
            self.engine.models.cache_size = options.sd_checkpoint_cache
            return options
