"""IP-Adapter (image prompt) as ControlNet units, the way sd-webui-controlnet exposes it: the module
``ip-adapter_clip_sd15`` (or ``_sdxl`` / ``_sdxl_plus_vith``) with an ``ip-adapter_*`` model from the ControlNet
folder (SD 1.5 and SDXL; plain, plus and face variants), and the CLIP vision encoder from
``models/clip_vision/<clip_h|clip_g>/`` (a transformers folder: ``config.json`` + ``model.safetensors``).

The adapter is diffusers' own: its weights go into the UNet with diffusers' IP-Adapter loader for the job
and are taken out after it; the image embeddings are made as diffusers' pipelines make them (the encoder's
projected embedding for plain adapters, its second-to-last hidden states for plus/face ones; zeros, or the
encoding of a black image, for the unconditional half). Weight and start/end set the adapter's scale per step.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from webui.extension_api import Job, ModelFileError, UnetCall, UnetResiduals, read_weights

#: Module -> the clip_vision folder of its encoder (ViT-H for SD 1.5 and "plus_vith", ViT-bigG for SDXL).
CLIP_MODULES = {"ip-adapter_clip_sd15": "clip_h", "ip-adapter_clip_h": "clip_h",
                "ip-adapter_clip_sdxl": "clip_g", "ip-adapter_clip_g": "clip_g",
                "ip-adapter_clip_sdxl_plus_vith": "clip_h"}
ENCODER_FILES = ("config.json", "model.safetensors")


def is_ip_adapter(path: Path) -> bool:
    """An IP-Adapter file in the ControlNet folder (named ``ip-adapter*``, as the releases are)."""
    return path.is_file() and path.name.lower().startswith(("ip-adapter", "ip_adapter"))


@dataclass
class IPAdapterWeights:
    """An IP-Adapter file's two parts (``image_proj``, ``ip_adapter``), as diffusers' loader takes them."""

    path: Path
    state: dict[str, dict[str, torch.Tensor]]

    @property
    def cross_attention_dim(self) -> int:
        key = next(k for k in self.state["ip_adapter"] if k.endswith("to_k_ip.weight"))
        return int(self.state["ip_adapter"][key].shape[1])

    @property
    def embedding_width(self) -> int:
        """The width of the image embedding the projection takes (the encoder's projection or hidden size)."""
        proj = self.state["image_proj"]
        for key in ("proj.weight", "image_embeds.weight", "proj_in.weight", "proj.0.weight"):
            if key in proj:
                return int(proj[key].shape[1])
        return -1

    @property
    def plus(self) -> bool:
        """Plus / face adapters read the encoder's hidden states (a resampler), not its projected embedding."""
        return any(k.startswith(("latents", "perceiver_resampler", "proj_in")) for k in self.state["image_proj"]) or \
            "proj.0.weight" in self.state["image_proj"]


def load_ip_adapter(path: Path) -> IPAdapterWeights:
    """Read an IP-Adapter file (``.bin`` / ``.pth`` with two dicts, or ``.safetensors`` with prefixed keys)."""
    raw: Any = read_weights(path, keep_non_tensors=True)
    if isinstance(raw.get("image_proj"), dict) and isinstance(raw.get("ip_adapter"), dict):
        state = {"image_proj": raw["image_proj"], "ip_adapter": raw["ip_adapter"]}
    else:
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in raw.items():
            part, _, rest = key.partition(".")
            if part in state and isinstance(value, torch.Tensor):
                state[part][rest] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        raise ModelFileError(path, f"{path.name}: not an IP-Adapter (no image_proj / ip_adapter weights)")
    return IPAdapterWeights(path, state)


class ClipVisionEncoders:
    """CLIP vision encoders from the clip_vision folders, loaded once each (float32, then the app's device)."""

    def __init__(self, folders: Callable[[], tuple[Path, ...]]):
        self._folders = folders
        self._loaded: dict[tuple[Path, float], Any] = {}
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path | None:
        for root in self._folders():
            if all((root / name / file).is_file() for file in ENCODER_FILES):
                return root / name
        return None

    def missing(self, name: str) -> str | None:
        if self.folder(name) is not None:
            return None
        roots = self._folders()
        if not roots:
            return "needs a CLIP vision encoder, and no clip_vision folder is configured"
        where = roots[0] / name
        return f"needs a CLIP vision encoder in {where}: {', '.join(ENCODER_FILES)} (a transformers CLIPVisionModel" \
               "WithProjection folder)"

    def load(self, name: str) -> Any:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        folder = self.folder(name)
        if folder is None:
            raise ValueError(str(self.missing(name)))
        key = (folder, (folder / "model.safetensors").stat().st_mtime)
        with self._lock:
            if key in self._loaded:
                return self._loaded[key]
        config = CLIPVisionConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
        model = CLIPVisionModelWithProjection(config)
        state = read_weights(folder / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelFileError(folder / "model.safetensors", f"{folder.name}/model.safetensors: not the weights of "
                                 f"its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model = model.float().eval().requires_grad_(False)
        with self._lock:
            self._loaded[key] = model
        return model


def image_processor(encoder: Any) -> Any:
    """The CLIP preprocessing (resize, centre crop, CLIP mean/std) at the encoder's input size."""
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def encode(encoder: Any, processor: Any, image: Image.Image, plus: bool, device: torch.device,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embedding, unconditional embedding) as diffusers' ``encode_image`` makes them."""
    pixels = processor(image.convert("RGB"), return_tensors="pt").pixel_values.to(device=device, dtype=torch.float32)
    encoder = encoder.to(device)
    with torch.no_grad():
        if plus:
            positive = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            positive = encoder(pixels).image_embeds
            negative = torch.zeros_like(positive)
    return positive.to(dtype), negative.to(dtype)


def _ip_processors(unet: Any) -> list[Any]:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    return [p for p in unet.attn_processors.values()
            if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))]


def install(job: Job[Any], weights: IPAdapterWeights) -> list[Any]:
    """Put the adapter into the job's UNet with diffusers' loader; undone when the job ends. Returns the
    adapter's attention processors (whose ``scale`` the unit sets per step)."""
    unet = job.model.unet
    saved = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)

    def restore() -> None:
        unet.set_attn_processor(saved[0])
        unet.encoder_hid_proj = saved[1]
        unet.config.encoder_hid_dim_type = saved[2]

    job.defer(restore)
    unet._load_ip_adapter_weights([weights.state], low_cpu_mem_usage=False)
    return _ip_processors(unet)


@dataclass
class IPAdapterPatch:
    """Per UNet call: the adapter's scale (the unit's weight inside its start/end window, else 0) and the
    image embeddings for the call's batch (unconditional half first, as the UNet's batch is)."""

    weight: float
    start: float
    end: float
    hr_option: str
    processors: list[Any]
    positive: torch.Tensor
    negative: torch.Tensor

    def __call__(self, call: UnetCall) -> UnetResiduals:
        active = self.start <= call.progress < self.end and not (
            (self.hr_option == "Low res only" and call.pass_index == 1) or
            (self.hr_option == "High res only" and call.pass_index == 0))
        for processor in self.processors:
            processor.scale = [self.weight if active else 0.0]
        batch = call.sample.shape[0] // (2 if call.cfg else 1)
        parts = ([self.negative] * batch if call.cfg else []) + [self.positive] * batch
        embeds = torch.cat(parts)[:, None].to(device=call.sample.device, dtype=call.sample.dtype)
        return UnetResiduals(added_cond={"image_embeds": [embeds]})
