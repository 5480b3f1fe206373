"""Extra-network prompt tags (``<lora:name:0.8>``): who handles which name, for the length of one job.

The engine takes ``<name:args>`` tags out of the prompt before encoding (REFERENCE §6) and hands them to
the handler registered for ``name``. A handler changes the model for one job and undoes it afterwards,
also when the job failed or was interrupted, so nothing leaks into the next job. Tags nobody handles are
reported in the result's warnings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Protocol

from pipelines.prompt_parser import ExtraNetworkTag

log = logging.getLogger(__name__)


class ExtraNetworkHandler(Protocol):
    """Handles the prompt tags of one name (``lora``, ...)."""

    def activate(self, model: object, tags: Sequence[ExtraNetworkTag]) -> Mapping[str, object]:
        """Apply the tags to ``model`` (a :class:`~pipelines.manager.LoadedModel`) for one job.

        Returns infotext params to record (e.g. ``{"Lora hashes": "..."}``). Raise ValueError naming the
        tag for bad arguments; the job then fails before sampling.
        """

    def deactivate(self, model: object) -> None:
        """Undo everything :meth:`activate` did. Called after every job that activated, whatever happened."""


class ExtraNetworkRegistry:
    """Names to handlers. Built-in names cannot be replaced by a plug-in."""

    def __init__(self) -> None:
        self._handlers: dict[str, ExtraNetworkHandler] = {}
        self._builtin: set[str] = set()
        self._lock = threading.Lock()

    def register(self, name: str, handler: ExtraNetworkHandler, *, builtin: bool = False) -> None:
        """Make ``handler`` handle ``<name:...>`` tags; ValueError if a built-in already has that name."""
        with self._lock:
            if name in self._builtin:
                raise ValueError(f"extra network {name!r} is built in and cannot be replaced")
            self._handlers[name] = handler
            if builtin:
                self._builtin.add(name)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` belongs to a built-in (and so cannot be registered by a plug-in)."""
        with self._lock:
            return name in self._builtin

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    @contextmanager
    def activated(self, model: object, tags: Sequence[ExtraNetworkTag]) -> Iterator[tuple[dict, list[str]]]:
        """Activate the handlers of ``tags`` for one job; yields (infotext params, warnings).

        Handlers are deactivated in reverse order on the way out, whether the job finished, failed or was
        interrupted.
        """
        with self._lock:
            handlers = dict(self._handlers)
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
            yield params, warnings
