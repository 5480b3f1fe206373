"""UI defaults (the values controls start with), persisted to ``ui-config.json`` in the data dir.

Keys follow A1111's ``<tab>/<label>/value`` shape. The file is read once when the UI is built; the
Settings tab's "Save UI defaults" writes the current values of every registered control.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.files import write_atomically

log = logging.getLogger(__name__)


class UiDefaults:
    """Initial control values read from ``ui-config.json``, and the controls they belong to."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, Any] = {}
        self.components: dict[str, gr.components.Component] = {}
        if path.is_file():
            try:
                self.values = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                # A hand-edited file with a typo must not keep the app from starting.
                log.warning("ignoring %s: %s", path, error)

    def value(self, key: str, fallback: Any) -> Any:
        """The saved default for ``key``, or ``fallback``."""
        return self.values.get(key, fallback)

    def register(self, key: str, component: gr.components.Component) -> gr.components.Component:
        """Remember ``component`` under ``key`` so its value can be saved as a default."""
        self.components[key] = component
        return component

    def forget(self, keys: tuple[str, ...]) -> None:
        """Drop ``keys`` from the file (their controls then start with their built-in default)."""
        if any(key in self.values for key in keys):
            self._write({key: value for key, value in self.values.items() if key not in keys})

    def save(self, values: dict[str, Any]) -> None:
        """Write ``values`` merged over what the file holds, atomically."""
        self._write({**self.values, **values})

    def _write(self, merged: dict[str, Any]) -> None:
        write_atomically(self.path, json.dumps(merged, indent=2, ensure_ascii=False).encode("utf-8"))
        self.values = merged
