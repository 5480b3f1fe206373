"""What the benchmark measures on: real-size random-weight models, the device's matrix rate, UNet FLOPs.

Compute cost does not depend on the weight values, so a model built from the shipped configs with random
weights times like the real one, and no download is needed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "models" / "configs"


def build_random_model(folder: Path, family: str = "sd15", seed: int = 0, *, device: str = "cpu") -> Path:
    """A real-size diffusers folder (``sd15`` or ``sdxl``) with random weights, saved in fp16 safetensors.

    Weights are drawn on ``device`` (a GPU draws SDXL's 3.5 G parameters in seconds) and saved half size,
    as real checkpoints are distributed.
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines.models.checkpoints import shipped_tokenizer
    from pipelines.sampling.samplers import build_scheduler

    torch.manual_seed(seed)
    base = CONFIGS / family
    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    scheduler = build_scheduler("Euler", "Automatic", scheduler_config)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder"))
        if family == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base / "text_encoder_2"))
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=shipped_tokenizer("sdxl"), tokenizer_2=shipped_tokenizer("sdxl", "tokenizer_2"),
                unet=unet, scheduler=scheduler, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=shipped_tokenizer("sd1"), unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    target = folder / f"random-{family}"
    pipe.save_pretrained(target, safe_serialization=True)
    del pipe
    return target


def build_random_sd15(folder: Path, seed: int = 0) -> Path:
    """An SD 1.5-sized diffusers folder with random weights (kept for callers of the first benchmark)."""
    return build_random_model(folder, "sd15", seed)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeat: int = 10) -> float:
    """Measured dense matrix-product rate of ``device`` in TFLOP/s (the roofline the UNet is held to)."""
    if device.type != "cuda":
        size = 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeat
    return 2 * size**3 / seconds / 1e12


def unet_step_flops(unet, latents: torch.Tensor, cfg: bool, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: dict | None = None) -> int:
    """FLOPs of one sampling step: one UNet call on the CFG-doubled batch, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.cat([latents] * 2) if cfg else latents
    kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(sample, torch.tensor(500, device=latents.device), encoder_hidden_states=encoder_hidden_states,
             return_dict=False, **kwargs)
    return counter.get_total_flops()


def step_flops_for(model, batch: int, height: int, width: int, cfg: bool = True) -> int:
    """FLOPs of one step of ``model`` (a LoadedModel) at this batch and size, with random inputs."""
    unet = model.unet
    device, dtype = unet.device, unet.dtype
    rows = batch * (2 if cfg else 1)
    factor = model.vae_scale_factor
    latents = torch.randn(batch, unet.config.in_channels, height // factor, width // factor, device=device,
                          dtype=dtype)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if model.is_sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * rows, device=device,
                                          dtype=dtype)}
    return unet_step_flops(unet, latents, cfg, context, added)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock times cover it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
