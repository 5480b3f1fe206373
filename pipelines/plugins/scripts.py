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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from pipelines.plugins.registry import NamedRegistry


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
    """What a patch adds to the UNet's skip connections (diffusers' ControlNet interface)."""

    down: Sequence[torch.Tensor]
    mid: torch.Tensor | None = None

    def __add__(self, other: UnetResiduals) -> UnetResiduals:
        mid = other.mid if self.mid is None else self.mid if other.mid is None else self.mid + other.mid
        return UnetResiduals([a + b for a, b in zip(self.down, other.down, strict=True)], mid)


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
    kwargs: dict[str, Any] = {"down_block_additional_residuals": tuple(total.down)}
    if total.mid is not None:
        kwargs["mid_block_additional_residual"] = total.mid
    return kwargs


@dataclass
class Job:
    """What a script sees of one job, and what it may add to it.

    ``model`` is the :class:`~pipelines.models.manager.LoadedModel` the job runs on (``.unet``, ``.vae``, ``.pipe``,
    ``.family``, ``.is_sdxl``); ``request`` is the validated request; ``args`` is what the script's
    :meth:`~AlwaysOnScript.parse_args` returned.
    """

    request: Any
    model: Any
    device: torch.device
    args: Any = None
    #: Infotext keys recorded on every image of the job.
    infotext: dict[str, object] = field(default_factory=dict)
    #: Images returned after the generated ones (e.g. ControlNet's detected maps); not saved to disk.
    extra_images: list[Image.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    patches: list[UnetPatch] = field(default_factory=list)
    _undo: ExitStack = field(default_factory=ExitStack, repr=False)

    def add_unet_patch(self, patch: UnetPatch) -> None:
        """Apply ``patch`` to every UNet call of this job (first pass and hires pass)."""
        self.patches.append(patch)

    def defer(self, undo: Callable[[], object]) -> None:
        """Run ``undo`` when the job ends, however it ends; newest first."""
        self._undo.callback(undo)


class AlwaysOnScript:
    """Base class of an always-on script; override what you need.

    ``name`` is the key in ``alwayson_scripts`` (lowercase); ``title`` is shown in the UI and in
    ``/sdapi/v1/scripts``.
    """

    name: str = ""
    title: str = ""

    def parse_args(self, args: Sequence[Any]) -> Any:
        """Validate the raw argument list; return the value :attr:`Job.args` holds, or None to stay off for
        this job. Raise ValueError naming the field and its allowed values for bad input."""
        return list(args) if args else None

    def before_job(self, job: Job) -> None:
        """Set up the job: add UNet patches, infotext keys, undo callbacks."""

    def on_step(self, job: Job, step: int, latents: torch.Tensor) -> None:
        """Called before every sampling step. Must not synchronise with the GPU (no ``.item()``, no ``.cpu()``)."""

    def after_batch(self, job: Job, images: list[Image.Image]) -> None:
        """Called with the decoded images of each batch (the list may be changed in place)."""


class ScriptError(ValueError):
    """Bad ``alwayson_scripts`` input; the message names the script and the field."""


class ScriptRegistry:
    """Names to always-on scripts. Built-in names cannot be replaced by a plug-in."""

    def __init__(self) -> None:
        self._scripts: NamedRegistry[AlwaysOnScript] = NamedRegistry("always-on script")

    def register(self, script: AlwaysOnScript, *, builtin: bool = False) -> None:
        """Add ``script`` under ``script.name``; ValueError if that name is taken by a built-in or is empty."""
        name = script.name.lower()
        if not name:
            raise ValueError(f"{type(script).__name__}: an always-on script needs a name")
        self._scripts.register(name, script, builtin=builtin)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        return self._scripts.is_builtin(name.lower())

    def get(self, name: str) -> AlwaysOnScript | None:
        return self._scripts.get(name.lower())

    def all(self) -> list[AlwaysOnScript]:
        return list(self._scripts.snapshot().values())

    def parse(self, requested: Mapping[str, Sequence[Any]]) -> list[tuple[AlwaysOnScript, Any]]:
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

    jobs: list[tuple[AlwaysOnScript, Job]]

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
def running_scripts(enabled: Sequence[tuple[AlwaysOnScript, Any]], request: Any, model: Any,
                    device: torch.device) -> Iterator[ScriptRun]:
    """Set up every enabled script for one job and undo all of it on the way out, newest first."""
    with ExitStack() as stack:
        run = ScriptRun([])
        for script, args in enabled:
            job = Job(request=request, model=model, device=device, args=args)
            stack.enter_context(job._undo)
            run.jobs.append((script, job))
            script.before_job(job)
        yield run


# --- selectable scripts (the Script dropdown: X/Y/Z plot, prompt matrix, ...) ------------------------


class JobRunner(Protocol):
    """Runs one ordinary job for a selectable script, under the script's own progress and interrupt.

    ``options`` are the job's Options: a script that saves a grid honours ``grid_save`` and passes them to
    ``save_grid`` (folder and format)."""

    options: Any

    def __call__(self, request: Any) -> Any:
        """Run ``request`` (a GenerationRequest with no script) and return its GenerationResult."""


@dataclass(frozen=True)
class ScriptJobs:
    """The engine's :class:`JobRunner`: ``run`` runs one ordinary job with ``options``."""

    run: Callable[[Any], Any]
    options: Any

    def __call__(self, request: Any) -> Any:
        return self.run(request)


class SelectableScript:
    """Base class of a script chosen in the Script dropdown (API: ``script_name`` + ``script_args``).

    Such a script takes over the whole job: :meth:`run` receives the request (its own fields cleared) and a
    :class:`JobRunner` for the ordinary jobs it wants, and returns one GenerationResult.
    ``title`` is what the dropdown shows; the API matches ``script_name`` to it case-insensitively.
    """

    title: str = ""

    def parse_args(self, args: Sequence[Any]) -> Any:
        """Validate the raw argument list before anything runs; ValueError naming the field otherwise."""
        return list(args)

    def run(self, request: Any, args: Any, run_job: JobRunner, control: Any) -> Any:
        """Do the work; ``control`` is the job's JobControl (progress text, interrupt checks)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")


class SelectableScriptRegistry:
    """Titles to selectable scripts; built-in titles cannot be replaced by a plug-in."""

    def __init__(self) -> None:
        self._scripts: NamedRegistry[SelectableScript] = NamedRegistry("script")

    def register(self, script: SelectableScript, *, builtin: bool = False) -> None:
        """Add ``script`` under its title; ValueError if a built-in has that title or it has none."""
        key = script.title.lower()
        if not key:
            raise ValueError(f"{type(script).__name__}: a selectable script needs a title")
        self._scripts.register(key, script, builtin=builtin, label=script.title)

    def is_builtin(self, title: str) -> bool:
        """Whether ``title`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        return self._scripts.is_builtin(title.lower())

    def all(self) -> list[SelectableScript]:
        return list(self._scripts.snapshot().values())

    def parse(self, title: str, args: Sequence[Any]) -> tuple[SelectableScript, Any]:
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
