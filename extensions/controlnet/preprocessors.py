"""Preprocessors ("modules"): turn a photo into the map a ControlNet model expects.

The weight-free ones are here; the ones running a network of their own (depth, openpose, softedge, lineart,
normal) are in ``annotators.py`` and need their weights in ``models/ControlNet/annotators/<folder>/``: without
them they are listed as unavailable with the file that goes where.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from .annotators import NETWORK_PREPROCESSORS, NOT_IMPLEMENTED
from .ip_adapter import CLIP_MODULES
from .kinds import Preprocessor, Slider

if TYPE_CHECKING:
    from .annotators import AnnotatorCache

__all__ = ["Preprocessor", "Slider"]


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


def _tile_resample(image: np.ndarray, rate: float, b: float) -> np.ndarray:
    # sd-webui-controlnet's tile_resample: the image made smaller by the rate (below 1.1: unchanged).
    if rate < 1.1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)


def _shuffle(image: np.ndarray, a: float, b: float) -> np.ndarray:
    # controlnet_aux's content shuffle (random flow field remap), with a fixed seed so a job can be repeated.
    from controlnet_aux.shuffle import ContentShuffleDetector

    state = np.random.get_state()
    np.random.seed(0)
    try:
        short = min(image.shape[:2])
        out = ContentShuffleDetector()(image, detect_resolution=short, image_resolution=short, output_type="np")
    finally:
        np.random.set_state(state)
    h, w = image.shape[:2]
    return np.ascontiguousarray(cv2.resize(np.asarray(out), (w, h)) if out.shape[:2] != (h, w) else out)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", _none, uses_resolution=False),
    Preprocessor("invert", _invert, uses_resolution=False, aliases=("invert (from white bg & black line)",)),
    Preprocessor("canny", _canny, Slider("Canny Low Threshold", 100, 1, 255),
                 Slider("Canny High Threshold", 200, 1, 255)),
    Preprocessor("threshold", _threshold, Slider("Binarization Threshold", 127, 0, 255)),
    Preprocessor("scribble_xdog", _scribble_xdog, Slider("XDoG Threshold", 32, 1, 64)),
    Preprocessor("lineart_standard", _lineart_standard,
                 aliases=("lineart_standard (from white bg & black line)",)),
    Preprocessor("shuffle", _shuffle),
    # The tile modules' map is the image itself (resampled); as in sd-webui-controlnet they use no resolution.
    Preprocessor("tile_resample", _tile_resample, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01),
                 uses_resolution=False),
    Preprocessor("tile_colorfix", _none, Slider("Variation", 8.0, 3.0, 32.0, 1.0), uses_resolution=False),
    Preprocessor("tile_colorfix+sharp", _none, Slider("Variation", 8.0, 3.0, 32.0, 1.0),
                 Slider("Sharpness", 1.0, 0.0, 2.0, 0.01), uses_resolution=False),
    *NETWORK_PREPROCESSORS,
    *(Preprocessor(name, _none, uses_resolution=False, clip_vision=folder) for name, folder in CLIP_MODULES.items()),
)}
#: Preprocessors sd-webui-controlnet has that need a network not run here; listed, never available.
NEEDS_WEIGHTS = NOT_IMPLEMENTED
DEFAULT_RESOLUTION = 512


def lookup(name: str) -> Preprocessor | None:
    """The preprocessor called ``name`` (or one of its aliases, any case), else None."""
    key = name.strip().lower()
    for preprocessor in PREPROCESSORS.values():
        if key == preprocessor.name or key in preprocessor.aliases:
            return preprocessor
    return None


def unavailable_reason(name: str, annotators: AnnotatorCache | None) -> str | None:
    """Why module ``name`` cannot run here (weights missing: which file goes where), or None when it can."""
    preprocessor = lookup(name)
    if preprocessor is None:
        if name.strip().lower() in NEEDS_WEIGHTS:
            return "this preprocessor's network is not implemented here"
        return f"unknown preprocessor; choose from {', '.join(module_names())}"
    if preprocessor.clip_vision is not None:
        return annotators.clip_vision.missing(preprocessor.clip_vision) if annotators else \
            "needs a CLIP vision encoder, and no clip_vision folder is configured"
    if preprocessor.annotator is None:
        return None
    if annotators is None:
        return "needs annotator weights, and no annotator folder is configured"
    return annotators.missing(preprocessor.annotator)


def module_names() -> list[str]:
    """Every module name clients may see: the ones here, then the ones not implemented."""
    return [*PREPROCESSORS, *NEEDS_WEIGHTS]


def sliders(preprocessor: Preprocessor) -> list[dict[str, object]]:
    """The module's sliders as sd-webui-controlnet lists them: the resolution first when it uses one."""
    found = [{"name": "Resolution", "value": DEFAULT_RESOLUTION, "min": 64, "max": 2048, "step": 8}
             ] if preprocessor.uses_resolution else []
    return found + [s.as_dict() for s in (preprocessor.threshold_a, preprocessor.threshold_b) if s is not None]


