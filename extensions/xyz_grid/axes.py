"""The axis types of the X/Y/Z plot: what each one changes in the request and which values it accepts."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webui.extension_api import ExtensionAPI

from .values import parse_numbers, split_values

_SIZE = re.compile(r"^(\d+)\s*[x×]\s*(\d+)$")


@dataclass(frozen=True)
class AxisType:
    """One entry of an axis' Type dropdown.

    ``field``: the request field the values set ("" for the axes that need their own ``apply``);
    ``kind``: int, float or str; ``choices``: the values the dropdown offers (None: free text), read from
    the app when the UI is built or args are checked.
    """

    label: str
    field: str = ""
    kind: type = str
    choices: Callable[[ExtensionAPI], list[str]] | None = None
    #: For "Checkpoint name": runs are ordered so that each checkpoint loads once.
    switches_model: bool = False

    def parse(self, text: str, picked: list[str], api: ExtensionAPI) -> list[Any]:
        """The axis' values from its text box, or from its dropdown when one is offered and filled."""
        if self.label == "Nothing":
            return [None]
        if self.choices is not None and picked:
            items = [str(item) for item in picked]
        elif self.kind in (int, float):
            numbers = parse_numbers(text, self.kind)
            if not numbers:
                raise ValueError("no values given")
            return numbers
        else:
            items = split_values(text)
        if not items:
            raise ValueError("no values given")
        if self.label == "Size":
            return [_size(item) for item in items]
        if self.label == "Checkpoint name":
            return [api.find_checkpoint(item) for item in items]
        if self.choices is not None:
            return [_choose(item, self.choices(api)) for item in items]
        return items

    def apply(self, fields: dict[str, Any], value: Any, values: list[Any]) -> None:
        """Set ``value`` in the request ``fields``; ``values`` are all of the axis' values."""
        if self.label == "Nothing":
            return
        if self.label == "Prompt S/R":
            search = values[0]
            fields["prompt"] = fields["prompt"].replace(search, value)
            fields["negative_prompt"] = fields["negative_prompt"].replace(search, value)
        elif self.label == "Size":
            fields["width"], fields["height"] = value
        else:
            fields[self.field] = value

    def caption(self, value: Any) -> str:
        """The heading of a row or column with this value."""
        if self.label == "Nothing":
            return ""
        if self.label == "Prompt S/R":
            return str(value)
        if self.label == "Checkpoint name":  # "name.safetensors [hash]" -> "name"
            return re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", str(value).rsplit(" [", 1)[0].rsplit("/", 1)[-1])
        if self.label == "Size":
            return f"Size: {value[0]}x{value[1]}"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return f"{self.label}: {value}"


def _size(item: str) -> tuple[int, int]:
    match = _SIZE.match(item.strip())
    if not match:
        raise ValueError(f"{item!r} is not a size like 512x768")
    return int(match.group(1)), int(match.group(2))


def _choose(item: str, allowed: list[str]) -> str:
    """``item`` as spelled in ``allowed`` (case does not matter); ValueError lists the allowed values."""
    for choice in allowed:
        if choice.lower() == item.lower():
            return choice
    raise ValueError(f"{item!r} is not one of {', '.join(allowed)}")


#: In the order the Type dropdowns list them; a plot's args name a type by label (or by index here).
AXIS_TYPES: list[AxisType] = [
    AxisType("Nothing"),
    AxisType("Seed", "seed", int),
    AxisType("Var. seed", "subseed", int),
    AxisType("Var. strength", "subseed_strength", float),
    AxisType("Steps", "steps", int),
    AxisType("Hires steps", "hr_second_pass_steps", int),
    AxisType("CFG Scale", "cfg_scale", float),
    AxisType("Prompt S/R"),
    AxisType("Sampler", "sampler_name", str, lambda api: api.sampler_names()),
    AxisType("Schedule type", "scheduler", str, lambda api: api.schedule_names()),
    AxisType("Checkpoint name", "checkpoint", str, lambda api: api.checkpoint_titles(), switches_model=True),
    AxisType("Size"),
    AxisType("Denoising", "denoising_strength", float),
    AxisType("Clip skip", "clip_skip", int),
    AxisType("VAE", "vae", str, lambda api: api.vae_names()),
    AxisType("Hires upscaler", "hr_upscaler", str, lambda api: api.hires_upscaler_names()),
]
AXIS_LABELS = [axis.label for axis in AXIS_TYPES]


def find_axis_type(name: Any) -> AxisType:
    """The axis type called ``name`` (its label, any case) or at index ``name``; ValueError lists them."""
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(AXIS_TYPES):
        return AXIS_TYPES[name]
    if isinstance(name, str):
        for axis in AXIS_TYPES:
            if axis.label.lower() == name.strip().lower():
                return axis
    raise ValueError(f"unknown axis type {name!r}; choose one of {', '.join(AXIS_LABELS)}")
