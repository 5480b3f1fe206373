"""Filling a tab's controls from an infotext (PNG Info -> Send to txt2img / img2img, Send to img2img).

The extensions' paste hooks rewrite the parsed infotext first (e.g. LoRAs found by hash); then our
controls and the ones the extensions' scripts declared in ``ScriptControls.paste`` are filled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.models.catalog import ModelFile
from pipelines.request import SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER
from pipelines.sampling.samplers import find_sampler
from webui.context import AppContext
from webui.ui.controls import GenerationControls, schedule_choices
from webui.ui.extension_ui import ExtensionControls, PasteSource
from webui.ui.prompts import PromptArea
from webui.ui.refiner import NO_REFINER
from webui.ui.topbar import TopBar

log = logging.getLogger(__name__)


@dataclass
class PasteTarget:
    """Every control of one tab an infotext can fill, by request field name."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    checkpoint: gr.Dropdown | None = None
    #: The extensions' controls with the infotext key (or function of the parsed infotext) that fills each.
    scripts: list[tuple[gr.components.Component, PasteSource]] = field(default_factory=list)
    #: The top bar's "VAE / Text Encoder" list, filled from Forge's "Module N" keys.
    modules: gr.Dropdown | None = None

    @classmethod
    def of(cls, topbar: TopBar, area: PromptArea, controls: GenerationControls,
           extra: dict[str, gr.components.Component] | None = None,
           extensions: ExtensionControls | None = None) -> PasteTarget:
        fields = {"prompt": area.prompt, "negative_prompt": area.negative_prompt, "clip_skip": topbar.clip_skip,
                  **controls.fields, **(extra or {})}
        return cls(fields, topbar.checkpoint, extensions.paste_fields if extensions else [], topbar.modules)

    @property
    def outputs(self) -> list[gr.components.Component]:
        ours = [*self.fields.values(), self.checkpoint, *([self.modules] if self.modules is not None else [])]
        return ours + [c for c, _ in self.scripts if all(c is not o for o in ours)]


def _coerce(component: gr.components.Component, value: Any) -> Any:
    """An infotext value (text or number) as the component expects it."""
    if isinstance(component, gr.Checkbox) and isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on", "enabled")
    if isinstance(component, (gr.Slider, gr.Number)) and isinstance(value, str):
        return float(value)
    if isinstance(component, gr.Textbox) and not isinstance(value, str):
        return str(value)
    return value


def script_updates(params: dict[str, Any], pairs: list[tuple[gr.components.Component, PasteSource]]
                   ) -> dict[gr.components.Component, Any]:
    """Updates for the extensions' paste fields: an infotext key fills its control when present; a function
    is called with the whole parsed infotext and fills its control unless it returns None. A function that
    fails, or a value the control cannot take, is logged and skipped, so one extension cannot break pasting.
    """
    updates: dict[gr.components.Component, Any] = {}
    for component, source in pairs:
        try:
            if isinstance(source, str):
                if source not in params:
                    continue
                value = params[source]
            else:
                value = source(dict(params))
                if value is None:
                    continue
            updates[component] = gr.update(value=_coerce(component, value))
        except Exception:  # an extension's paste function or an odd infotext value: skip that control only
            log.exception("pasting into an extension's control (%s) failed; it was left as it was", source)
    return updates


def find_model(ctx: AppContext, fields: dict[str, Any]) -> tuple[ModelFile | None, str | None]:
    """The checkpoint an infotext names (by hash first, then by name), and a warning when it is not here."""
    wanted_hash, wanted_name = fields.get("sd_model_hash"), fields.get("sd_model_name")
    for query in (wanted_hash, wanted_name):
        if query:
            try:
                return ctx.engine.registry.find_checkpoint(str(query)), None
            except LookupError:
                continue
    if wanted_hash or wanted_name:
        named = " ".join(part for part in (str(wanted_name or ""), f"[{wanted_hash}]" if wanted_hash else "") if part)
        return None, f"The image was made with checkpoint {named}, which is not in your models folder; " \
                     "the current checkpoint is kept."
    return None, None