def module_detail(annotators: AnnotatorCache | None) -> dict[str, dict[str, object]]:
    """``module_detail`` of ``/controlnet/module_list``: sliders, whether each module can run, and if not why
    (for a network module: which weight file goes where)."""
    detail: dict[str, dict[str, object]] = {}
    for p in PREPROCESSORS.values():
        reason = unavailable_reason(p.name, annotators)
        entry: dict[str, object] = {"model_free": False, "sliders": sliders(p),
                                    "available": reason is None}
        if p.annotator is not None:
            entry["weights"] = {"folder": p.annotator.folder, "files": list(p.annotator.files)}
        if reason is not None:
            entry["reason"] = reason
        detail[p.name] = entry
    for name in NEEDS_WEIGHTS:
        detail[name] = {"model_free": False, "sliders": [], "available": False,
                        "reason": unavailable_reason(name, annotators)}
    return detail


#: sd-webui-controlnet's control types: (name, modules in order, the model-name word that marks its models).
CONTROL_TYPES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Canny", ("canny", "invert"), "canny"),
    ("Depth", ("depth_midas", "depth_anything_v2", "depth_zoe", "depth_leres"), "depth"),
    ("NormalMap", ("normal_bae",), "normal"),
    ("OpenPose", ("openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand",
                  "dw_openpose_full"), "openpose"),
    ("MLSD", ("mlsd", "invert"), "mlsd"),
    ("Lineart", ("lineart_standard", "lineart_realistic", "lineart_coarse", "lineart_anime", "invert"), "lineart"),
    ("SoftEdge", ("softedge_pidinet", "softedge_hed", "softedge_hedsafe", "softedge_pidisafe"), "softedge"),
    ("Scribble/Sketch", ("scribble_xdog", "invert"), "scribble"),
    ("Segmentation", ("seg_ofade20k", "seg_ufade20k"), "seg"),
    ("Shuffle", ("shuffle",), "shuffle"),
    ("Tile", ("tile_resample", "tile_colorfix", "tile_colorfix+sharp"), "tile"),
    ("IP-Adapter", ("ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith"), "ip-adapter"),
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
           threshold_b: float = -1, annotators: AnnotatorCache | None = None) -> Image.Image:
    """Run ``preprocessor`` on ``image`` (its short side first brought to ``resolution`` when the module uses
    one; -1 = 512); returns the RGB map. A network module runs through ``annotators`` (ValueError naming the
    missing weight file when they are absent); openpose's pose JSON is in the map's ``info["pose"]``."""
    rgb = np.asarray(image.convert("RGB"))
    if preprocessor.uses_resolution:
        resolution = DEFAULT_RESOLUTION if resolution == -1 else resolution
        h, w = rgb.shape[:2]
        k = resolution / min(h, w)
        size = (max(1, round(w * k)), max(1, round(h * k)))
        if size != (w, h):
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    a, b = resolve_thresholds(preprocessor, threshold_a, threshold_b)
    info: dict[str, Any] = {}
    if preprocessor.annotator is not None:
        if annotators is None:
            raise ValueError(f"module {preprocessor.name!r} is unavailable: needs annotator weights, and no "
                             "annotator folder is configured")
        result = annotators.run(preprocessor, rgb, a, b)
        if isinstance(result, tuple):
            result, info = result
    else:
        result = preprocessor.run(rgb, a, b)
    detected = Image.fromarray(np.ascontiguousarray(result))
    detected.info.update(info)
    return detected
