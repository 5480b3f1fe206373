"""The metrics of an evaluation, each computed by a well-kept library, not re-written here.

- CLIP score (prompt adherence): torchmetrics' ``CLIPScore`` on a transformers CLIP folder from
  ``models/CLIP/`` (handed over as a loader, since torchmetrics takes only hub names as strings).
- FID, KID, Inception Score: torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and
  ``InceptionScore`` on features of torch-fidelity's InceptionV3 (torchmetrics' ``NoTrainInceptionV3``) with the
  weights file the reference implementations use, ``weights-inception-2015-12-05-6726825d.pth``, from
  ``models/evaluation/``. Images are resized to 299x299 as torch-fidelity does (TensorFlow 1.x bilinear), so
  figures agree with torch-fidelity's. Features are extracted once per image and shared by the three metrics.
- SSIM and PSNR against a reference image: scikit-image's ``structural_similarity`` and
  ``peak_signal_noise_ratio`` on 8-bit RGB (data range 255).

A metric whose weights are missing is left out with a message naming the file and where to put it
(:class:`MissingWeights`); the others still run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

#: The metrics an evaluation can compute, in the order the table shows them.
METRICS: tuple[str, ...] = ("clip_score", "fid", "kid", "inception_score", "ssim", "psnr")
#: Per-image metrics (a mean with a 95% interval over prompts and seeds) and per-set metrics (one figure per
#: candidate, computed over all of its images).
PER_IMAGE_METRICS = ("clip_score", "ssim", "psnr")
PER_SET_METRICS = ("fid", "kid", "inception_score")
#: Whether a larger figure is better.
HIGHER_IS_BETTER: dict[str, bool] = {"clip_score": True, "fid": False, "kid": False, "inception_score": True,
                                     "ssim": True, "psnr": True}
#: Column titles.
METRIC_LABELS: dict[str, str] = {"clip_score": "CLIP score", "fid": "FID", "kid": "KID",
                                 "inception_score": "Inception Score", "ssim": "SSIM", "psnr": "PSNR (dB)"}
#: What each metric needs besides the generated images.
NEEDS_REFERENCE_FOLDER = ("fid", "kid")
NEEDS_REFERENCE_IMAGE = ("ssim", "psnr")

#: torch-fidelity's InceptionV3 weights (the TensorFlow FID network converted), as the reference FID uses.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
#: The Inception layers used: pool features for FID and KID, unbiased logits for the Inception Score.
POOL, LOGITS = "2048", "logits_unbiased"


class MissingWeights(LookupError):
    """A metric's weights are not there; the message names the file and the folder to put it in."""

    def __init__(self, metric: str, message: str):
        super().__init__(message)
        self.metric = metric
        self.message = message

    def __str__(self) -> str:
        return self.message


def _folders_text(folders: Sequence[Path]) -> str:
    return " or ".join(str(folder) for folder in folders) or "models/"


def find_inception_weights(folders: Sequence[Path]) -> Path:
    """The Inception weights file in one of ``folders`` (``models/evaluation/`` and its extra folders)."""
    for folder in folders:
        path = Path(folder) / INCEPTION_WEIGHTS
        if path.is_file():
            return path
    raise MissingWeights("inception", (
        f"FID, KID and Inception Score need the Inception weights {INCEPTION_WEIGHTS}: put it in "
        f"{_folders_text(folders)} (download: {INCEPTION_URL})."))


def clip_model_folders(folders: Sequence[Path]) -> list[Path]:
    """transformers CLIP folders (a ``config.json`` of a CLIP model) directly inside ``folders``, sorted."""
    found = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for child in sorted(Path(folder).iterdir()):
            config = child / "config.json"
            if config.is_file() and '"clip' in config.read_text(encoding="utf-8", errors="replace").lower():
                found.append(child)
    return found


def find_clip_model(folders: Sequence[Path], name: str | None = None) -> Path:
    """The CLIP folder called ``name`` (or the first one) in ``folders`` (``models/CLIP/``)."""
    found = clip_model_folders(folders)
    if name:
        for path in found:
            if path.name == name:
                return path
        known = ", ".join(path.name for path in found) or "none"
        raise MissingWeights("clip_score", f"clip_model: no CLIP model {name!r} in {_folders_text(folders)}; "
                                           f"found: {known}.")
    if not found:
        raise MissingWeights("clip_score", (
            "CLIP score needs a CLIP model: put a transformers CLIP folder (config.json, model weights, "
            f"preprocessor_config.json and tokenizer files, e.g. openai/clip-vit-large-patch14) in "
            f"{_folders_text(folders)}."))
    return found[0]


# --- pixels ------------------------------------------------------------------------------------------------------


