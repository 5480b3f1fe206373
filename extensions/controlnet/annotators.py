"""Preprocessors that run a network of their own ("annotators"), and the cache of their loaded models.

The networks are the published ones, from the ``controlnet_aux`` package (the annotators sd-webui-controlnet
ships, packaged) and, for Depth Anything v2 and the UperNet segmenter, from ``transformers``. Nothing is
downloaded: each annotator reads its weights from ``models/ControlNet/annotators/<folder>/`` under the file
names the reference implementations use, through the app's one weights reader (``read_weights``: safetensors,
or a pickle read with ``weights_only``), never through the packages' own ``torch.load`` / ``from_pretrained`` downloads.

A missing file makes the module unavailable with a message naming the file and where it goes; the other
modules keep working. Loaded detectors are kept in a small LRU cache and, under ``--medvram`` / ``--lowvram``,
moved back to the CPU after each detection.
"""

from __future__ import annotations

import functools
import json
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from webui.extension_api import ModelFileError, read_weights

from .ip_adapter import ClipVisionEncoders
from .kinds import Annotator, Preprocessor

#: How many loaded annotators stay cached (least recently used out).
CACHE_SIZE = 3


# --------------------------------------------------------------------------- loading weights


def _state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an annotator file, ``model`` / ``state_dict`` nesting and ``module.`` prefixes undone."""
    state: Any = read_weights(path, keep_non_tensors=True)
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in ("model", "state_dict", "params") if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _fit(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """``net`` with ``state`` loaded strictly; a file of another network raises ModelFileError naming it."""
    expected = net.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        raise ModelFileError(path, f"{path.name}: not the weights this annotator expects (missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    net.load_state_dict({key: value.float() for key, value in state.items()})
    return net.float().eval().requires_grad_(False)


def _load_lineart(file: str) -> Callable[[Path], Any]:
    def load(folder: Path) -> Any:
        from controlnet_aux.lineart import Generator, LineartDetector

        net = _fit(Generator(3, 1, 3), _state(folder / file), folder / file)
        return LineartDetector(net, net)

    return load


def _load_lineart_anime(folder: Path) -> Any:
    from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator

    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)
    return LineartAnimeDetector(_fit(net, _state(folder / "netG.pth"), folder / "netG.pth"))


def _load_hed(folder: Path) -> Any:
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    path = folder / "ControlNetHED.pth"
    return HEDdetector(_fit(ControlNetHED_Apache2(), _state(path), path))


def _load_pidinet(folder: Path) -> Any:
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet

    path = folder / "table5_pidinet.pth"
    return PidiNetDetector(_fit(pidinet(), _state(path), path))


def _load_normal_bae(folder: Path) -> Any:
    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    path = folder / "scannet.pt"
    return NormalBaeDetector(_fit(NNET(args), _state(path), path))


def _load_midas(folder: Path) -> Any:
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    path = folder / "dpt_hybrid-midas-501f0c75.pt"
    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    return MidasDetector(_fit(net, _state(path), path))


def _load_openpose(hand: bool, face: bool) -> Callable[[Path], Any]:
    def load(folder: Path) -> Any:
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.face import Face, FaceNet
        from controlnet_aux.open_pose.hand import Hand
        from controlnet_aux.open_pose.model import bodypose_model, handpose_model

        def stage_net(cls: type, net: nn.Module, file: str) -> Any:
            # The published body/hand files name weights without the first (stage) part of the module path.
            path = folder / file
            state = _state(path)
            renamed = {key: state[".".join(key.split(".")[1:])] for key in net.state_dict()
                       if ".".join(key.split(".")[1:]) in state}
            wrapper = cls.__new__(cls)
            wrapper.model = _fit(net, renamed if len(renamed) == len(state) else state, path)
            return wrapper

        body = stage_net(Body, bodypose_model(), "body_pose_model.pth")
        hands = stage_net(Hand, handpose_model(), "hand_pose_model.pth") if hand else None
        faces = None
        if face:
            path = folder / "facenet.pth"
            from controlnet_aux.open_pose.face import params

            faces = Face.__new__(Face)
            faces.inference_size = params["inference_img_size"]
            faces.sigma = params["gaussian_sigma"]
            faces.threshold = params["heatmap_peak_thresh"]
            faces.model = _fit(FaceNet(), _state(path), path)
        return _Openpose(OpenposeDetector(body, hands, faces))

    return load


class _Openpose:
    """controlnet_aux's OpenposeDetector with only the nets it was given (its own ``to`` needs all three)."""

    def __init__(self, detector: Any):
        self.detector = detector

    def to(self, device: torch.device) -> _Openpose:
        for part in (self.detector.body_estimation, self.detector.hand_estimation, self.detector.face_estimation):
            if part is not None:
                part.model.to(device)
        return self

    def detect_poses(self, rgb: np.ndarray, include_hand: bool, include_face: bool) -> list[Any]:
        return self.detector.detect_poses(rgb, include_hand=include_hand, include_face=include_face)


