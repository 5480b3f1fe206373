"""The ControlNet unit: one control image with its preprocessor, model and strength (docs/compatibility.md §10).

Field names and defaults follow the sd-webui-controlnet API, so a unit dict written for A1111 (or by
``webuiapi.ControlNetUnit.to_dict()``) parses unchanged. Fields that clients send but that change nothing
here (``low_vram``, ``input_mode``, ...) are accepted and ignored, like unknown keys.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator, model_validator

#: How many ControlNet units the UI shows (and /controlnet/settings reports).
UNITS = 3

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
#: sd-webui-controlnet's control types of a ControlNet Union (ProMax) model, in the model's own order;
#: "Unknown" picks the type from the unit's preprocessor.
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile",
                       "Inpaint", "Unknown")
#: Older names sd-webui-controlnet still accepts for the resize modes.
_RESIZE_ALIASES = {"scale to fit (inner fit)": "Crop and Resize", "envelope (outer fit)": "Resize and Fill"}


def _choice(value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    """A choice given by name (any case) or by its index, as the A1111 API allows both."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
        if aliases and value.strip().lower() in aliases:
            return aliases[value.strip().lower()]
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"must be one of {allowed} (or their index 0-{len(choices) - 1}), got {value!r}")


def decode_image(value: Any) -> Image.Image | None:
    """A PIL image from base64 (with or without a ``data:`` prefix), a PIL image, or None/"" for none."""
    if value is None or value == "":
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"is not a base64 image Pillow can read ({error})") from None
        return image
    raise ValueError(f"must be a base64 image string, got {type(value).__name__}")


class ControlNetUnit(BaseModel):
    """One ControlNet unit as the API and the UI send it."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    enabled: bool = Field(True, description="Use this unit.")
    module: str = Field("none", description="Preprocessor run on the image first (see /controlnet/module_list).")
    model: str = Field("None", description="ControlNet model: title 'name [hash]' or a prefix of the name.")
    weight: float = Field(1.0, ge=0.0, le=2.0, description="Strength of the control (conditioning scale).")
    image: Image.Image | None = Field(None, description="Control image (base64).")
    mask: Image.Image | None = Field(None, description="Mask sent with the image (accepted, unused).")
    resize_mode: str = Field("Crop and Resize", description="How the control image is fitted to the output size.")
    processor_res: int = Field(-1, description="Short side the preprocessor works at; -1 = default (512).")
    threshold_a: float = Field(-1, description="First preprocessor parameter; -1 = the preprocessor's default.")
    threshold_b: float = Field(-1, description="Second preprocessor parameter; -1 = the preprocessor's default.")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps where control begins.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps where control stops.")
    pixel_perfect: bool = Field(False, description="Pick the processor resolution from the output size.")
    control_mode: str = Field("Balanced", description="Balance between the prompt and the control.")
    hr_option: str = Field("Both", description="Passes the unit applies to when Hires. fix runs.")
    save_detected_map: bool = Field(True, description="Return the detected map with the images.")
    union_control_type: str = Field("Unknown", description="Control type of a ControlNet Union (ProMax) model: "
                                    "one of " + ", ".join(UNION_CONTROL_TYPES) + " ('Unknown': from the "
                                    "preprocessor). Other models ignore it.")

    @model_validator(mode="before")
    @classmethod
    def _image_forms(cls, data: Any) -> Any:
        # Legacy clients send "input_image"; some send {"image": ..., "mask": ...} in "image".
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("image") in (None, "") and data.get("input_image") not in (None, ""):
            data["image"] = data["input_image"]
        image = data.get("image")
        if isinstance(image, Mapping):
            data["image"] = image.get("image")
            data.setdefault("mask", image.get("mask"))
        return data

    @field_validator("image", "mask", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Image.Image | None:
        return decode_image(value)

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value: Any) -> str:
        return _choice(value, RESIZE_MODES, _RESIZE_ALIASES)

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, value: Any) -> str:
        return _choice(value, CONTROL_MODES)

    @field_validator("union_control_type", mode="before")
    @classmethod
    def _union_control_type(cls, value: Any) -> str:
        return _choice(value, UNION_CONTROL_TYPES)

    @field_validator("hr_option", mode="before")
    @classmethod
    def _hr_option(cls, value: Any) -> str:
        return _choice(value, HR_OPTIONS)

    @field_validator("processor_res")
    @classmethod
    def _processor_res(cls, value: int) -> int:
        if value != -1 and not 64 <= value <= 2048:
            raise ValueError(f"must be -1 (default) or 64 to 2048, got {value}")
        return value

    @model_validator(mode="after")
    def _guidance_order(self) -> ControlNetUnit:
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must not be above guidance_end "
                             f"({self.guidance_end})")
        return self


def parse_unit(index: int, value: Any) -> ControlNetUnit:
    """Parse unit ``index`` of the argument list; ValueError naming the unit, the field and the allowed values."""
    if isinstance(value, ControlNetUnit):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"unit {index}: expected an object with the unit fields, got {type(value).__name__}")
    try:
        return ControlNetUnit.model_validate(value)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "unit"
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        raise ValueError(f"unit {index}: " + "; ".join(problems)) from None


class ControlNetArgs(RootModel[list[ControlNetUnit | None]]):
    """The script's arguments (``alwayson_scripts["controlnet"]["args"]``): one unit per slot, None for an
    empty one; each unit is a dict of :class:`ControlNetUnit` fields (or a unit)."""

    @model_validator(mode="before")
    @classmethod
    def _units(cls, data: Any) -> Any:
        if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Sequence):
            raise ValueError(f"expected a list of units, got {type(data).__name__}")
        return [None if raw is None else parse_unit(index, raw) for index, raw in enumerate(data)]