def to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size as an N x 3 x H x W uint8 tensor (what the Inception extractor takes)."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def ssim(image: Image.Image, reference: Image.Image) -> float:
    """scikit-image's SSIM of two 8-bit RGB images (the reference resized to the image's size, Lanczos)."""
    from skimage.metrics import structural_similarity

    a, b = _pair(image, reference)
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """scikit-image's PSNR in dB of two 8-bit RGB images (identical images: infinity)."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair(image, reference)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def _pair(image: Image.Image, reference: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    reference = reference.convert("RGB")
    if reference.size != image.size:
        reference = reference.resize(image.size, Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8), np.asarray(reference, dtype=np.uint8)


# --- CLIP score ---------------------------------------------------------------------------------------------------


class ClipScorer:
    """torchmetrics' CLIPScore (100 * max(cosine(image, text), 0)) on a local transformers CLIP folder."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        self.folder = Path(folder)

        def load() -> tuple[Any, Any]:
            model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True).eval()
            processor = CLIPProcessor.from_pretrained(str(self.folder), local_files_only=True)
            return _ProjectedFeatures(model), processor

        self.metric = CLIPScore(model_name_or_path=load).to(device)  # type: ignore[arg-type]

    def score(self, image: Image.Image, prompt: str) -> float:
        """The CLIP score of one image and its prompt."""
        self.metric.reset()
        self.metric.update(to_uint8([image])[0], prompt)
        return float(self.metric.compute())


class _ProjectedFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as a
    tensor, as torchmetrics expects: transformers 5 returns an output object holding them in ``pooler_output``."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


# --- Inception features -------------------------------------------------------------------------------------------


class _Features(torch.nn.Module):
    """Hands already-extracted features to a torchmetrics metric (its ``update`` calls the network on them)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class InceptionFeatures:
    """Pool features (N x 2048) and unbiased logits (N x 1008) of a set of images."""

    pool: torch.Tensor
    logits: torch.Tensor

    def __len__(self) -> int:
        return int(self.pool.shape[0])


class InceptionExtractor:
    """torch-fidelity's InceptionV3 (through torchmetrics) with the weights file from ``models/evaluation/``.

    The file is first read with the safe weights reader (no code executed); only a file that passes is handed
    to torch-fidelity.
    """

    def __init__(self, weights: Path, device: torch.device | str = "cpu", batch_size: int = 16):
        from torchmetrics.image.fid import NoTrainInceptionV3

        from pipelines.models.weights import read_weights

        read_weights(weights)  # raises for a file that is not plain tensors
        self.device = torch.device(device)
        self.batch_size = batch_size
        # antialias=False: the TensorFlow 1.x bilinear resize of torch-fidelity and the original FID code.
        self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=[POOL, LOGITS],
                                          feature_extractor_weights_path=str(weights), antialias=False)
        self.network.to(self.device)

    @torch.no_grad()
    def extract(self, images: Sequence[Image.Image], on_batch: Callable[[int], None] | None = None
                ) -> InceptionFeatures:
        """Features of ``images`` in batches; ``on_batch(done)`` after each (progress, interrupt checks)."""
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            size = images[0].size
            batch = to_uint8([image if image.size == size else image.convert("RGB").resize(size)
                              for image in images[start:start + self.batch_size]])
            # torchmetrics' forward returns the first layer only; its own helper returns every layer asked for.
            pool, logit = self.network._torch_fidelity_forward(batch.to(self.device))
            pools.append(pool.double().cpu())
            logits.append(logit.double().cpu())
            if on_batch is not None:
                on_batch(min(start + self.batch_size, len(images)))
        if not pools:
            empty = torch.zeros(0, 2048, dtype=torch.float64)
            return InceptionFeatures(empty, torch.zeros(0, 1008, dtype=torch.float64))
        return InceptionFeatures(torch.cat(pools), torch.cat(logits))


def fid(real: InceptionFeatures, fake: InceptionFeatures) -> float:
    """torchmetrics' FID of two feature sets (each needs at least 2 images)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _at_least("FID", 2, real, fake)
    metric = FrechetInceptionDistance(feature=_Features(real.pool.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real.pool, real=True)
    metric.update(fake.pool, real=False)
    return float(metric.compute())


def kid(real: InceptionFeatures, fake: InceptionFeatures, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over subsets); the subset size is capped at the smaller set's size, and the
    subsets are drawn from a generator seeded with ``seed`` so the figure repeats."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _at_least("KID", 2, real, fake)
    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=_Features(real.pool.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.pool, real=True)
    metric.update(fake.pool, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(features: InceptionFeatures, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' Inception Score (mean, std over splits); at most one split per image, shuffled with a
    generator seeded with ``seed``."""
    from torchmetrics.image.inception import InceptionScore

    _at_least("Inception Score", 1, features)
    metric = InceptionScore(feature=_Features(features.logits.shape[1]), splits=max(1, min(splits, len(features))))
    metric.update(features.logits)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), (float(std) if math.isfinite(float(std)) else 0.0)


def _at_least(name: str, count: int, *sets: InceptionFeatures) -> None:
    if any(len(features) < count for features in sets):
        raise ValueError(f"{name} needs at least {count} images in each set; got {[len(s) for s in sets]}")
