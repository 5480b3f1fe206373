"""The upscalers the user has, and upscaling a PIL image with one of them to a scale or an exact size.

Built-ins: ``None`` (no model; a requested resize is done with Lanczos, as A1111's "None" does),
``Lanczos`` and ``Nearest``. Model upscalers are the ``.pth``/``.safetensors`` files in
``models/ESRGAN/`` and ``models/RealESRGAN/`` (and ``--esrgan-models-path``), named by file stem.

A model runs as many times as needed to reach the target (a x4 model for x8 runs twice) and the
result is brought to the exact target size with Lanczos, so a x4 model for a x2 target runs once
and is downsampled (A1111's behaviour). Unlike A1111, the target size of a scale-by is not
rounded down to a multiple of 8: ``scale`` 3.5 on 100 x 60 gives exactly 350 x 210.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import spandrel
import torch
from PIL import Image, ImageOps

from pipelines.models.devices import pick_device
from pipelines.settings import MODEL_EXTENSIONS, MODEL_FOLDERS, Paths
from pipelines.upscaling.models import inference_dtype, load_upscaler_model
from pipelines.upscaling.tiling import StopCheck, check_tiling, count_tiles, tiled_upscale

BUILTIN_UPSCALERS: dict[str, Image.Resampling | None] = {
    "None": None,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
MODEL_KINDS = ("esrgan", "realesrgan")
#: Tiling when a call gives none (the defaults of the upscaler_tile / upscaler_tile_overlap options).
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 32
#: The names A1111 lists the official Real-ESRGAN releases under (and writes into ``Hires upscaler``),
#: used for those files in ``models/RealESRGAN/`` so pasted infotexts find them.
REALESRGAN_NAMES = {
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
}
#: Called with (tiles done, tiles in total) after every model call of one :meth:`Upscalers.upscale`.
TileProgress = Callable[[int, int], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpscalerInfo:
    """One upscaler as listed to the user (and at ``/sdapi/v1/upscalers``).

    ``name`` is what requests use: the file stem (A1111's name for the official Real-ESRGAN files,
    e.g. "R-ESRGAN 4x+"), or ``<folder>/<relative path>`` when two files share a stem. ``path`` and
    ``model_name`` (the file stem) are None for the built-ins.
    """

    name: str
    model_name: str | None
    path: Path | None
    kind: str  # "builtin", "esrgan" or "realesrgan"

    @property
    def is_model(self) -> bool:
        return self.path is not None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


class Upscalers:
    """Lists upscalers, reads their scales lazily, keeps one loaded model, and upscales images.

    ``device`` is "auto" or a torch device; ``half`` allows fp16 (or bf16) on an accelerator for
    architectures that support it (False for ``--no-half``). Thread-safe: the model cache is locked.
    """

    def __init__(self, paths: Paths, device: str | torch.device = "cpu", *, half: bool = True):
        self.paths = paths
        self.device = pick_device(device) if isinstance(device, str) else device
        self.half = half
        self._lock = threading.Lock()
        # None marks a file that could not be read, so a listing logs it once per file version.
        self._scales: dict[tuple[str, int, int], int | None] = {}
        # Why a model file cannot be used, by upscaler name (kept for the UI, which lists such files).
        self._errors: dict[str, str] = {}
        self._loaded: tuple[tuple[str, int, int], spandrel.ImageModelDescriptor] | None = None
        self._upscalers: list[UpscalerInfo] = []
        self.refresh()

    # --------------------------------------------------------------------------- listing

    def refresh(self) -> None:
        """Rescan the upscaler folders."""
        found = [UpscalerInfo(name, None, None, "builtin") for name in BUILTIN_UPSCALERS]
        taken = {info.name for info in found}
        for kind in MODEL_KINDS:
            for root in self.paths.model_dirs(kind):
                if not root.is_dir():
                    continue
                for path in sorted(root.rglob("*")):
                    relative = path.relative_to(root)
                    if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                        continue
                    if path.suffix.lower() not in MODEL_EXTENSIONS[kind]:
                        continue
                    name = REALESRGAN_NAMES.get(path.stem, path.stem) if kind == "realesrgan" else path.stem
                    if name in taken:
                        name = f"{MODEL_FOLDERS[kind]}/{relative.as_posix()}"
                    taken.add(name)
                    found.append(UpscalerInfo(name, path.stem, path, kind))
        with self._lock:
            self._upscalers = found

    @property
    def upscalers(self) -> list[UpscalerInfo]:
        """Every upscaler, built-ins first, then the model files in folder order."""
        with self._lock:
            return list(self._upscalers)

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.upscalers]

    def find(self, name: str) -> UpscalerInfo:
        """The upscaler called ``name``: its listed name, else its file name, else its file stem, else
        its listed name ignoring case.

        LookupError names the upscaler asked for and every available name.
        """
        upscalers = self.upscalers
        for matches in (
            lambda info: info.name == name,
            lambda info: info.path is not None and info.path.name == name,
            lambda info: info.model_name == name,
            lambda info: info.name.lower() == name.lower(),
        ):
            for info in upscalers:
                if matches(info):
                    return info
        raise LookupError(f"upscaler: no upscaler named {name!r}; available: {', '.join(self.names)}")

    def scale(self, name: str) -> int | None:
        """The native scale of a model upscaler, read from its weights (once per file version).

        None for the built-ins, and for a file that cannot be used (unreadable, refused as unsafe, an
        architecture spandrel does not know, a face restorer): that is logged once with the file and
        the reason, so one bad file never breaks a listing of the good ones.
        """
        info = self.find(name)
        if info.path is None:
            return None
        try:
            key = _file_key(info.path)
        except OSError as error:  # removed since the last refresh
            log.warning("upscaler %s: cannot read %s: %s", info.name, info.path, error)
            with self._lock:
                self._errors[info.name] = f"cannot read {info.path}: {error}"
            return None
        with self._lock:
            if key in self._scales:
                return self._scales[key]
            if self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1].scale
        scale: int | None
        try:
            scale = load_upscaler_model(info.path).scale
        except (ValueError, OSError) as error:
            log.warning("upscaler %s: cannot use %s: %s", info.name, info.path, error)
            scale = None
            with self._lock:
                self._errors[info.name] = f"cannot use {info.path}: {error}"
        with self._lock:
            self._scales[key] = scale
            if scale is not None:
                self._errors.pop(info.name, None)
        return scale

    def unusable(self, *, probe: bool = True) -> dict[str, str]:
        """Model upscalers that cannot be used, by name, with the reason.

        With ``probe`` every model file is checked (its scale read, once per file version); without it,
        only the files found unusable so far. The API leaves these out of ``/sdapi/v1/upscalers``; the UI
        lists them with the reason.
        """
        models = [info.name for info in self.upscalers if info.is_model]
        if probe:
            names = {name for name in models if self.scale(name) is None}
            with self._lock:
                return {name: self._errors.get(name, "cannot be used (see the log)") for name in sorted(names)}
        with self._lock:
            return {name: self._errors[name] for name in models if name in self._errors}

    # --------------------------------------------------------------------------- models

    def load(self, name: str) -> spandrel.ImageModelDescriptor:
        """The model of upscaler ``name`` on this device in its inference dtype; the previous one is dropped."""
        info = self.find(name)
        if info.path is None:
            raise ValueError(f"upscaler: {name!r} is a built-in resize, not a model")
        key = _file_key(info.path)
        with self._lock:
            if self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1]
            self._loaded = None  # free the old model before the new one takes memory
            model = load_upscaler_model(info.path)
            model = model.to(self.device, inference_dtype(model, self.device, self.half))
            self._loaded = (key, model)
            self._scales[key] = model.scale
            return model

    def unload(self) -> None:
        """Drop the loaded model (the caller frees device memory afterwards, e.g. ``devices.free_memory``)."""
        with self._lock:
            self._loaded = None

    # --------------------------------------------------------------------------- upscaling

    def upscale(
        self,
        image: Image.Image,
        upscaler: str,
        *,
        scale: float | None = None,
        size: tuple[int, int] | None = None,
        crop: bool = False,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        on_progress: TileProgress | None = None,
        should_stop: StopCheck | None = None,
    ) -> Image.Image:
        """Upscale ``image`` with ``upscaler`` by ``scale`` or to ``size`` = (width, height); give exactly one.

        With ``size`` and ``crop`` the image is scaled to cover the size and centre-cropped to it;
        without ``crop`` it is stretched. ``tile``/``overlap`` (input pixels; tile 0 = whole image)
        control tiled inference (jobs pass the upscaler_tile options).
        ``on_progress(done, total)`` counts model calls over all passes; ``should_stop()`` is asked
        before each: truthy raises ``JobInterrupted`` (``JobControl.check`` may be passed as is).
        Transparency is kept, resized with Lanczos.
        """
        target = target_size(image.size, scale=scale, size=size)
        check_tiling(tile, overlap)
        info = self.find(upscaler)
        if target == image.size:
            return image.copy()
        if crop:
            ratio = max(target[0] / image.width, target[1] / image.height)
            cover = (max(target[0], math.ceil(image.width * ratio)), max(target[1], math.ceil(image.height * ratio)))
        else:
            cover = target
        alpha = image.getchannel("A") if "A" in image.getbands() else None
        result = image.convert("RGB")
        if info.path is not None:
            result = self._run_model(result, info.name, cover, tile, overlap, on_progress, should_stop)
        # NEAREST is 0, so test for None rather than truthiness.
        builtin = BUILTIN_UPSCALERS[info.name] if info.kind == "builtin" else None
        resample = Image.Resampling.LANCZOS if builtin is None else builtin
        result = _fit(result, target, crop, resample)
        if alpha is not None:
            result.putalpha(_fit(alpha, target, crop, Image.Resampling.LANCZOS))
        return result

    def _run_model(
        self,
        image: Image.Image,
        name: str,
        cover: tuple[int, int],
        tile: int,
        overlap: int,
        on_progress: TileProgress | None,
        should_stop: StopCheck | None,
    ) -> Image.Image:
        model = self.load(name)
        sizes = _pass_sizes(image.size, cover, model.scale)
        total = sum(count_tiles(width, height, tile, overlap) for width, height in sizes)
        done = 0

        def tile_done() -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, total)

        pixels = pil_to_tensor(image)
        with torch.inference_mode():
            for _ in sizes:
                pixels = tiled_upscale(
                    model, pixels, model.scale, tile=tile, overlap=overlap, device=model.device,
                    dtype=model.dtype, on_tile=tile_done, should_stop=should_stop,
                )
        return tensor_to_pil(pixels)


def target_size(
    source: tuple[int, int], *, scale: float | None = None, size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(width, height) to reach: ``source`` times ``scale`` (rounded), or ``size``; exactly one must be given."""
    if (scale is None) == (size is None):
        raise ValueError("upscale: give either scale (upscale by) or size (resize to), not both or neither")
    if scale is not None:
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: must be a positive number, got {scale}")
        return max(1, round(source[0] * scale)), max(1, round(source[1] * scale))
    assert size is not None  # exactly one of the two is given (checked above)
    if len(size) != 2 or any(int(side) != side or side < 1 for side in size):
        raise ValueError(f"size: must be (width, height) in whole pixels >= 1, got {size}")
    return int(size[0]), int(size[1])


def _pass_sizes(source: tuple[int, int], cover: tuple[int, int], scale: int) -> list[tuple[int, int]]:
    """Input size of each model pass needed to reach ``cover``: none when the image is already large
    enough, one for a restoration (x1) model."""
    width, height = source
    sizes: list[tuple[int, int]] = []
    while width < cover[0] or height < cover[1]:
        sizes.append((width, height))
        if scale <= 1:
            break
        width, height = width * scale, height * scale
    return sizes


def _fit(image: Image.Image, size: tuple[int, int], crop: bool, resample: Image.Resampling) -> Image.Image:
    if image.size == size:
        return image
    if crop:
        return ImageOps.fit(image, size, resample)
    return image.resize(size, resample)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (1, 3, H, W) float32 tensor in 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def tensor_to_pil(pixels: torch.Tensor) -> Image.Image:
    """A (1, 3, H, W) tensor in 0..1 as an RGB PIL image (rounded to 8 bits)."""
    array = (pixels[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")
