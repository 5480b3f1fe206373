"""Extra-network prompt tags (``<lora:name:0.8>``): who handles which name, for the length of one job.

The engine takes ``<name:args>`` tags out of the prompt before encoding (docs/compatibility.md §6) and hands them to
the handler registered for ``name``. A handler changes the model for one job and undoes it afterwards,
also when the job failed or was interrupted, so nothing leaks into the next job. Tags nobody handles are
reported in the result's warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Protocol

from pipelines.models.manager import LoadedModel
from pipelines.plugins.registry import NamedRegistry
from pipelines.prompts.parser import ExtraNetworkTag

log = logging.getLogger(__name__)


class ExtraNetworkHandler(Protocol):
    """Handles the prompt tags of one name (``lora``, ...)."""

    def activate(self, model: LoadedModel, tags: Sequence[ExtraNetworkTag]) -> Mapping[str, object]:
        """Apply the tags to ``model`` (a :class:`~pipelines.models.manager.LoadedModel`) for one job.

        Returns infotext params to record (e.g. ``{"Lora hashes": "..."}``). Raise ValueError naming the
        tag for bad arguments; the job then fails before sampling.
        """

    def deactivate(self, model: LoadedModel) -> None:
        """Undo everything :meth:`activate` did. Called after every job that activated, whatever happened."""

    # Optional: ``warnings(model) -> Sequence[str]``, read right after activate, for lines the job's result
    # shows (e.g. a tag that was skipped because it does not fit the model, which A1111 does not fail on).


class ExtraNetworkRegistry:
    """Names to handlers. Built-in names cannot be replaced by a plug-in."""

    def __init__(self) -> None:
        self._handlers: NamedRegistry[ExtraNetworkHandler] = NamedRegistry("extra network")

    def register(self, name: str, handler: ExtraNetworkHandler, *, builtin: bool = False) -> None:
        """Make ``handler`` handle ``<name:...>`` tags; ValueError if a built-in already has that name."""
        self._handlers.register(name, handler, builtin=builtin)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        return self._handlers.is_builtin(name)

    def names(self) -> list[str]:
        return list(self._handlers.snapshot())

    @contextmanager
    def activated(self, model: LoadedModel, tags: Sequence[ExtraNetworkTag]) -> Iterator[tuple[dict, list[str]]]:
        """Activate the handlers of ``tags`` for one job; yields (infotext params, warnings).

        Handlers are deactivated in reverse order on the way out, whether the job finished, failed or was
        interrupted.
        """
        handlers = self._handlers.snapshot()
        by_name: dict[str, list[ExtraNetworkTag]] = {}
        for tag in tags:
            by_name.setdefault(tag.name, []).append(tag)
        unknown = sorted(name for name in by_name if name not in handlers)
        warnings = [f"No extension handles the prompt tags <{name}:...>; they were ignored." for name in unknown]
        params: dict[str, object] = {}
        with ExitStack() as stack:
            for name, group in by_name.items():
                handler = handlers.get(name)
                if handler is None:
                    continue
                params.update(handler.activate(model, group))
                stack.callback(handler.deactivate, model)
                handler_warnings = getattr(handler, "warnings", None)
                if callable(handler_warnings):
                    warnings.extend(str(line) for line in handler_warnings(model))
            yield params, warnings
