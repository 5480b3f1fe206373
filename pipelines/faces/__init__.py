"""Face restoration (GFPGAN, CodeFormer): detection, alignment and paste-back, and the restorers' model files.

Used after decoding by jobs with ``restore_faces`` and by the Extras job. Start from :class:`FaceRestorers`.
"""

from pipelines.faces.detection import DETECTOR_FILE, RetinaFace, detect_faces, load_detector
from pipelines.faces.restoration import RESTORERS, FaceRestorers, MissingFaceModel, load_face_model

__all__ = [
    "DETECTOR_FILE",
    "RESTORERS",
    "FaceRestorers",
    "MissingFaceModel",
    "RetinaFace",
    "detect_faces",
    "load_detector",
    "load_face_model",
]
