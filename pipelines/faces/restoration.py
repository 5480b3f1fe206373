"""Face restoration as A1111 does it: find the faces, align each to the 512 x 512 FFHQ template, restore it with
GFPGAN or CodeFormer (through spandrel), and paste it back with a soft edge.

Model files (A1111's folders and names; nothing is downloaded):

- ``models/GFPGAN/``: a GFPGAN model whose name contains "GFPGAN" (``GFPGANv1.4.pth``), and the face
  detector ``detection_Resnet50_Final.pth`` that both restorers use;
- ``models/Codeformer/``: the CodeFormer model (``codeformer-v0.1.0.pth``, or any other ``.pth``).

Every file is read by the one safe weight reader. GFPGAN's architecture is in ``spandrel``; CodeFormer's is in
``spandrel_extra_arches`` (its architectures carry non-commercial licences: CodeFormer's S-Lab License 1.0
covers the CodeFormer code and weights). A1111 also pastes faces back through a face-parsing mask
(``parsing_parsenet.pth``); here the paste-back uses the square mask with a feathered edge that the same helper
uses without parsing, so that file is not needed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from spandrel import ImageModelDescriptor
from spandrel.architectures.GFPGAN import GFPGANArch
from spandrel_extra_arches.architectures.CodeFormer import CodeFormerArch

from pipelines.faces.detection import DETECTOR_FILE, RetinaFace, detect_faces, load_detector
from pipelines.models.weights import ModelFileError
from pipelines.settings import Paths
from pipelines.upscaling.models import read_upscaler_state_dict

log = logging.getLogger(__name__)

#: The five landmarks of a face aligned in a 512 x 512 FFHQ crop (eyes, nose, mouth corners).
FACE_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
FACE_SIZE = 512
#: Detection runs on the image resized so its shorter side is this long (A1111's ``resize=640``).
DETECTION_SIZE = 640
#: Faces whose eyes are closer than this (pixels) are side views or too small, and left alone.
MIN_EYE_DISTANCE = 5.0
#: The grey that fills the aligned crop outside the image.
BORDER_BGR = (135, 133, 132)


@dataclass(frozen=True)
class Restorer:
    """A face restorer as listed (``/sdapi/v1/face-restorers``): its name, model kind (folder), preferred file."""

    name: str
    kind: str
    folder: str
    default_file: str

    def matches(self, path: Path) -> bool:
        """Whether a file of its folder is one of its models (models/GFPGAN/ also holds the detector)."""
        if path.suffix.lower() != ".pth" or path.name.startswith("."):
            return False
        return self.kind != "gfpgan" or "gfpgan" in path.name.lower()


#: The model folders the restorers read (models/GFPGAN/ also holds the detector).
FACE_MODEL_KINDS = ("gfpgan", "codeformer")
#: A1111's order: CodeFormer, then GFPGAN.
RESTORERS = {
    "CodeFormer": Restorer("CodeFormer", "codeformer", "Codeformer", "codeformer-v0.1.0.pth"),
    "GFPGAN": Restorer("GFPGAN", "gfpgan", "GFPGAN", "GFPGANv1.4.pth"),
}


class MissingFaceModel(ValueError):
    """A face restoration model file is not where it must be; the message names the file and the folder."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        field = f"{self.field}: " if self.field else ""
        return f"{field}{self.args[0]}"


