"""What POST /sdapi/v1/options sets besides the Settings tab's options: checkpoint, VAE and clip skip.

A1111 exposes the selected checkpoint, VAE and clip skip as options. Here the checkpoint is the model
manager's active one, and the VAE and clip skip are the defaults for requests that do not override
them; all three are kept in the options (``config.json``), shared with the UI's top bar, so that they
survive a restart. A request's ``override_settings`` are fields of that request only; this object
records just enough to keep an override from becoming the next request's model.
"""

from __future__ import annotations

import threading
from typing import Any

from pipelines.models.manager import ModelManager
from webui.context import AppContext


class ApiSelection:
    """The checkpoint, VAE and clip skip a request without overrides runs with."""

    def __init__(self, ctx: AppContext):
        self._ctx = ctx
        self._lock = threading.Lock()
        self._selected: str | None = None
        # The title an override request loaded; while it is still the active model, requests without an
        # override go back to ``_selected`` instead of staying on it.
        self._override_title: str | None = None

    @property
    def vae(self) -> str:
        return self._ctx.options.sd_vae

    @property
    def clip_skip(self) -> int:
        return self._ctx.options.CLIP_stop_at_last_layers

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

    def select(self, title: str | None = None, vae: str | None = None, clip_skip: int | None = None,
               other_options: dict[str, Any] | None = None) -> None:
        """POST options chose these (None: unchanged); saved with ``other_options`` in one write."""
        changes = dict(other_options or {})
        if title is not None:
            with self._lock:
                self._selected, self._override_title = title, None
            changes["sd_model_checkpoint"] = title
        if vae is not None:
            changes["sd_vae"] = vae
        if clip_skip is not None:
            changes["CLIP_stop_at_last_layers"] = clip_skip
        if changes:
            self._ctx.update_options(changes)


def _engine_default(models: ModelManager) -> str | None:
    """The checkpoint the engine loads when asked for none (None when there is no checkpoint)."""
    try:
        return models.resolve(None).title
    except LookupError:
        return None