def find_modules(ctx: AppContext, names: list[str]) -> tuple[list[str], str | None]:
    """The "VAE / Text Encoder" choices (file names) of an infotext's "Module N" names, and a warning naming
    those that are not here (left out)."""
    found, missing = [], []
    for name in names:
        try:
            found.append(ctx.engine.registry.find_module(name).name)
        except LookupError:
            missing.append(name)
    warning = (f"The image was made with the modules {', '.join(missing)}, which are not in your text_encoder / "
               "VAE folders; they were left out.") if missing else None
    return found, warning


def _hires_choices(ctx: AppContext, fields: dict[str, Any]) -> None:
    """The hires dropdowns' values for a pasted hires infotext: a missing key means "Use same ...", the
    checkpoint is shown by its title, and one that is not here (or an unknown sampler) is warned about."""
    name = fields.get("hr_checkpoint_name")
    if name:
        try:
            fields["hr_checkpoint_name"] = ctx.engine.registry.find_checkpoint(str(name)).title
        except LookupError:
            gr.Warning(f"The hires pass used checkpoint {name}, which is not in your models folder; "
                       f"'{SAME_CHECKPOINT}' is set instead.")
            fields["hr_checkpoint_name"] = None
    sampler = fields.get("hr_sampler_name")
    if sampler:
        try:
            fields["hr_sampler_name"] = find_sampler(str(sampler)).name
        except ValueError:
            gr.Warning(f"Unknown hires sampler {sampler!r}; '{SAME_SAMPLER}' is set instead.")
            fields["hr_sampler_name"] = None
    same = {"hr_checkpoint_name": SAME_CHECKPOINT, "hr_sampler_name": SAME_SAMPLER, "hr_scheduler": SAME_SCHEDULER,
            "hr_prompt": "", "hr_negative_prompt": ""}
    for key, value in same.items():
        if not fields.get(key):
            fields[key] = value


def _refiner_choice(ctx: AppContext, fields: dict[str, Any]) -> None:
    """The Refiner dropdown's value for a pasted infotext: no "Refiner" key means none (as A1111, whose
    accordion closes then); the refiner is shown by its title, and one that is not here is warned about."""
    name = fields.get("refiner_checkpoint")
    fields["refiner_checkpoint"] = NO_REFINER
    if name:
        try:
            fields["refiner_checkpoint"] = ctx.engine.registry.find_checkpoint(str(name)).title
        except LookupError:
            gr.Warning(f"The image was refined with checkpoint {name}, which is not in your models folder; "
                       f"the refiner is set to '{NO_REFINER}'.")


def paste_updates(ctx: AppContext, text: str, target: PasteTarget) -> dict[gr.components.Component, Any]:
    """Updates for every control the infotext names; warns (in the browser) about what cannot be used."""
    if not (text or "").strip():
        raise gr.Error("No parameters to send: the image has no infotext.")
    try:
        params = ctx.extensions.apply_paste_hooks(parse_infotext(text))
        fields = request_fields_from_infotext(params)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    updates: dict[gr.components.Component, Any] = {}
    sampler = fields.get("sampler_name")
    if sampler is not None:
        try:
            fields["sampler_name"] = find_sampler(str(sampler)).name
        except ValueError:
            gr.Warning(f"Unknown sampler {sampler!r}; the sampling method was left as it was.")
            fields.pop("sampler_name")
    if fields.get("enable_hr"):
        _hires_choices(ctx, fields)
    if "refiner_checkpoint" in target.fields:
        _refiner_choice(ctx, fields)
    for name, value in fields.items():
        component = target.fields.get(name)
        if component is None:
            continue
        if name == "scheduler" and "sampler_name" in fields:
            updates[component] = gr.update(choices=schedule_choices(fields["sampler_name"]), value=value)
        else:
            updates[component] = gr.update(value=value)
    model, warning = find_model(ctx, fields)
    if model is not None and target.checkpoint is not None:
        updates[target.checkpoint] = gr.update(value=model.title)
    if warning:
        gr.Warning(warning)
    if "additional_modules" in fields and target.modules is not None:
        modules, warning = find_modules(ctx, fields["additional_modules"])
        updates[target.modules] = gr.update(value=modules)
        if warning:
            gr.Warning(warning)
    updates.update(script_updates(params, target.scripts))
    return updates
