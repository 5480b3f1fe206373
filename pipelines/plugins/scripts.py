"""Always-on scripts: named job hooks with their own arguments (A1111's ``alwayson_scripts``).

A script (ControlNet, an extension's filter, ...) is registered once under a lowercase name. A request
enables it by carrying its arguments: ``request.alwayson_scripts["controlnet"] = [unit, ...]``, the same
list the HTTP API receives in ``alwayson_scripts["controlnet"]["args"]``. For each job the engine

1. parses the arguments (:meth:`AlwaysOnScript.parse_args`, before any model work: bad input fails at once
   with a message naming the script and the field),
2. calls :meth:`AlwaysOnScript.before_job` with a :class:`Job`: the script may add UNet patches, infotext
   keys, warnings, and undo callbacks for anything it changed on the model,
3. calls :meth:`AlwaysOnScript.on_step` before every sampling step and :meth:`AlwaysOnScript.after_batch`
   once the images of each batch are decoded (before their infotext is written),
4. runs every undo callback, newest first, whether the job finished, failed or was interrupted.

A script never rebinds our functions or a library's; it changes the UNet's inputs through
:data:`UnetPatch` functions that live for one job.

Typed arguments: a script declares its arguments once, as a pydantic model, by its type parameter
(``class Sharpen(AlwaysOnScript[SharpenArgs])``) or, when ``parse_args`` turns them into something else (resolved
models, parsed lines), by the ``Args`` class attribute with the type parameter naming what ``parse_args``
returns. A1111's positional argument lists are mapped onto the model's fields in declaration order
(:func:`validate_args`), so ``job.args`` is a typed object an editor completes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast, get_args

import torch
from PIL import Image
from pydantic import BaseModel, RootModel, ValidationError

from pipelines.job_control import JobControl
from pipelines.models.manager import LoadedModel
from pipelines.options import Options
from pipelines.plugins.registry import NamedRegistry
from pipelines.request import GenerationRequest

if TYPE_CHECKING:  # processing imports this module; diffusers is only needed for the annotation
    from diffusers import DiffusionPipeline

    from pipelines.processing import GenerationResult

#: What a script's ``parse_args`` returns and its hooks see as ``job.args`` (usually its ``Args`` model).
ArgsT = TypeVar("ArgsT")
ModelT = TypeVar("ModelT", bound=BaseModel)


def describe_errors(error: ValidationError) -> str:
    """A pydantic error as ``field: message`` parts joined by ``;`` (without pydantic's headers and links)."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def validate_args(model: type[ModelT], args: Sequence[Any] | Mapping[str, Any] | ModelT) -> ModelT:
    """``args`` validated into ``model``: a dict by field name, a positional list (A1111's ``args`` /
    ``script_args``) onto the fields in declaration order (missing trailing values take their defaults), or a
    list as a whole for a ``RootModel`` of a list. ValueError names the field and what is wrong with it."""
    if isinstance(args, model):
        return args
    data: Any
    if isinstance(args, Mapping):
        data = dict(args)
    elif issubclass(model, RootModel):
        data = list(args)
    else:
        names = list(model.model_fields)
        values = list(args)
        if len(values) > len(names):
            raise ValueError(f"expected at most {len(names)} values [{', '.join(names)}], got {len(values)}")
        data = dict(zip(names, values, strict=False))
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ValueError(describe_errors(error)) from None


def _declared_args(cls: type) -> type[BaseModel] | None:
    """The pydantic model among the type parameters of ``cls``'s bases (``AlwaysOnScript[SharpenArgs]``)."""
    for base in getattr(cls, "__orig_bases__", ()):
        for arg in get_args(base):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


class _DeclaredArgs:
    """What both kinds of script share: ``Args``, the pydantic model of their arguments, taken from the type
    parameter of a subclass (``class Sharpen(AlwaysOnScript[SharpenArgs])``) unless the subclass sets it."""

    #: The pydantic model of the arguments (A1111's positional list maps onto its fields in order). Taken from
    #: the type parameter when that is a pydantic model; set it when ``parse_args`` returns something else.
    Args: ClassVar[type[BaseModel] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Args" not in cls.__dict__:
            declared = _declared_args(cls)
            if declared is not None:
                cls.Args = declared


@dataclass(frozen=True)
class UnetCall:
    """One UNet call of the denoising loop, as a :data:`UnetPatch` sees it.

    ``sample`` is the scaled 4-channel latent input (without the inpainting mask channels); with classifier-free
    guidance the batch holds the unconditional half first, then the conditional half (``cfg`` is True).
    """

    step: int  # user-visible sampling step, 0-based
    steps: int  # sampling steps of this pass
    timestep: torch.Tensor
    sample: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Mapping[str, torch.Tensor] | None
    cfg: bool
    width: int  # size in pixels of the image this pass makes
    height: int
    pass_index: int = 0  # 0: first pass (or img2img); 1: the hires. fix pass

    @property
    def progress(self) -> float:
        """Where this step lies in the pass, 0 (first step) to 1 (after the last)."""
        return self.step / max(self.steps, 1)


@dataclass
class UnetResiduals:
    """What a patch adds to the UNet (diffusers' interfaces): ``down`` and ``mid`` to the skip connections (a
    ControlNet's residuals), ``intrablock`` inside the down blocks (a T2I-Adapter's features); ``added_cond``
    joins the call's ``added_cond_kwargs`` (an IP-Adapter's ``image_embeds``)."""

    down: Sequence[torch.Tensor] = ()
    mid: torch.Tensor | None = None
    intrablock: Sequence[torch.Tensor] = ()
    added_cond: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: UnetResiduals) -> UnetResiduals:
        mid = other.mid if self.mid is None else self.mid if other.mid is None else self.mid + other.mid
        clash = set(self.added_cond) & set(other.added_cond)
        if clash:
            raise ValueError(f"two patches set the UNet's {', '.join(sorted(clash))}; only one may")
        return UnetResiduals(_summed(self.down, other.down), mid, _summed(self.intrablock, other.intrablock),
                             {**self.added_cond, **other.added_cond})


def _summed(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    if not a or not b:
        return a or b
    return [x + y for x, y in zip(a, b, strict=True)]


#: Called before each UNet call; returns residuals to add, or None to leave this call alone.
UnetPatch = Callable[[UnetCall], UnetResiduals | None]


def combined_residuals(patches: Sequence[UnetPatch], call: UnetCall) -> dict[str, Any]:
    """The UNet keyword arguments that ``patches`` add to ``call`` (empty when none applies)."""
    total: UnetResiduals | None = None
    for patch in patches:
        residuals = patch(call)
        if residuals is not None:
            total = residuals if total is None else total + residuals
    if total is None:
        return {}
    kwargs: dict[str, Any] = {}
    if total.down:
        kwargs["down_block_additional_residuals"] = tuple(total.down)
    if total.mid is not None:
        kwargs["mid_block_additional_residual"] = total.mid
    if total.intrablock:
        kwargs["down_intrablock_additional_residuals"] = list(total.intrablock)  # a fresh list: the UNet pops it
    if total.added_cond:
        kwargs["added_cond_kwargs"] = {**(call.added_cond_kwargs or {}), **total.added_cond}
    return kwargs


@dataclass
class Job(Generic[ArgsT]):
    """What a script sees of one job, and what it may add to it.

    ``model`` is the :class:`~pipelines.models.manager.LoadedModel` the job runs on (``.unet``, ``.vae``, ``.pipe``,
    ``.family``, ``.is_sdxl``); ``request`` is the validated request (an ``Img2ImgRequest`` for img2img);
    ``args`` is what the script's :meth:`~AlwaysOnScript.parse_args` returned (its ``Args`` model by default).
    """

    request: GenerationRequest
    model: LoadedModel
    device: torch.device
    args: ArgsT
    #: The job's Options (read-only; e.g. ``control_net_no_detectmap``).
    options: Options = field(default_factory=Options)
    #: Infotext keys recorded on every image of the job.
    infotext: dict[str, object] = field(default_factory=dict)
    #: Images returned after the generated ones (e.g. ControlNet's detected maps); not saved to disk.
    extra_images: list[Image.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    patches: list[UnetPatch] = field(default_factory=list)
    _undo: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def pipe(self) -> DiffusionPipeline:
        """The checkpoint's diffusers pipeline (``.unet``, ``.vae``, ``.text_encoder``, ``.load_lora_weights``...)."""
        return cast("DiffusionPipeline", self.model.pipe)

    def add_unet_patch(self, patch: UnetPatch) -> None:
        """Apply ``patch`` to every UNet call of this job (first pass and hires pass)."""
        self.patches.append(patch)

    def defer(self, undo: Callable[[], object]) -> None:
        """Run ``undo`` when the job ends, however it ends; newest first."""
        self._undo.callback(undo)


class AlwaysOnScript(_DeclaredArgs, Generic[ArgsT]):
    """Base class of an always-on script; override what you need.

    ``name`` is the key in ``alwayson_scripts`` (lowercase); ``title`` is shown in the UI and in
    ``/sdapi/v1/scripts``. The arguments are declared once as a pydantic model: the type parameter
    (``class Sharpen(AlwaysOnScript[SharpenArgs])``) or ``Args``; ``job.args`` is then a ``SharpenArgs``.
    """

    name: str = ""
    title: str = ""

    def parse_args(self, args: Sequence[Any]) -> ArgsT | None:
        """Validate the raw argument list; return the value :attr:`Job.args` holds, or None to stay off for
        this job. Raise ValueError naming the field and its allowed values for bad input.

        By default: no arguments keep the script off; otherwise they are validated into ``Args``
        (:func:`validate_args`) and the script runs if :meth:`enabled` says so. Without ``Args`` the list
        itself is the value."""
        if not args:
            return None
        if self.Args is None:
            return cast(ArgsT, list(args))
        parsed = cast(ArgsT, validate_args(self.Args, args))
        return parsed if self.enabled(parsed) else None

    def enabled(self, args: ArgsT) -> bool:
        """Whether validated arguments turn the script on: their ``enabled`` field when ``Args`` has one (the
        UI sends every script's arguments on every job), else True."""
        return bool(getattr(args, "enabled", True))

    def before_job(self, job: Job[ArgsT]) -> None:
        """Set up the job: add UNet patches, infotext keys, undo callbacks."""

    def on_step(self, job: Job[ArgsT], step: int, latents: torch.Tensor) -> None:
        """Called before every sampling step. Must not synchronise with the GPU (no ``.item()``, no ``.cpu()``)."""

    def after_batch(self, job: Job[ArgsT], images: list[Image.Image]) -> None:
        """Called with the decoded images of each batch (the list may be changed in place)."""


class ScriptError(ValueError):
    """Bad ``alwayson_scripts`` input; the message names the script and the field."""


class ScriptRegistry:
    """Names to always-on scripts. Built-in names cannot be replaced by a plug-in."""

    def __init__(self) -> None:
        self._scripts: NamedRegistry[AlwaysOnScript[Any]] = NamedRegistry("always-on script")

    def register(self, script: AlwaysOnScript[Any], *, builtin: bool = False) -> None:
        """Add ``script`` under ``script.name``; ValueError if that name is taken by a built-in or is empty."""
        name = script.name.lower()
        if not name:
            raise ValueError(f"{type(script).__name__}: an always-on script needs a name")
        self._scripts.register(name, script, builtin=builtin)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        return self._scripts.is_builtin(name.lower())

    def get(self, name: str) -> AlwaysOnScript[Any] | None:
        return self._scripts.get(name.lower())

    def all(self) -> list[AlwaysOnScript[Any]]:
        return list(self._scripts.snapshot().values())

    def parse(self, requested: Mapping[str, Sequence[Any]]) -> list[tuple[AlwaysOnScript[Any], Any]]:
        """Resolve and parse the request's ``alwayson_scripts``; scripts whose args turn them off are dropped.

        Raises :class:`ScriptError` for an unknown name (listing the installed ones) or bad arguments.
        """
        enabled = []
        for name, args in requested.items():
            script = self.get(name)
            if script is None:
                known = ", ".join(s.name for s in self.all()) or "none are installed"
                raise ScriptError(f"alwayson_scripts: no always-on script called {name!r}; available: {known}")
            try:
                parsed = script.parse_args(list(args))
            except ScriptError:
                raise
            except (ValueError, TypeError, LookupError) as error:
                raise ScriptError(f"alwayson_scripts.{script.name}: {error}") from error
            if parsed is not None:
                enabled.append((script, parsed))
        return enabled


@dataclass
class ScriptRun:
    """The enabled scripts of one job with their :class:`Job` objects."""

    jobs: list[tuple[AlwaysOnScript[Any], Job[Any]]]

    @property
    def patches(self) -> list[UnetPatch]:
        return [patch for _, job in self.jobs for patch in job.patches]

    @property
    def infotext(self) -> dict[str, object]:
        merged: dict[str, object] = {}
        for _, job in self.jobs:
            merged.update(job.infotext)
        return merged

    @property
    def warnings(self) -> list[str]:
        return [w for _, job in self.jobs for w in job.warnings]

    @property
    def extra_images(self) -> list[Image.Image]:
        return [image for _, job in self.jobs for image in job.extra_images]

    def on_step(self, step: int, latents: torch.Tensor) -> None:
        for script, job in self.jobs:
            script.on_step(job, step, latents)

    def after_batch(self, images: list[Image.Image]) -> None:
        for script, job in self.jobs:
            script.after_batch(job, images)


@contextmanager
def running_scripts(enabled: Sequence[tuple[AlwaysOnScript[Any], Any]], request: GenerationRequest,
                    model: LoadedModel, device: torch.device, options: Options | None = None) -> Iterator[ScriptRun]:
    """Set up every enabled script for one job and undo all of it on the way out, newest first."""
    with ExitStack() as stack:
        run = ScriptRun([])
        for script, args in enabled:
            job = Job(request=request, model=model, device=device, args=args, options=options or Options())
            stack.enter_context(job._undo)
            run.jobs.append((script, job))
            script.before_job(job)
        yield run


# --- selectable scripts (the Script dropdown: X/Y/Z plot, prompt matrix, ...) ------------------------


class JobRunner(Protocol):
    """Runs one ordinary job for a selectable script, under the script's own progress and interrupt.

    ``options`` are the job's Options: a script that saves a grid honours ``grid_save`` and passes them to
    ``save_grid`` (folder and format)."""

    @property
    def options(self) -> Options:
        """The Options the jobs run with (read-only)."""

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` (a GenerationRequest with no script) and return its GenerationResult."""

    def map(self, requests: Sequence[GenerationRequest]) -> Generator[GenerationResult, None, None]:
        """Run ``requests`` and yield their results in order (an engine pool runs them at once)."""


@dataclass(frozen=True)
class ScriptJobs:
    """The engine's :class:`JobRunner`: ``run`` runs one ordinary job with ``options``."""

    run: Callable[[GenerationRequest], GenerationResult]
    options: Options
    #: Runs several jobs at once, results in order (an engine pool's replicas); None: one after another.
    run_many: Callable[[Sequence[GenerationRequest]], Iterator[GenerationResult]] | None = None

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` as one ordinary job."""
        return self.run(request)

    def map(self, requests: Sequence[GenerationRequest]) -> Generator[GenerationResult, None, None]:
        """Run ``requests`` as ordinary jobs and yield their results in order. One engine runs them one after
        another, each only when the script asks for the next result (a script that stops early starts no
        more); an engine pool starts them all at once on its free replicas."""
        if self.run_many is not None:
            yield from self.run_many(list(requests))
            return
        for request in requests:
            yield self.run(request)


class SelectableScript(_DeclaredArgs, Generic[ArgsT]):
    """Base class of a script chosen in the Script dropdown (API: ``script_name`` + ``script_args``).

    Such a script takes over the whole job: :meth:`run` receives the request (its own fields cleared) and a
    :class:`JobRunner` for the ordinary jobs it wants, and returns one GenerationResult.
    ``title`` is what the dropdown shows; the API matches ``script_name`` to it case-insensitively.
    Its arguments are declared once as a pydantic model, as for :class:`AlwaysOnScript`: the type parameter
    (``class Plot(SelectableScript[PlotArgs])``) or ``Args``; ``script_args`` map onto its fields in order.
    """

    title: str = ""

    def parse_args(self, args: Sequence[Any]) -> ArgsT:
        """Validate the raw argument list before anything runs; ValueError naming the field otherwise.
        By default into ``Args`` (:func:`validate_args`); without ``Args`` the list itself is the value."""
        if self.Args is None:
            return cast(ArgsT, list(args))
        return cast(ArgsT, validate_args(self.Args, args))

    def run(self, request: GenerationRequest, args: ArgsT, run_job: JobRunner,
            control: JobControl) -> GenerationResult:
        """Do the work; ``control`` is the job's JobControl (progress text, interrupt checks)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")


class SelectableScriptRegistry:
    """Titles to selectable scripts; built-in titles cannot be replaced by a plug-in."""

    def __init__(self) -> None:
        self._scripts: NamedRegistry[SelectableScript[Any]] = NamedRegistry("script")

    def register(self, script: SelectableScript[Any], *, builtin: bool = False) -> None:
        """Add ``script`` under its title; ValueError if a built-in has that title or it has none."""
        key = script.title.lower()
        if not key:
            raise ValueError(f"{type(script).__name__}: a selectable script needs a title")
        self._scripts.register(key, script, builtin=builtin, label=script.title)

    def is_builtin(self, title: str) -> bool:
        """Whether ``title`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        return self._scripts.is_builtin(title.lower())

    def all(self) -> list[SelectableScript[Any]]:
        return list(self._scripts.snapshot().values())

    def parse(self, title: str, args: Sequence[Any]) -> tuple[SelectableScript[Any], Any]:
        """The script called ``title`` and its parsed args; ScriptError for an unknown title or bad args."""
        script = self._scripts.get(title.lower())
        if script is None:
            known = ", ".join(s.title for s in self.all()) or "none are installed"
            raise ScriptError(f"script_name: no script called {title!r}; available: {known}")
        try:
            return script, script.parse_args(list(args))
        except ScriptError:
            raise
        except (ValueError, TypeError, LookupError) as error:
            raise ScriptError(f"script_args ({script.title}): {error}") from error
