"""A request resolved once, before any model work: :class:`JobPlan`, built by :meth:`Engine.plan`.

Every name a request holds (checkpoint, VAE, hires upscaler and checkpoint, styles, always-on scripts,
the Script dropdown's script) is looked up here, the same way for the UI, the API and a Python caller.
A name that matches nothing raises :class:`RequestError`, whose message starts with the field
(``checkpoint:``, ``vae:``, ``hr_upscaler:``, ``hr_checkpoint_name:``, ``refiner_checkpoint:``, ``styles:``,
``alwayson_scripts...``, ``script_name:``, ``script_args...``) and lists what is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.models.catalog import ModelFile
from pipelines.plugins.scripts import AlwaysOnScript, ScriptError, SelectableScript
from pipelines.prompts.styles import Style
from pipelines.request import GenerationRequest


class RequestError(LookupError):
    """A request names something that does not exist; ``field`` is the request field, the message names it
    and what is available. A LookupError, as the engine's model lookups have always raised."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return str(self.args[0])


class ScriptRequestError(RequestError, ScriptError):
    """A script refused its arguments (or is not installed): a :class:`RequestError` that is also the
    :class:`~pipelines.plugins.scripts.ScriptError` (ValueError) scripts raise."""

    @classmethod
    def wrap(cls, field: str, error: ScriptError) -> ScriptRequestError:
        """``error`` (raised by a script registry) as a request error for ``field``."""
        return cls(field, str(error))


@dataclass(frozen=True)
class JobPlan:
    """What a request resolved to. ``request`` is the request as given; the other fields are what its names mean.

    ``script`` is set when the request picks a script of the Script dropdown: that script then runs the
    job (through ordinary sub-jobs, each planned on its own).
    """

    request: GenerationRequest
    checkpoint: ModelFile
    #: The VAE file; None for "Automatic" / "None" (the checkpoint's own).
    vae: ModelFile | None = None
    #: The hires pass's own checkpoint (``hr_checkpoint_name``); None: the first pass's.
    hires_checkpoint: ModelFile | None = None
    #: The refiner (``refiner_checkpoint``); None: no refiner.
    refiner: ModelFile | None = None
    #: The hires fix's image upscaler (its library entry); None for a latent mode or no hires fix.
    hires_upscaler: Any = None
    #: The always-on scripts the request enables, with their parsed arguments.
    scripts: tuple[tuple[AlwaysOnScript, Any], ...] = ()
    #: The selectable script and its parsed arguments, if ``script_name`` is set.
    script: tuple[SelectableScript, Any] | None = None
    styles: tuple[Style, ...] = field(default_factory=tuple)

    @property
    def vae_name(self) -> str:
        """The request's ``vae`` as the model manager takes it: a VAE's name or "Automatic"."""
        return self.vae.name if self.vae is not None else "Automatic"


def script_field(error: ScriptError, default: str) -> str:
    """The request field a selectable-script registry error is about (its message starts with it)."""
    return "script_name" if str(error).startswith("script_name:") else default


def unknown_styles_message(unknown: Sequence[str], available: Sequence[str]) -> str:
    """The ``styles:`` error text: the unknown names and the ones to choose from."""
    return (f"styles: unknown style(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(available) or 'none (styles.csv is empty)'}")
