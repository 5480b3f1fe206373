"""The metrics of an evaluation, each computed by a well-kept library, not re-written here.

- CLIP score (prompt adherence): torchmetrics' ``CLIPScore`` on a CLIP model from ``models/CLIP/`` (handed over
  as a loader, since torchmetrics takes only hub names as strings): a transformers CLIP folder, or an open_clip
  model loaded by the open_clip package (a folder in the Hub layout, ``open_clip_config.json`` and
  ``open_clip_model.safetensors``, or a ``.safetensors`` named after its architecture, ``ViT-L-14.safetensors``).
- FID, KID, Inception Score: torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and
  ``InceptionScore`` on features of torch-fidelity's InceptionV3 (torchmetrics' ``NoTrainInceptionV3``) with the
  weights file the reference implementations use, ``weights-inception-2015-12-05-6726825d.pth``, from
  ``models/evaluation/``. Images are resized to 299x299 as torch-fidelity does (TensorFlow 1.x bilinear), so
  figures agree with torch-fidelity's. Features are extracted once per image and shared by the three metrics.
- SSIM and PSNR against a reference image: scikit-image's ``structural_similarity`` and
  ``peak_signal_noise_ratio`` on 8-bit RGB (data range 255).
- LPIPS against a reference image: the ``lpips`` package's ``LPIPS(net="alex")`` (version 0.1), with the
  AlexNet backbone file torchvision and the package load, ``alexnet-owt-7be5be79.pth``, and the linear layers
  ``alex.pth`` (the package's ``weights/v0.1/alex.pth``), both from ``models/evaluation/``; when ``alex.pth`` is
  not there, the copy installed with the ``lpips`` package is used (the same file).

A metric whose weights are missing is left out with a message naming the file and where to put it
(:class:`MissingWeights`); the others still run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

#: The metrics an evaluation can compute, in the order the table shows them.
METRICS: tuple[str, ...] = ("clip_score", "fid", "kid", "inception_score", "ssim", "psnr", "lpips")
#: Per-image metrics (a mean with a 95% interval over prompts and seeds) and per-set metrics (one figure per
#: candidate, computed over all of its images).
PER_IMAGE_METRICS = ("clip_score", "ssim", "psnr", "lpips")
PER_SET_METRICS = ("fid", "kid", "inception_score")
#: Whether a larger figure is better.
HIGHER_IS_BETTER: dict[str, bool] = {"clip_score": True, "fid": False, "kid": False, "inception_score": True,
                                     "ssim": True, "psnr": True, "lpips": False}
#: Column titles.
METRIC_LABELS: dict[str, str] = {"clip_score": "CLIP score", "fid": "FID", "kid": "KID",
                                 "inception_score": "Inception Score", "ssim": "SSIM", "psnr": "PSNR (dB)",
                                 "lpips": "LPIPS"}
#: What each metric needs besides the generated images.
NEEDS_REFERENCE_FOLDER = ("fid", "kid")
NEEDS_REFERENCE_IMAGE = ("ssim", "psnr", "lpips")

#: torch-fidelity's InceptionV3 weights (the TensorFlow FID network converted), as the reference FID uses.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
#: LPIPS (AlexNet, version 0.1): torchvision's ImageNet AlexNet weights (the backbone the lpips package loads)
#: and the package's linear layers.
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_LINEAR = "alex.pth"
LPIPS_LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
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


#: The weights file names of an open_clip folder (the Hugging Face Hub layout), in the order open_clip prefers.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def _is_transformers_clip(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and '"clip' in config.read_text(encoding="utf-8", errors="replace").lower()


def _is_open_clip_folder(path: Path) -> bool:
    return (path / OPEN_CLIP_CONFIG).is_file() and any(path.glob("*.safetensors"))


def open_clip_architecture(path: Path) -> str | None:
    """The built-in open_clip architecture a ``.safetensors`` file's name starts with (``ViT-L-14.safetensors``,
    ``ViT-H-14__laion2b_s32b_b79k.safetensors``; the longest name that fits), or None."""
    import open_clip

    stem = path.name.removesuffix(path.suffix)
    fitting = [name for name in open_clip.list_models()
               if stem == name or any(stem.startswith(name + sep) for sep in ("__", "-", "_", "."))]
    return max(fitting, key=len) if fitting else None


def clip_model_folders(folders: Sequence[Path]) -> list[Path]:
    """The CLIP models directly inside ``folders``, sorted: transformers CLIP folders (a ``config.json`` of a CLIP
    model), open_clip folders (``open_clip_config.json`` and a ``.safetensors``), and open_clip ``.safetensors``
    files named after their architecture."""
    found = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for child in sorted(Path(folder).iterdir()):
            if child.is_dir() and (_is_transformers_clip(child) or _is_open_clip_folder(child)):
                found.append(child)
            elif child.is_file() and child.suffix == ".safetensors" and open_clip_architecture(child):
                found.append(child)
    return found


def find_clip_model(folders: Sequence[Path], name: str | None = None) -> Path:
    """The CLIP model called ``name`` (a folder's or file's name; a file also by its stem) or the first one in
    ``folders`` (``models/CLIP/``)."""
    found = clip_model_folders(folders)
    if name:
        for path in found:
            if name in (path.name, path.stem if path.is_file() else path.name):
                return path
        known = ", ".join(path.name for path in found) or "none"
        raise MissingWeights("clip_score", f"clip_model: no CLIP model {name!r} in {_folders_text(folders)}; "
                                           f"found: {known}.")
    if not found:
        raise MissingWeights("clip_score", (
            "CLIP score needs a CLIP model: put a transformers CLIP folder (config.json, model weights, "
            "preprocessor_config.json and tokenizer files, e.g. openai/clip-vit-large-patch14), an open_clip "
            f"folder ({OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS[0]}) or an open_clip .safetensors named after its "
            f"architecture (e.g. ViT-L-14.safetensors) in {_folders_text(folders)}."))
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


# --- LPIPS --------------------------------------------------------------------------------------------------------


def find_lpips_weights(folders: Sequence[Path]) -> tuple[Path, Path]:
    """The LPIPS backbone and linear-layer files in ``folders`` (``models/evaluation/``); the linear layers fall
    back to the copy installed with the ``lpips`` package."""
    backbone = next((Path(f) / LPIPS_BACKBONE for f in folders if (Path(f) / LPIPS_BACKBONE).is_file()), None)
    if backbone is None:
        raise MissingWeights("lpips", (
            f"LPIPS needs the AlexNet weights {LPIPS_BACKBONE}: put it in {_folders_text(folders)} "
            f"(download: {LPIPS_BACKBONE_URL})."))
    linear = next((Path(f) / LPIPS_LINEAR for f in folders if (Path(f) / LPIPS_LINEAR).is_file()), None)
    if linear is None:
        import lpips

        linear = Path(lpips.__file__).parent / "weights" / "v0.1" / LPIPS_LINEAR
        if not linear.is_file():
            raise MissingWeights("lpips", (
                f"LPIPS needs its linear layers {LPIPS_LINEAR}: put it in {_folders_text(folders)} "
                f"(download: {LPIPS_LINEAR_URL})."))
    return backbone, linear


class LpipsScorer:
    """The lpips package's ``LPIPS(net="alex")`` with its backbone and linear layers read from local files.

    Both files are read with the safe weights reader (no code executed) and must hold every tensor the network
    has: torchvision's ``features.N.*`` for the backbone, ``linK.model.1.weight`` for the linear layers.
    """

    def __init__(self, backbone: Path, linear: Path, device: torch.device | str = "cpu"):
        import warnings

        import lpips

        from pipelines.models.weights import read_weights

        with warnings.catch_warnings():  # lpips builds torchvision's AlexNet with the old `pretrained` argument
            warnings.simplefilter("ignore")
            network = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        state = network.state_dict()
        # lpips keeps torchvision's AlexNet ``features`` layers under their own numbers, split into slices.
        where = {name: f"net.{slice_name}.{name}" for slice_name, block in network.net.named_children()
                 for name, _ in block.named_children()}
        filled: set[str] = set()
        for key, value in read_weights(backbone).items():
            parts = key.split(".")
            if parts[0] == "features" and len(parts) == 3 and parts[1] in where:
                target = f"{where[parts[1]]}.{parts[2]}"
                if target in state:
                    state[target] = value
                    filled.add(target)
        for key, value in read_weights(linear).items():
            if key.startswith("lin") and key in state:
                state[key] = value
                filled.add(key)
        needed = {key for key in state if key.startswith(("net.", "lin")) and not key.startswith("lins.")}
        missing = sorted(needed - filled)
        if missing:
            in_backbone = [key for key in missing if key.startswith("net.")]
            file = backbone if in_backbone else linear
            raise ValueError(f"{file} is not the LPIPS {'AlexNet' if in_backbone else 'linear-layer'} weights "
                             f"file: it lacks {', '.join(missing[:4])}")
        for key in state:  # the same layers again, as the list ``lins`` (lins.K is linK)
            if key.startswith("lins."):
                state[key] = state["lin" + key.removeprefix("lins.")]
        network.load_state_dict(state)
        self.network = network.eval().to(device)
        self.device = torch.device(device)

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """An RGB image as the 1 x 3 x H x W tensor in [-1, 1] LPIPS takes (the package's ``im2tensor``)."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array / (255.0 / 2.0) - 1.0).permute(2, 0, 1)[None]

    @torch.no_grad()
    def score(self, image: Image.Image, reference: Image.Image) -> float:
        """LPIPS distance of ``image`` to ``reference`` (resized to the image's size, Lanczos); 0 is identical."""
        a, b = _pair(image, reference)
        first = self.to_tensor(Image.fromarray(a)).to(self.device)
        second = self.to_tensor(Image.fromarray(b)).to(self.device)
        return float(self.network(first, second).item())


# --- CLIP score ---------------------------------------------------------------------------------------------------


class ClipScorer:
    """torchmetrics' CLIPScore (100 * max(cosine(image, text), 0)) on a local CLIP model: a transformers CLIP
    folder, or an open_clip model (a folder in the Hub layout or a ``.safetensors`` named after its architecture)
    loaded by the open_clip package with its own preprocessing and tokenizer."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.folder = Path(folder)
        load = _transformers_clip if _is_transformers_clip(self.folder) else _open_clip
        self.metric = CLIPScore(model_name_or_path=lambda: load(self.folder)).to(device)  # type: ignore[arg-type]

    @torch.no_grad()
    def score(self, image: Image.Image, prompt: str) -> float:
        """The CLIP score of one image and its prompt."""
        self.metric.reset()
        self.metric.update(to_uint8([image])[0], prompt)
        return float(self.metric.compute())


def _transformers_clip(folder: Path) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    return _ProjectedFeatures(model), processor


def _open_clip(path: Path) -> tuple[Any, Any]:
    """An open_clip model and its preprocessing / tokenizer, offline, from a folder or a ``.safetensors`` file."""
    import open_clip

    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"clip_model: {path} holds no .safetensors weights (expected {OPEN_CLIP_WEIGHTS[0]})")
        name, pretrained = f"local-dir:{path}", None
    else:
        architecture = open_clip_architecture(path)
        if architecture is None or path.suffix != ".safetensors":
            raise ValueError(f"clip_model: {path.name} is not an open_clip .safetensors named after its "
                             "architecture (e.g. ViT-L-14.safetensors)")
        name, pretrained = architecture, str(path)
    model, preprocess = open_clip.create_model_from_pretrained(name, pretrained=pretrained, device="cpu")
    return _OpenClipFeatures(model.eval()), _OpenClipProcessor(preprocess, open_clip.get_tokenizer(name))


class _OpenClipProcessor:
    """The processor interface torchmetrics calls, on open_clip's preprocessing and tokenizer."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Callable[..., torch.Tensor]):
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __call__(self, text: Sequence[str] | None = None, images: Sequence[torch.Tensor] | None = None,
                 **_: Any) -> dict[str, torch.Tensor]:
        if images is not None:
            pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
            return {"pixel_values": torch.stack([self.preprocess(picture) for picture in pictures])}
        ids = self.tokenizer(list(text or []))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class _OpenClipFeatures(torch.nn.Module):
    """An open_clip model with the ``get_image_features`` / ``get_text_features`` torchmetrics calls."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace()  # no text_config: the tokenizer already cuts prompts to its context

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


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
