"""RetinaFace (ResNet-50): the face detector A1111 uses, in the layout of ``detection_Resnet50_Final.pth``.

A1111 detects faces with facexlib's RetinaFace and keeps its weights in ``models/GFPGAN/``. facexlib itself is
not used here: importing it imports its tracking module (numba, filterpy and matplotlib), it requires the
GUI build of OpenCV (which clashes with ``opencv-python-headless``), and it reads weights with a bare
``torch.load`` and downloads a missing file. This module builds the same network from torchvision's ResNet-50,
with the same module names, so the published file loads unchanged through the one safe weight reader
(:mod:`pipelines.models.weights`), and decodes its output the same way (priors, variances, NMS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from pipelines.models.weights import ModelFileError, read_weights

#: The detector file A1111 keeps in models/GFPGAN/ (facexlib's release name).
DETECTOR_FILE = "detection_Resnet50_Final.pth"
#: Anchor sizes per pyramid level, the levels' strides and the box variances of RetinaFace's ResNet-50 config.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
#: BGR means subtracted from 0-255 pixels before the network.
BGR_MEAN = (104.0, 117.0, 123.0)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Body(nn.Module):
    """ResNet-50 up to layer4, returning layer2, layer3 and layer4 (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_ch: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(in_channels[0], out_ch, 1, True)
        self.output2 = _conv_bn(in_channels[1], out_ch, 1, True)
        self.output3 = _conv_bn(in_channels[2], out_ch, 1, True)
        self.merge1 = _conv_bn(out_ch, out_ch, 3, True)
        self.merge2 = _conv_bn(out_ch, out_ch, 3, True)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out1, out2, out3 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[2:], mode="nearest"))
        return [out1, out2, out3]


class _SSH(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(channels, channels // 2, 3, False)
        self.conv5X5_1 = _conv_bn(channels, channels // 4, 3, True)
        self.conv5X5_2 = _conv_bn(channels // 4, channels // 4, 3, False)
        self.conv7X7_2 = _conv_bn(channels // 4, channels // 4, 3, True)
        self.conv7x7_3 = _conv_bn(channels // 4, channels // 4, 3, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(first), self.conv7x7_3(self.conv7X7_2(first))], 1))


class _Head(nn.Module):
    """A 1x1 conv giving ``values`` numbers per anchor (2 anchors per position)."""

    def __init__(self, channels: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, 2 * values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace with a ResNet-50 body; ``forward`` gives box offsets, face probabilities and landmark offsets."""

    def __init__(self) -> None:
        super().__init__()
        channels = 256
        self.body = _Body()
        self.fpn = _FPN((512, 1024, 2048), channels)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(channels), _SSH(channels), _SSH(channels)
        self.ClassHead = nn.ModuleList(_Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(channels, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], 1)
        scores = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], 1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], 1)
        return boxes, F.softmax(scores, dim=-1), landmarks


def priors(height: int, width: int) -> torch.Tensor:
    """The anchors (cx, cy, w, h), relative to the image size, in the order the heads predict them."""
    rows = []
    for sizes, step in zip(MIN_SIZES, STEPS, strict=True):
        grid_h, grid_w = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(grid_h) + 0.5) * step / height,
                                (torch.arange(grid_w) + 0.5) * step / width, indexing="ij")
        for_size = [torch.stack([cx, cy, torch.full_like(cx, size / width), torch.full_like(cy, size / height)], -1)
                    for size in sizes]
        rows.append(torch.stack(for_size, 2).reshape(-1, 4))  # position-major, then anchor size
    return torch.cat(rows)


@dataclass(frozen=True)
class Face:
    """One detected face: its box (x0, y0, x1, y1), score, and five landmarks (eyes, nose, mouth corners) in pixels."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth corner, right mouth corner


def load_detector(path: Path) -> RetinaFace:
    """The detector in ``path`` (float32, eval mode, CPU); ModelFileError naming the file if it does not fit."""
    state = read_weights(path)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = RetinaFace()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ModelFileError(path, f"{path}: not a RetinaFace ResNet-50 face detector ({first})") from error
    return model.float().eval()


@torch.inference_mode()
def detect_faces(model: RetinaFace, bgr: np.ndarray, *, threshold: float = 0.97,
                 nms_threshold: float = 0.4) -> list[Face]:
    """The faces in ``bgr`` (H x W x 3, 0-255), best first; overlapping detections are merged by NMS."""
    param = next(model.parameters())
    pixels = torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32)).permute(2, 0, 1)[None]
    pixels = (pixels - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)).to(param.device, param.dtype)
    height, width = bgr.shape[:2]
    loc, conf, landmarks = (t[0].float().cpu() for t in model(pixels))
    anchors = priors(height, width)
    centres = anchors[:, :2] + loc[:, :2] * VARIANCES[0] * anchors[:, 2:]
    sizes = anchors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1) * torch.tensor([width, height] * 2)
    points = anchors[:, None, :2] + landmarks.view(-1, 5, 2) * VARIANCES[0] * anchors[:, None, 2:]
    points = points * torch.tensor([width, height])
    scores = conf[:, 1]
    keep = scores > threshold
    boxes, points, scores = boxes[keep], points[keep], scores[keep]
    kept = torchvision.ops.nms(boxes, scores, nms_threshold)
    faces = []
    for i in kept.tolist():
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        faces.append(Face((x0, y0, x1, y1), float(scores[i]), points[i].numpy().astype(np.float64)))
    return faces
