"""TAESD: a tiny VAE decoder for sharp, cheap live previews (weights from ``models/VAE-taesd/``).

Accepted layouts in that folder, for SD 1.x/2.x (``taesd``) and SDXL (``taesdxl``, any name with "xl"):

- a diffusers ``AutoencoderTiny`` folder (``taesd/config.json`` + weights), as published on the Hub;
- one ``.safetensors``/``.pth`` file holding an ``AutoencoderTiny`` state dict (``decoder.layers.*`` keys);
- the original decoder-only file (``taesd_decoder.safetensors``/``.pth``: keys ``1.weight``, ``3.conv.0.weight``
  ...), whose layer ``k`` is diffusers' ``decoder.layers.{k-1}`` (the original starts with a clamp layer
  that diffusers folds into its forward).

TAESD works on the scaled latents the sampler holds, so no scaling factor is applied.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from pipelines.models.weights import read_weights
from pipelines.settings import MODEL_EXTENSIONS

log = logging.getLogger(__name__)

_ORIGINAL_KEY = re.compile(r"^(\d+)\.(.*)$")


def _wants_xl(name: str) -> bool:
    return "xl" in name.lower()


def find_taesd(folders: tuple[Path, ...] | list[Path], family: str) -> Path | None:
    """The TAESD folder or file for ``family`` ("sdxl" or an SD 1.x/2.x family) in ``folders``, if any."""
    xl = family == "sdxl"
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if _wants_xl(entry.name) != xl:
                continue
            if entry.is_dir() and (entry / "config.json").is_file():
                return entry
            if entry.is_file() and entry.suffix.lower() in MODEL_EXTENSIONS["taesd"]:
                return entry
    return None


def _diffusers_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(key.startswith(("decoder.", "encoder.")) for key in state_dict):
        return state_dict
    converted = {}
    for key, value in state_dict.items():
        match = _ORIGINAL_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected TAESD weight name {key!r}")
        converted[f"decoder.layers.{int(match.group(1)) - 1}.{match.group(2)}"] = value
    return converted


def load_taesd(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """An ``AutoencoderTiny`` from a diffusers folder or a single weights file (see module docs)."""
    from diffusers import AutoencoderTiny

    if path.is_dir():
        tiny = AutoencoderTiny.from_pretrained(path, local_files_only=True)
    else:
        tiny = AutoencoderTiny()
        weights = _diffusers_keys(read_weights(path))
        missing, unexpected = tiny.load_state_dict(weights, strict=False)
        if unexpected or any(key.startswith("decoder.") for key in missing):
            raise ValueError(f"{path}: not a TAESD decoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return tiny.to(device=device, dtype=dtype).eval().requires_grad_(False)


def taesd_decoder(model):
    """A preview decoder for ``model`` (a LoadedModel) from its TAESD weights, or None when there are none.

    Loaded once per model and kept on it; returns a function latents -> RGB (3, H, W) in [0, 1].
    """
    tiny = getattr(model, "taesd", None)
    if tiny is None:
        path = find_taesd(tuple(getattr(model, "taesd_dirs", ())), model.family.name)
        if path is None:
            return None
        unet = model.unet
        tiny = load_taesd(path, device=unet.device, dtype=unet.dtype)
        model.taesd = tiny
        log.info("TAESD previews from %s", path)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        pixels = tiny.decode(latents[:1].to(tiny.dtype), return_dict=False)[0][0]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    return decode
