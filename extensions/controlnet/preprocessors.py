"""Preprocessors ("modules"): turn a photo into the map a ControlNet model expects.

The ones here need no downloaded weights. Preprocessors that run a network of their own (depth, pose, ...)
are listed as unavailable with the reason, so clients see them and learn where their weights would go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


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
class Preprocessor:
    """``run(rgb uint8 HxWx3, threshold_a, threshold_b) -> uint8 HxWx3``; thresholds already defaulted."""

    name: str
    run: Callable[[np.ndarray, float, float], np.ndarray]
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    #: Whether the image is first resized so its short side is the processor resolution.
    uses_resolution: bool = True
    aliases: tuple[str, ...] = ()


def _gray3(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel[:, :, None], 3, axis=2)


def _none(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return image


def _invert(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return 255 - image


def _canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return _gray3(cv2.Canny(image, int(low), int(high)))


def _threshold(image: np.ndarray, level: float, b: float) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return _gray3(np.where(gray > level, 255, 0).astype(np.uint8))


def _scribble_xdog(image: np.ndarray, level: float, b: float) -> np.ndarray:
    # Difference of a fine and a coarse blur: strong where the image has lines; thresholding makes a scribble.
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    dog = cv2.GaussianBlur(gray, (0, 0), 0.5) - cv2.GaussianBlur(gray, (0, 0), 5.0)
    return _gray3(np.where(-dog > level, 255, 0).astype(np.uint8))


def _lineart_standard(image: np.ndarray, a: float, b: float) -> np.ndarray:
    # Dark strokes on a lighter surround: how much darker each pixel is than its blurred neighbourhood,
    # scaled by a typical stroke strength so that faint and bold drawings both come out visible.
    pixels = image.astype(np.float32)
    darker = np.clip(cv2.GaussianBlur(pixels, (0, 0), 6.0) - pixels, 0, None).max(axis=2)
    strokes = darker[darker > 4.0]
    scale = float(np.median(strokes)) * 2.0 if strokes.size else 16.0
    return _gray3((np.clip(darker / max(scale, 1e-3), 0, 1) * 255).astype(np.uint8))


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", _none, uses_resolution=False),
    Preprocessor("invert", _invert, uses_resolution=False, aliases=("invert (from white bg & black line)",)),
    Preprocessor("canny", _canny, Slider("Canny Low Threshold", 100, 1, 255),
                 Slider("Canny High Threshold", 200, 1, 255)),
    Preprocessor("threshold", _threshold, Slider("Binarization Threshold", 127, 0, 255)),
    Preprocessor("scribble_xdog", _scribble_xdog, Slider("XDoG Threshold", 32, 1, 64)),
    Preprocessor("lineart_standard", _lineart_standard,
                 aliases=("lineart_standard (from white bg & black line)",)),
)}
#: Preprocessors that run a network of their own; listed, but unavailable without their weights.
NEEDS_WEIGHTS = ("depth_midas", "depth_zoe", "depth_leres", "normal_bae", "openpose", "openpose_full",
                 "dw_openpose_full", "softedge_hed", "softedge_pidinet", "lineart_realistic", "lineart_anime",
                 "mlsd", "seg_ofade20k")
DEFAULT_RESOLUTION = 512


def lookup(name: str) -> Preprocessor | None:
    """The runnable preprocessor called ``name`` (or one of its aliases, any case), else None."""
    key = name.strip().lower()
    for preprocessor in PREPROCESSORS.values():
        if key == preprocessor.name or key in preprocessor.aliases:
            return preprocessor
    return None


def unavailable_reason(name: str, annotator_dirs: tuple[Path, ...]) -> str:
    """Why ``name`` (one of :data:`NEEDS_WEIGHTS`) cannot run here; ``annotator_dirs``: the folders of the
    "controlnet_annotator" model kind, which hold one sub-folder per preprocessor."""
    folders = [folder / name for folder in annotator_dirs]
    found = next((f for f in folders if f.is_dir() and any(f.iterdir())), None)
    if found is not None:
        return f"annotator weights found in {found}, but this preprocessor is not implemented yet"
    if not folders:
        return "needs annotator weights, and no annotator folder is configured"
    return f"needs annotator weights in {folders[0]}"


def module_names() -> list[str]:
    """Every module name clients may see: runnable ones first, then the ones needing weights."""
    return [*PREPROCESSORS, *NEEDS_WEIGHTS]


def module_detail(annotator_dirs: tuple[Path, ...]) -> dict[str, dict[str, object]]:
    """``module_detail`` of ``/controlnet/module_list``: sliders, and whether each module can run."""
    detail: dict[str, dict[str, object]] = {}
    for p in PREPROCESSORS.values():
        sliders = [{"name": "Resolution", "value": DEFAULT_RESOLUTION, "min": 64, "max": 2048, "step": 8}
                   ] if p.uses_resolution else []
        sliders += [s.as_dict() for s in (p.threshold_a, p.threshold_b) if s is not None]
        detail[p.name] = {"model_free": False, "sliders": sliders, "available": True}
    for name in NEEDS_WEIGHTS:
        detail[name] = {"model_free": False, "sliders": [], "available": False,
                        "reason": unavailable_reason(name, annotator_dirs)}
    return detail


#: sd-webui-controlnet's control types: (name, modules in order, the model-name word that marks its models).
CONTROL_TYPES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Canny", ("canny", "invert"), "canny"),
    ("Depth", ("depth_midas", "depth_zoe", "depth_leres"), "depth"),
    ("NormalMap", ("normal_bae",), "normal"),
    ("OpenPose", ("openpose", "openpose_full", "dw_openpose_full"), "openpose"),
    ("MLSD", ("mlsd", "invert"), "mlsd"),
    ("Lineart", ("lineart_standard", "lineart_realistic", "lineart_anime", "invert"), "lineart"),
    ("SoftEdge", ("softedge_hed", "softedge_pidinet"), "softedge"),
    ("Scribble/Sketch", ("scribble_xdog", "invert"), "scribble"),
    ("Segmentation", ("seg_ofade20k",), "seg"),
)


def control_types(model_titles: list[str]) -> dict[str, dict[str, object]]:
    """``/controlnet/control_types``: for "All" and each type, its modules ("none" first), its models
    ("None" first, then the titles holding the type's word), and the defaults the UI picks."""
    answer: dict[str, dict[str, object]] = {"All": {"module_list": module_names(),
                                                    "model_list": ["None", *model_titles],
                                                    "default_option": "none", "default_model": "None"}}
    for name, modules, word in CONTROL_TYPES:
        models = [title for title in model_titles if word in title.lower()]
        answer[name] = {"module_list": ["none", *modules], "model_list": ["None", *models],
                        "default_option": modules[0], "default_model": models[0] if models else "None"}
    return answer


def resolve_thresholds(preprocessor: Preprocessor, threshold_a: float, threshold_b: float) -> tuple[float, float]:
    """The unit's thresholds with -1 replaced by the preprocessor's defaults."""
    a = preprocessor.threshold_a.value if preprocessor.threshold_a and threshold_a == -1 else threshold_a
    b = preprocessor.threshold_b.value if preprocessor.threshold_b and threshold_b == -1 else threshold_b
    return a, b


def detect(preprocessor: Preprocessor, image: Image.Image, resolution: int, threshold_a: float = -1,
           threshold_b: float = -1) -> Image.Image:
    """Run ``preprocessor`` on ``image`` (its short side first brought to ``resolution`` when the module uses
    one; -1 = 512); returns the RGB map."""
    rgb = np.asarray(image.convert("RGB"))
    if preprocessor.uses_resolution:
        resolution = DEFAULT_RESOLUTION if resolution == -1 else resolution
        h, w = rgb.shape[:2]
        k = resolution / min(h, w)
        size = (max(1, round(w * k)), max(1, round(h * k)))
        if size != (w, h):
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    a, b = resolve_thresholds(preprocessor, threshold_a, threshold_b)
    return Image.fromarray(np.ascontiguousarray(preprocessor.run(rgb, a, b)))