class _DepthAnything:
    """Depth Anything v2 through transformers' DepthAnythingForDepthEstimation (a Hugging Face folder:
    ``config.json`` + ``model.safetensors``); the relative depth scaled to 0-255, near = bright."""

    def __init__(self, model: nn.Module):
        self.model = model

    def to(self, device: torch.device) -> _DepthAnything:
        self.model.to(device)
        return self

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        size = (max(14, round(w / 14) * 14), max(14, round(h / 14) * 14))
        pixels = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
        pixels = (pixels - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
            depth = self.model(pixel_values=tensor).predicted_depth[0].float().cpu().numpy()
        depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_LINEAR)
        span = float(depth.max() - depth.min())
        depth = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
        return (depth * 255.0).clip(0, 255).astype(np.uint8)


def _load_depth_anything(folder: Path) -> Any:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    config = DepthAnythingConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = DepthAnythingForDepthEstimation(config)
    return _DepthAnything(_fit(model, _state(folder / "model.safetensors"), folder / "model.safetensors"))


#: The ADE20K palette: the RGB colour of each of the 150 classes, in class order (``wall``, ``building``,
#: ``sky``, ...), as mmsegmentation's ADE20KDataset and sd-webui-controlnet's segmentation maps colour them,
#: and as the ControlNet seg models were trained on. Some classes share a colour (as in the original).
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

#: The files of the UperNet segmenter: the Hugging Face folder ``openmmlab/upernet-convnext-small`` publishes.
UPERNET_FILES = ("config.json", "pytorch_model.bin")


class _UperNet:
    """ADE20K segmentation through transformers' UperNetForSemanticSegmentation (ConvNeXt backbone): each
    pixel's most likely class, coloured with :data:`ADE20K_PALETTE`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def to(self, device: torch.device) -> _UperNet:
        self.model.to(device)
        return self

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        size = (max(32, round(w / 32) * 32), max(32, round(h / 32) * 32))  # ConvNeXt strides down by 32
        pixels = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        pixels = (pixels - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
            logits = self.model(pixel_values=tensor).logits[0]
        classes = logits.argmax(dim=0).cpu().numpy().astype(np.int64)
        classes = cv2.resize(classes.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        palette = np.array(ADE20K_PALETTE, dtype=np.uint8)
        return np.ascontiguousarray(palette[np.minimum(classes, len(palette) - 1)])


def _load_upernet(folder: Path) -> Any:
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    config = UperNetConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    if config.num_labels != len(ADE20K_PALETTE):
        path = folder / "config.json"
        raise ModelFileError(path, f"{path}: a segmenter of {config.num_labels} classes; seg_ufade20k needs the "
                                   f"{len(ADE20K_PALETTE)} ADE20K ones")
    path = folder / "pytorch_model.bin"
    return _UperNet(_fit(UperNetForSemanticSegmentation(config), _state(path), path))


# --------------------------------------------------------------------------- running


def _gray3(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel[:, :, None], 3, axis=2) if channel.ndim == 2 else channel


def _at_size(result: Any, rgb: np.ndarray) -> np.ndarray:
    """A detector's answer as uint8 HxWx3 at the size of ``rgb`` (controlnet_aux rounds sizes to 64)."""
    out = _gray3(np.asarray(result, dtype=np.uint8))
    h, w = rgb.shape[:2]
    if out.shape[:2] != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(out)