def restore_faces_in(image: np.ndarray, detector: RetinaFace,
                     restore_face: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """``image`` (RGB uint8, H x W x 3) with every face found restored by ``restore_face`` and pasted back.

    ``restore_face`` takes and returns one aligned face as a (1, 3, 512, 512) RGB tensor in -1..1.
    """
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    height, width = bgr.shape[:2]
    scale = min(height, width) / DETECTION_SIZE
    small = cv2.resize(bgr, (int(width / scale), int(height / scale)), interpolation=cv2.INTER_LANCZOS4)
    faces = detect_faces(detector, small)
    result = bgr.astype(np.float64)
    for face in faces:
        landmarks = face.landmarks * scale
        if np.linalg.norm(landmarks[0] - landmarks[1]) < MIN_EYE_DISTANCE:
            continue
        affine = cv2.estimateAffinePartial2D(landmarks, FACE_TEMPLATE, method=cv2.LMEDS)[0]
        if affine is None:
            continue
        crop = cv2.warpAffine(bgr, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=BORDER_BGR)
        face_in = torch.from_numpy(crop[:, :, ::-1].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.inference_mode():
            restored = restore_face(face_in)
        restored_rgb = ((restored[0].float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        restored_bgr = np.ascontiguousarray(restored_rgb[:, :, ::-1])
        result = _paste(result, restored_bgr, cv2.invertAffineTransform(affine))
    return np.clip(result, 0, 255).round().astype(np.uint8)[:, :, ::-1]


def _paste(image: np.ndarray, face: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``face`` warped back into ``image`` (float BGR) through a square mask with a feathered edge."""
    height, width = image.shape[:2]
    back = cv2.warpAffine(face, inverse, (width, height)).astype(np.float64)
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, (width, height))
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))  # the interpolated border of the warp
    edge = int(float(mask.sum()) ** 0.5) // 20
    if edge > 0:
        mask = cv2.erode(mask, np.ones((edge * 2, edge * 2), np.uint8))
        mask = cv2.GaussianBlur(mask, (edge * 2 + 1, edge * 2 + 1), 0)
    soft = mask[:, :, None].astype(np.float64)
    return soft * back + (1 - soft) * image


class FaceRestorers:
    """The face restorers, their model files, and restoring the faces of a PIL image.

    Keeps the detector and the last restorer model loaded (on ``device``); ``unload`` (or the
    ``face_restoration_unload`` option, passed to :meth:`restore`) moves them back to the CPU. Thread-safe.
    """

    def __init__(self, paths: Paths, device: torch.device | str = "cpu"):
        self.paths = paths
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._detector: tuple[Path, RetinaFace] | None = None
        self._model: tuple[Path, ImageModelDescriptor] | None = None

    @property
    def names(self) -> list[str]:
        return list(RESTORERS)

    def folder(self, name: str) -> Path:
        """Where the models of restorer ``name`` go (the first folder of its kind)."""
        return self.paths.model_dirs(self.restorer(name).kind)[0]

    @staticmethod
    def restorer(name: str) -> Restorer:
        for key, restorer in RESTORERS.items():
            if key.lower() == name.strip().lower():
                return restorer
        raise ValueError(f"face_restoration_model: {name!r} is not a face restorer; choose one of "
                         f"{', '.join(RESTORERS)}")

    def model_file(self, name: str) -> Path | None:
        """The model file of restorer ``name`` (its default file name first), or None when there is none."""
        restorer = self.restorer(name)
        found = [path for root in self.paths.model_dirs(restorer.kind) if root.is_dir()
                 for path in sorted(root.iterdir()) if path.is_file() and restorer.matches(path)]
        for path in found:
            if path.name == restorer.default_file:
                return path
        return found[0] if found else None

    def detector_file(self) -> Path | None:
        for root in self.paths.model_dirs("gfpgan"):
            if (root / DETECTOR_FILE).is_file():
                return root / DETECTOR_FILE
        return None

    def check(self, name: str, field: str | None = None) -> None:
        """MissingFaceModel (naming ``field``, the file and the folder) unless restorer ``name`` has its files."""
        try:
            restorer = self.restorer(name)
        except ValueError as error:
            raise MissingFaceModel(str(error).split(": ", 1)[1], field) from None
        if self.model_file(name) is None:
            raise MissingFaceModel(
                f"face restoration with {restorer.name} needs its model: put {restorer.default_file} (or another "
                f"{restorer.name} .pth file) in {self._shown(self.folder(name))}", field)
        if self.detector_file() is None:
            raise MissingFaceModel(
                f"face restoration with {restorer.name} needs the face detector: put {DETECTOR_FILE} in "
                f"{self._shown(self.folder('GFPGAN'))}", field)

    def _shown(self, folder: Path) -> str:
        try:
            return f"models/{folder.relative_to(self.paths.models_dir).as_posix()}/"
        except ValueError:
            return f"{folder}/"

    def _load(self, name: str) -> tuple[RetinaFace, ImageModelDescriptor]:
        restorer = self.restorer(name)
        path = self.model_file(name)
        detector_path = self.detector_file()
        if path is None or detector_path is None:
            self.check(name)
        assert path is not None and detector_path is not None  # check() raised otherwise
        if self._detector is None or self._detector[0] != detector_path:
            self._detector = (detector_path, load_detector(detector_path))
        if self._model is None or self._model[0] != path:
            self._model = None  # free the old one before the new one takes memory
            self._model = (path, load_face_model(path, restorer.name))
        return self._detector[1].to(self.device), self._model[1].to(self.device)

    def restore(self, image: Image.Image, name: str, *, codeformer_weight: float = 0.5,
                unload: bool = False) -> Image.Image:
        """``image`` with its faces restored by restorer ``name`` (same size and mode); unchanged without faces.

        ``codeformer_weight``: CodeFormer's fidelity (0 = the strongest restoration, 1 = closest to the input).
        ``unload`` moves the models to the CPU afterwards (the ``face_restoration_unload`` option).
        MissingFaceModel when a file is missing; ModelFileError when one is not the right model.
        """
        if not 0 <= codeformer_weight <= 1:
            raise ValueError(f"code_former_weight must be between 0 and 1, got {codeformer_weight}")
        with self._lock:
            detector, model = self._load(name)
            network = model.model
            dtype = next(network.parameters()).dtype

            def run(face: torch.Tensor) -> torch.Tensor:
                face = face.to(model.device, dtype)
                if model.architecture.id == "CodeFormer":
                    return network(face, weight=codeformer_weight)[0]
                # The trained noise buffers instead of fresh noise: the same image restores the same way.
                return network(face, return_rgb=False, randomize_noise=False)[0]

            alpha = image.getchannel("A") if "A" in image.getbands() else None
            try:
                restored = restore_faces_in(np.asarray(image.convert("RGB")), detector, run)
            finally:
                if unload:
                    detector.to("cpu")
                    model.to(torch.device("cpu"))
        result = Image.fromarray(restored, "RGB")
        if alpha is not None:
            result.putalpha(alpha)
        return result.convert(image.mode) if image.mode not in ("RGB", "RGBA") else result

    def unload(self) -> None:
        """Drop the loaded models."""
        with self._lock:
            self._detector = None
            self._model = None


def load_face_model(path: Path, name: str) -> ImageModelDescriptor:
    """The GFPGAN or CodeFormer model in ``path`` (float32, eval, CPU); ModelFileError naming the file otherwise."""
    state = read_upscaler_state_dict(path)  # safe reading; params_ema and module. prefixes undone
    architecture = GFPGANArch() if name == "GFPGAN" else CodeFormerArch()
    if not architecture.detect(state):
        raise ModelFileError(path, f"{path}: not a {name} model (its weights do not have {name}'s layout)")
    try:
        model = architecture.load(state)
    except (KeyError, RuntimeError, TypeError, AssertionError) as error:
        raise ModelFileError(path, f"{path}: spandrel could not build the {name} model "
                                   f"({type(error).__name__}: {error})") from error
    return model.eval()
