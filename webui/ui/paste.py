"""Filling a tab's controls from an infotext (PNG Info -> Send to txt2img / img2img, Send to img2img)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from pipelines.infotext import parse_infotext, request_fields_from_infotext
from pipelines.registry import ModelFile
from pipelines.samplers import find_sampler
from webui.context import AppContext
from webui.ui.controls import GenerationControls, schedule_choices
from webui.ui.prompts import PromptArea
from webui.ui.topbar import TopBar


@dataclass
class PasteTarget:
    """Every control of one tab an infotext can fill, by request field name."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    checkpoint: gr.Dropdown | None = None

    @classmethod
    def of(cls, topbar: TopBar, area: PromptArea, controls: GenerationControls,
           extra: dict[str, gr.components.Component] | None = None) -> PasteTarget:
        fields = {"prompt": area.prompt, "negative_prompt": area.negative_prompt, "clip_skip": topbar.clip_skip,
                  **controls.fields, **(extra or {})}
        return cls(fields, topbar.checkpoint)

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [*self.fields.values(), self.checkpoint]


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


def paste_updates(ctx: AppContext, text: str, target: PasteTarget) -> dict[gr.components.Component, Any]:
    """Updates for every control the infotext names; warns (in the browser) about what cannot be used."""
    if not (text or "").strip():
        raise gr.Error("No parameters to send: the image has no infotext.")
    try:
        fields = request_fields_from_infotext(parse_infotext(text))
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
    return updates