def _aux(invert: bool = False, **options: Any) -> Callable[..., np.ndarray]:
    """Run a controlnet_aux detector at the image's own resolution (already brought to the unit's)."""

    def run(rgb: np.ndarray, a: float, b: float, detector: Any) -> np.ndarray:
        short = min(rgb.shape[:2])
        result = detector(rgb, detect_resolution=short, image_resolution=short, output_type="np", **options)
        out = _at_size(result, rgb)
        return 255 - out if invert else out  # sd-webui-controlnet's lineart maps: white lines on black

    return run


def _depth_anything(rgb: np.ndarray, a: float, b: float, detector: Any) -> np.ndarray:
    return _gray3(detector(rgb))


def _segment(rgb: np.ndarray, a: float, b: float, detector: Any) -> np.ndarray:
    return detector(rgb)


_OPENPOSE_FILES = {"body": "body_pose_model.pth", "hand": "hand_pose_model.pth", "face": "facenet.pth"}


def _openpose_annotator(hand: bool, face: bool) -> Annotator:
    files = ("body", *(("hand",) if hand else ()), *(("face",) if face else ()))
    return Annotator("openpose", tuple(_OPENPOSE_FILES[f] for f in files), _load_openpose(hand, face))


def _openpose(body: bool, hand: bool, face: bool) -> Callable[..., np.ndarray]:
    def run(rgb: np.ndarray, a: float, b: float, detector: Any) -> np.ndarray:
        poses = detector.detect_poses(rgb, include_hand=hand, include_face=face)
        from controlnet_aux.open_pose import draw_poses

        h, w = rgb.shape[:2]
        drawn = _gray3(draw_poses(poses, h, w, draw_body=body, draw_hand=hand, draw_face=face))
        return drawn, {"pose": pose_json(poses, w, h)}

    return run


def pose_json(poses: list[Any], width: int, height: int) -> dict[str, Any]:
    """The poses in the OpenPose JSON format sd-webui-controlnet's API returns: per person the flat
    ``[x, y, confidence, ...]`` lists in pixels, 0s for keypoints not found."""

    def flat(points: list[Any] | None) -> list[float] | None:
        if points is None:
            return None
        values: list[float] = []
        for point in points:
            if point is None:
                values += [0.0, 0.0, 0.0]
            else:
                values += [float(point.x) * width, float(point.y) * height, 1.0]
        return values

    people = [{"pose_keypoints_2d": flat(pose.body.keypoints), "face_keypoints_2d": flat(pose.face),
               "hand_left_keypoints_2d": flat(pose.left_hand), "hand_right_keypoints_2d": flat(pose.right_hand)}
              for pose in poses]
    return {"people": people, "canvas_width": width, "canvas_height": height}


_LINEART = Annotator("lineart", ("sk_model.pth",), _load_lineart("sk_model.pth"))
_LINEART_COARSE = Annotator("lineart", ("sk_model2.pth",), _load_lineart("sk_model2.pth"))
_HED = Annotator("hed", ("ControlNetHED.pth",), _load_hed)
_PIDINET = Annotator("pidinet", ("table5_pidinet.pth",), _load_pidinet)

