"""What a preprocessor ("module") is: its run function, its sliders and, for the ones that run a network, the
annotator weights it needs. Kept apart so that the weight-free and the network preprocessors share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Slider:
    """A preprocessor parameter as sd-webui-controlnet's ``module_detail`` describes it."""

    name: str
    value: float
    min: float
    max: float
    step: float = 1

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


@dataclass(frozen=True)
class Annotator:
    """The weights of a network preprocessor: ``folder`` under ``models/ControlNet/annotators`` holding
    ``files`` (the reference implementations' file names); ``load(folder)`` builds the detector from them
    (on the CPU, float32) through the one safe weight reader. Several modules may share one annotator."""

    folder: str
    files: tuple[str, ...]
    load: Callable[[Path], Any]


@dataclass(frozen=True)
class Preprocessor:
    """``run(rgb uint8 HxWx3, threshold_a, threshold_b) -> uint8 HxWx3`` (thresholds already defaulted); a
    module with an ``annotator`` is run as ``run(rgb, a, b, detector)``."""

    name: str
    run: Callable[..., np.ndarray]
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    #: Whether the image is first resized so its short side is the processor resolution.
    uses_resolution: bool = True
    aliases: tuple[str, ...] = ()
    annotator: Annotator | None = None
    #: An IP-Adapter module's CLIP vision encoder (its folder under ``models/clip_vision``); its "map" is the image.
    clip_vision: str | None = None
