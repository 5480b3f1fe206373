"""The extensions' part of a generation tab: always-on script accordions, the Script dropdown, prompt panels.

Every builder is an extension's code, so each runs in isolation: one that raises (or returns something
other than :class:`~webui.extension_api.ScriptControls`) is logged with the extension's script name and
the error, and what it had built so far is taken off the page; the rest of the page is unaffected.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import gradio as gr
from gradio.context import get_blocks_context

from webui.context import AppContext
from webui.extension_api import ScriptControls, TabUi

log = logging.getLogger(__name__)

NONE = "None"
T = TypeVar("T")

#: What a paste field names: an infotext key, or a function of the parsed infotext returning the value.
PasteSource = str | Callable[[dict[str, Any]], Any]


def slug(title: str) -> str:
    """``"X/Y/Z plot"`` -> ``"x_y_z_plot"``: a title as it appears in elem_ids."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


@dataclass
class _Built:
    """One script's controls as placed on the page."""

    key: str  # the always-on script's name, or the selectable script's title
    controls: ScriptControls

    def args(self, values: list[Any]) -> list[Any]:
        values = list(values)
        return list(self.controls.to_args(values)) if self.controls.to_args else values


@dataclass
class ExtensionControls:
    """The extension controls of one tab and how their values become request fields."""

    tab: str
    alwayson: list[_Built] = field(default_factory=list)
    selectable: list[_Built] = field(default_factory=list)
    script: gr.Dropdown | None = None

    @property
    def inputs(self) -> list[gr.components.Component]:
        """Every input, flat: the Script dropdown (when there is one), then each script's inputs in order."""
        heads = [self.script] if self.script is not None else []
        return heads + [c for built in (*self.alwayson, *self.selectable) for c in built.controls.inputs]

    @property
    def paste_fields(self) -> list[tuple[gr.components.Component, PasteSource]]:
        """The (component, infotext key or function) pairs the scripts declared for pasting."""
        return [pair for built in (*self.alwayson, *self.selectable) for pair in built.controls.paste]

    def request_fields(self, values: list[Any]) -> tuple[dict[str, list[Any]], str | None, list[Any]]:
        """(alwayson_scripts, script_name, script_args) from the values of :attr:`inputs`, in that order.

        Every always-on script with controls gets its argument list (its ``parse_args`` decides whether
        that turns it on, as with the API); the selected script gets its arguments, the others none.
        """
        values = list(values)
        selected = values.pop(0) if self.script is not None else NONE
        alwayson: dict[str, list[Any]] = {}
        for built in self.alwayson:
            count = len(built.controls.inputs)
            alwayson[built.key] = built.args(values[:count])
            values = values[count:]
        script_name, script_args = None, []
        for built in self.selectable:
            count = len(built.controls.inputs)
            if built.key == selected:
                script_name, script_args = built.key, built.args(values[:count])
            values = values[count:]
        if selected and selected != NONE and script_name is None:
            script_name = selected  # a script without controls
        return alwayson, script_name, script_args


def _build_isolated(what: str, container: gr.blocks.BlockContext, build: Callable[[], T]) -> T | None:
    """Run an extension's ``build`` inside ``container`` (just created, not entered); if it fails, log it,
    take the container and everything built in it off the page, and return None.

    Gradio has no transaction for a half-built layout, so the blocks and event handlers added meanwhile are
    removed by id, and the container is unrendered (after it is closed, so the layout context is intact).
    """
    config = get_blocks_context()
    blocks_before = set(config.blocks) if config else set()
    fns_before = set(config.fns) if config else set()
    try:
        with container:
            return build()
    except Exception:  # an extension's bug must not break the page: log it, leave its controls out
        log.exception("%s failed to build its UI and is left out of the page", what)
        container.unrender()
        if config is not None:
            for block_id in set(config.blocks) - blocks_before:
                config.blocks.pop(block_id, None)
            for fn_id in set(config.fns) - fns_before:
                config.fns.pop(fn_id, None)
        return None


def _controls_from(builder: Callable[[TabUi], Any], tab_ui: TabUi, what: str) -> ScriptControls:
    controls = builder(tab_ui)
    if not isinstance(controls, ScriptControls):
        raise TypeError(f"{what}'s UI builder returned {type(controls).__name__}, not ScriptControls")
    return controls


def build_prompt_panels(ctx: AppContext, tab_ui: TabUi) -> None:
    """The extensions' panels under the prompt of ``tab_ui.tab`` (e.g. the LoRA browser), each in an accordion."""
    for panel in ctx.extensions.panels:
        if tab_ui.tab not in panel.tabs:
            continue
        box = gr.Accordion(panel.title, open=False, elem_id=f"{tab_ui.tab}_panel_{slug(panel.title)}")
        _build_isolated(f"prompt panel {panel.title!r}", box, partial(panel.build, tab_ui))


def build_extension_controls(ctx: AppContext, tab_ui: TabUi) -> ExtensionControls:
    """One accordion per always-on script with a UI on this tab, then the Script dropdown and its scripts
    (below the accordions, as in A1111)."""
    tab = tab_ui.tab
    built = ExtensionControls(tab)
    for name, builder in ctx.extensions.scripts_for(tab):
        script = ctx.engine.scripts.get(name)
        if builder is None or script is None:
            continue  # API-only script
        what = f"always-on script {name!r}"
        box = gr.Accordion(script.title or name, open=False, elem_id=f"{tab}_script_{slug(name)}")
        controls = _build_isolated(what, box, partial(_controls_from, builder, tab_ui, what))
        if controls is not None:
            built.alwayson.append(_Built(name, controls))

    selectable = ctx.extensions.selectable_for(tab)
    groups: list[tuple[str, gr.Column]] = []
    built.script = gr.Dropdown([NONE, *(title for title, _ in selectable)], value=NONE, label="Script",
                               elem_id=f"{tab}_script")
    for title, builder in selectable:
        if builder is None:
            continue
        what = f"script {title!r}"
        # A Column, not a Group: Gradio's frontend puts a Group's elem_id on two nested elements.
        group = gr.Column(visible=False, elem_id=f"{tab}_script_{slug(title)}")
        controls = _build_isolated(what, group, partial(_controls_from, builder, tab_ui, what))
        if controls is not None:
            built.selectable.append(_Built(title, controls))
            groups.append((title, group))

    def show(selected: str) -> list:
        return [gr.update(visible=title == selected) for title, _ in groups]

    if groups:
        built.script.change(show, inputs=[built.script], outputs=[group for _, group in groups],
                            show_progress="hidden", queue=False)
    return built