#: The network preprocessors, by sd-webui-controlnet's module names.
NETWORK_PREPROCESSORS: tuple[Preprocessor, ...] = (
    Preprocessor("depth_midas", _aux(), annotator=Annotator("midas", ("dpt_hybrid-midas-501f0c75.pt",), _load_midas),
                 aliases=("depth",)),
    Preprocessor("depth_anything_v2", _depth_anything,
                 annotator=Annotator("depth_anything_v2", ("config.json", "model.safetensors"), _load_depth_anything)),
    Preprocessor("openpose", _openpose(True, False, False), annotator=_openpose_annotator(False, False)),
    Preprocessor("openpose_hand", _openpose(True, True, False), annotator=_openpose_annotator(True, False)),
    Preprocessor("openpose_face", _openpose(True, False, True), annotator=_openpose_annotator(False, True)),
    Preprocessor("openpose_faceonly", _openpose(False, False, True), annotator=_openpose_annotator(False, True)),
    Preprocessor("openpose_full", _openpose(True, True, True), annotator=_openpose_annotator(True, True)),
    Preprocessor("softedge_hed", _aux(), annotator=_HED, aliases=("hed",)),
    Preprocessor("softedge_hedsafe", _aux(safe=True), annotator=_HED),
    Preprocessor("softedge_pidinet", _aux(), annotator=_PIDINET, aliases=("pidinet",)),
    Preprocessor("softedge_pidisafe", _aux(safe=True), annotator=_PIDINET),
    Preprocessor("lineart_realistic", _aux(invert=True), annotator=_LINEART, aliases=("lineart",)),
    Preprocessor("lineart_coarse", _aux(invert=True, coarse=True), annotator=_LINEART_COARSE),
    Preprocessor("lineart_anime", _aux(invert=True),
                 annotator=Annotator("lineart_anime", ("netG.pth",), _load_lineart_anime)),
    Preprocessor("normal_bae", _aux(), annotator=Annotator("normal_bae", ("scannet.pt",), _load_normal_bae)),
    Preprocessor("seg_ufade20k", _segment, annotator=Annotator("upernet", UPERNET_FILES, _load_upernet)),
)
#: Network preprocessors sd-webui-controlnet has that are not run here (listed as unavailable).
NOT_IMPLEMENTED = ("depth_zoe", "depth_leres", "dw_openpose_full", "mlsd", "seg_ofade20k")


# --------------------------------------------------------------------------- the cache


class AnnotatorCache:
    """Finds annotator weights in the annotator folders and keeps the loaded detectors (LRU)."""

    def __init__(self, folders: Callable[[], tuple[Path, ...]], device: Callable[[], torch.device],
                 memory_mode: Callable[[], str], size: int = CACHE_SIZE,
                 clip_vision_folders: Callable[[], tuple[Path, ...]] = lambda: ()):
        self._folders = folders
        #: The IP-Adapter modules' CLIP vision encoders (``models/clip_vision``).
        self.clip_vision = ClipVisionEncoders(clip_vision_folders)
        self._device = device
        self._memory_mode = memory_mode
        self._size = size
        self._loaded: OrderedDict[tuple[Path, tuple[str, ...], float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def folder(self, annotator: Annotator) -> Path | None:
        """The first annotator folder holding all of ``annotator``'s files, else None."""
        for root in self._folders():
            folder = root / annotator.folder
            if all((folder / name).is_file() for name in annotator.files):
                return folder
        return None

    def missing(self, annotator: Annotator) -> str | None:
        """None when the weights are there, else which files go where."""
        if self.folder(annotator) is not None:
            return None
        roots = self._folders()
        if not roots:
            return "needs annotator weights, and no annotator folder is configured"
        folder = roots[0] / annotator.folder
        absent = [name for name in annotator.files if not (folder / name).is_file()]
        return f"needs annotator weights in {folder}: {', '.join(absent)}"

    def run(self, preprocessor: Preprocessor, rgb: np.ndarray, a: float, b: float) -> Any:
        """Run a network preprocessor (its map, or (map, extra info) for openpose's pose JSON); ValueError with
        :meth:`missing`'s message when its weights are absent."""
        annotator = preprocessor.annotator
        assert annotator is not None
        detector = self._load(preprocessor.name, annotator)
        try:
            return preprocessor.run(rgb, a, b, detector)
        finally:
            if self._memory_mode() != "normal" and self._device().type != "cpu":
                detector.to(torch.device("cpu"))  # --medvram / --lowvram: the GPU is the checkpoint's

    def _load(self, module: str, annotator: Annotator) -> Any:
        folder = self.folder(annotator)
        if folder is None:
            raise ValueError(f"module {module!r} is unavailable: {self.missing(annotator)}")
        key = (folder, annotator.files, max((folder / name).stat().st_mtime for name in annotator.files))
        with self._lock:
            detector = self._loaded.get(key)
            if detector is not None:
                self._loaded.move_to_end(key)
        if detector is None:
            detector = annotator.load(folder)
            with self._lock:
                self._loaded[key] = detector
                while len(self._loaded) > self._size:
                    self._loaded.popitem(last=False)
        return detector.to(self._device())

    def loaded(self) -> list[Any]:
        """The cached detectors, least recently used first (for tests and memory reports)."""
        with self._lock:
            return list(self._loaded.values())
