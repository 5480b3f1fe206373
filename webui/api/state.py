"""What POST /sdapi/v1/options sets besides the engine's :class:`~pipelines.options.Options`.

A1111 exposes the selected checkpoint, VAE and clip skip as options. Here the checkpoint is the model
manager's active one, and the VAE and clip skip are the API's defaults for requests that do not
override them. A request's ``override_settings`` are fields of that request only; this object records
just enough to keep an override from becoming the next request's model.
"""

from __future__ import annotations

import threading

from pipelines.manager import ModelManager


class ApiSelection:
    """The checkpoint, VAE and clip skip a request without overrides runs with."""

    def __init__(self, vae: str = "Automatic", clip_skip: int = 1):
        self._lock = threading.Lock()
        self.vae = vae
        self.clip_skip = clip_skip
        self._selected: str | None = None
        # The title an override request loaded; while it is still the active model, requests without an
        # override go back to ``_selected`` instead of staying on it.
        self._override_title: str | None = None

    def checkpoint(self, models: ModelManager) -> str | None:
        """The checkpoint title a request without an override uses (None: there is no checkpoint at all).

        Call from inside a queued job, so that the active model cannot change meanwhile. A model that
        someone else activated (the UI, POST options) becomes the selection; after an unload, the
        selection stays and is loaded again.
        """
        current = models.current
        title = current.file.title if current else None
        with self._lock:
            if title is not None and (self._override_title is None or title != self._override_title):
                self._selected, self._override_title = title, None
            if self._selected is None:
                self._selected = _engine_default(models)
            return self._selected

    def peek_checkpoint(self, models: ModelManager) -> str | None:
        """What :meth:`checkpoint` would answer now, without recording anything (for GET options)."""
        current = models.current
        title = current.file.title if current else None
        with self._lock:
            if title is not None and (self._override_title is None or title != self._override_title):
                return title
            return self._selected or _engine_default(models)

    def loaded_for_override(self, title: str) -> None:
        """An override request made ``title`` the active model; the selection stays what it was."""
        with self._lock:
            if title != self._selected:
                self._override_title = title

    def select(self, title: str) -> None:
        """POST options chose ``title``."""
        with self._lock:
            self._selected, self._override_title = title, None


def _engine_default(models: ModelManager) -> str | None:
    """The checkpoint the engine loads when asked for none (None when there is no checkpoint)."""
    try:
        return models.resolve(None).title
    except LookupError:
        return None
