"""The engine's front door: build a request, call :meth:`Engine.generate`, get images and their infotext.

Usable from a Python shell with no server::

    from pipelines.engine import Engine
    from pipelines.request import LATENT_UPSCALE_MODES, GenerationRequest
    from pipelines.settings import EngineSettings, Paths

    engine = Engine(EngineSettings(paths=Paths.under(".")))
    result = engine.generate(GenerationRequest(prompt="a photo of a cat", seed=1))
    result.images[0].save("cat.png")

The UI and the API build the same request and call the same method.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Protocol, TypeVar

import torch

from pipelines.faces import FaceRestorers, MissingFaceModel
from pipelines.job_control import JobControl
from pipelines.models import acceleration, families
from pipelines.models.catalog import ModelRegistry
from pipelines.models.devices import free_memory, is_out_of_memory
from pipelines.models.manager import ModelManager
from pipelines.options import Options
from pipelines.paths import check_writable
from pipelines.plan import JobPlan, RequestError, ScriptRequestError, script_field, unknown_styles_message
from pipelines.plugins.extra_networks import ExtraNetworkRegistry
from pipelines.plugins.scripts import ScriptError, ScriptJobs, ScriptRegistry, SelectableScriptRegistry
from pipelines.processing import GenerationResult, JobContext, restores_faces, run_job
from pipelines.prompts.embeddings import EmbeddingDatabase
from pipelines.prompts.styles import StyleDatabase
from pipelines.request import LATENT_UPSCALE_MODES, GenerationRequest
from pipelines.settings import EngineSettings
from pipelines.upscaling import Upscalers

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineError(RuntimeError):
    """A job failed for a reason the user can act on (out of memory, a model that does not load)."""


class JobExecutor(Protocol):
    """Runs planned jobs somewhere else than this process's device: an engine pool (``webui/pool.py``).

    It gets the plan made here, the job's JobControl (progress, previews, interrupt and skip) and its
    Options, and returns the same GenerationResult this engine would have made, saved as it would have."""

    def run(self, plan: JobPlan, control: JobControl, options: Options) -> GenerationResult:
        """Run one ordinary job (no selectable script)."""

    def run_many(self, plans: Sequence[JobPlan], control: JobControl,
                 options: Options) -> Iterator[GenerationResult]:
        """Run several ordinary jobs at once (a selectable script's); yield their results in order."""


class Engine:
    """Owns the registry, the model manager, styles and embeddings; runs one job at a time."""

    def __init__(self, settings: EngineSettings, options: Options | None = None):
        self.settings = settings
        self.paths = settings.paths
        #: Where a folder a user names (``outdir_*`` options, the Extras tab's input folder) must lie.
        self.roots = self.paths.allowed_roots()
        self.registry = ModelRegistry(self.paths)
        self.models = ModelManager(settings, self.registry)
        self.options = options or Options(sd_checkpoint_cache=settings.checkpoint_cache)
        self.styles = StyleDatabase(self.paths.styles_file)
        self.embeddings = EmbeddingDatabase(self.paths.embeddings_dir)
        device = self.models.device
        self.upscalers = Upscalers(self.paths, device.device, half=device.dtype != torch.float32)
        #: GFPGAN / CodeFormer with the face detector (models/GFPGAN/, models/Codeformer/).
        self.face_restorers = FaceRestorers(self.paths, device.device)
        #: Handlers of ``<name:args>`` prompt tags (LoRA and other extensions register here).
        self.extra_networks = ExtraNetworkRegistry()
        #: Always-on scripts (ControlNet and other extensions register here).
        self.scripts = ScriptRegistry()
        #: Scripts of the Script dropdown (X/Y/Z plot, prompt matrix, ...).
        self.selectable_scripts = SelectableScriptRegistry()
        #: One job on this process's device at a time, whoever sends it (UI, API, a script): generation, a
        #: training run, an evaluation's upscaling and measuring take it. Reentrant: a training run holding it
        #: makes its sample images through :meth:`generate`.
        self.device_lock = threading.RLock()
        #: Where ordinary jobs run instead of this process's device (an engine pool); None: here.
        self.executor: JobExecutor | None = None

    @property
    def options(self) -> Options:
        """The current options, bound to :attr:`roots` (every ``outdir_*`` value is checked against them)."""
        return self._options

    @options.setter
    def options(self, value: Options) -> None:
        self._options = value.bound_to(self.roots)
        # Models a UI or API call loads outside a job (top bar, /options) are stored as the option says.
        self.models.fp8_storage = value.fp8_storage

    def check_output_dirs(self, request: GenerationRequest, options: Options) -> None:
        """Before any model work: :class:`RequestError` naming the ``outdir_*`` option when a folder the job
        will save into lies outside :attr:`roots` or cannot be written."""
        if not request.save_images:
            return
        several = request.batch_size * request.n_iter > 1 or request.script_name
        for grids, saved in ((False, options.samples_save), (True, options.grid_save and several)):
            if not saved:
                continue
            key = f"outdir_{request.mode}_{'grids' if grids else 'samples'}"
            try:
                check_writable(options.output_dir(self.paths.outputs_dir, request.mode, grids=grids), field=key)
            except ValueError as error:
                raise RequestError(key, str(error)) from None

    def hires_upscaler_names(self) -> list[str]:
        """What a request's ``hr_upscaler`` may be: the latent modes, then the image upscalers found now."""
        return [*LATENT_UPSCALE_MODES, *self.upscalers.names]

    def plan(self, request: GenerationRequest, options: Options | None = None) -> JobPlan:
        """Resolve every name ``request`` holds, once, before any model work; :class:`RequestError` names the
        field and what is available. A1111-style names ("name [hash]" titles, hashes) resolve as everywhere.

        ``options`` (default: the current ones) decide whether faces are restored, and with which model: its
        files must be there (a RequestError for ``restore_faces`` names the file and the folder otherwise)."""
        self.check_face_restoration(request, options or self.options)
        checkpoint = self._resolve("checkpoint", lambda: self.models.resolve(request.checkpoint))
        family = families.family_of_path(checkpoint.path)
        problem = families.unsupported(request, family) if family is not None else None
        if problem is not None:
            raise RequestError(problem[0], f"{problem[0]}: {problem[1]}")
        vae = None
        if request.vae not in ("Automatic", "None", ""):
            vae = self._resolve("vae", lambda: self.registry.find_vae(request.vae))
        for module in request.additional_modules:
            self._resolve("additional_modules", partial(self.registry.find_module, module))
        hires_upscaler = None
        if request.enable_hr and request.hr_upscaler not in LATENT_UPSCALE_MODES:
            hires_upscaler = self._resolve("hr_upscaler", lambda: self.upscalers.find(request.hr_upscaler),
                                           "upscaler")
        hires_checkpoint = None
        if request.enable_hr and request.hr_checkpoint_name:
            hires_checkpoint = self._resolve("hr_checkpoint_name",
                                             lambda: self.models.resolve(request.hr_checkpoint_name), "checkpoint")
        refiner = None
        if request.refiner_checkpoint:
            refiner = self._resolve("refiner_checkpoint",
                                    lambda: self.models.resolve(request.refiner_checkpoint), "checkpoint")
        try:
            scripts = tuple(self.scripts.parse(request.alwayson_scripts))
        except ScriptError as error:
            raise ScriptRequestError.wrap("alwayson_scripts", error) from error
        script = None
        if request.script_name:
            try:
                script = self.selectable_scripts.parse(request.script_name, request.script_args)
            except ScriptError as error:
                raise ScriptRequestError.wrap(script_field(error, "script_args"), error) from error
        styles = [self.styles.get(name) for name in request.styles]
        unknown = [name for name, style in zip(request.styles, styles) if style is None]
        if unknown:
            raise RequestError("styles", unknown_styles_message(unknown, self.styles.names()))
        known = tuple(style for style in styles if style is not None)  # all of them: none is unknown
        return JobPlan(request=request, checkpoint=checkpoint, vae=vae, hires_checkpoint=hires_checkpoint,
                       refiner=refiner, hires_upscaler=hires_upscaler, scripts=scripts, script=script, styles=known)

    def check_face_restoration(self, request: GenerationRequest, options: Options) -> None:
        """:class:`RequestError` for ``restore_faces`` when the job restores faces and a model file is missing."""
        if not restores_faces(request, options):
            return
        try:
            self.face_restorers.check(options.face_restoration_model)
        except MissingFaceModel as error:
            raise RequestError("restore_faces", f"restore_faces: {error}") from None

    @staticmethod
    def _resolve(field: str, find: Callable[[], T], prefix: str | None = None) -> T:
        """``find()``, its LookupError as a RequestError whose message starts with ``field:`` (in place of
        the lookup's own ``prefix:``)."""
        try:
            return find()
        except LookupError as error:
            message = str(error).strip("'\"")
            if prefix and message.startswith(f"{prefix}:"):
                message = field + message[len(prefix):]
            elif not message.startswith(f"{field}:"):
                message = f"{field}: {message}"
            raise RequestError(field, message) from None

    def generate(self, request: GenerationRequest | JobPlan, *, control: JobControl | None = None,
                 options: Options | None = None, local: bool = False) -> GenerationResult:
        """Run a txt2img or img2img/inpaint job (by the request's type) and return what it made.

        ``request`` may be a :class:`JobPlan` already made by :meth:`plan`; otherwise it is planned here,
        before any model work, so a missing checkpoint (or VAE, style, ...) fails at once with the list of
        available ones (:class:`RequestError`, a LookupError).
        Out of memory frees what the job held and raises :class:`EngineError`; the next job works.
        ``local``: run on this process's own models even when an :attr:`executor` (an engine pool) is set:
        a training run's sample images must come from the model being trained, which only this process has.
        """
        plan = request if isinstance(request, JobPlan) else self.plan(request, options)
        request = plan.request
        options = (options or self.options).bound_to(self.roots)
        self.check_output_dirs(request, options)
        control = control or JobControl(preview_every=options.show_progress_every_n_steps)
        if plan.script is not None:
            # A selectable script (X/Y/Z plot, ...) takes over: it runs ordinary jobs through this method.
            script, args = plan.script
            plain = request.model_copy(update={"script_name": None, "script_args": []})
            executor = None if local else self.executor
            many = None
            if executor is not None:
                def many(subs: Sequence[GenerationRequest]) -> Iterator[GenerationResult]:
                    plans = [self.plan(sub) for sub in subs]  # every name checked before the first job
                    for sub_plan in plans:
                        self.check_output_dirs(sub_plan.request, options)
                    return executor.run_many(plans, control, options)
            jobs = ScriptJobs(lambda sub: self.generate(sub, control=control, options=options, local=local),
                              options, many)
            return script.run(plain, args, jobs, control)
        if self.executor is not None and not local:
            return self.executor.run(plan, control, options)
        with self.device_lock:
            self.embeddings.refresh()  # picks up files added since the last job (a stat per file)
            try:
                model = self.models.get(request.checkpoint, request.vae, request.additional_modules,
                                        fp8_storage=options.fp8_storage)
                notice = acceleration.prepare(model, options.unet_compile, acceleration.job_shapes(request, model),
                                              self.models.device.device)
                ctx = JobContext(model=model, options=options, outputs_dir=self.paths.outputs_dir,
                                 styles=self.styles, embeddings=self.embeddings, control=control,
                                 device=self.models.device.device, extra_networks=self.extra_networks,
                                 upscalers=self.upscalers, face_restorers=self.face_restorers,
                                 scripts=list(plan.scripts), notice=notice or "",
                                 hires_checkpoint=plan.hires_checkpoint, refiner=plan.refiner,
                                 load_model=lambda title: self.models.get(title, request.vae,
                                                                          request.additional_modules,
                                                                          fp8_storage=options.fp8_storage))
                return run_job(request, ctx)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                free_memory()
                raise EngineError(
                    f"Out of memory at {request.width}x{request.height}, batch size {request.batch_size}: "
                    "try a smaller size or batch, or start with --medvram / --lowvram."
                ) from error
