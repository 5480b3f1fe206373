"""Hires. fix (REFERENCE §9): upscale the first pass, then redraw it at the larger size as img2img.

Latent modes resize the latents directly; image upscalers (Lanczos, Nearest, ESRGAN family) work on the
decoded image, which is then encoded again. The second pass runs ``hr_second_pass_steps`` real denoising
steps (0: as many as the first pass) at ``denoising_strength``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pipelines import latents as latent_ops
from pipelines.denoise import DenoiseInputs, denoise, img2img_timesteps
from pipelines.img2img import blank_inpaint_conditioning
from pipelines.manager import LoadedModel
from pipelines.request import LATENT_UPSCALE_MODES, GenerationRequest
from pipelines.samplers import build_scheduler
from pipelines.scripts import UnetPatch


def hires_steps(request: GenerationRequest) -> tuple[int, int]:
    """(schedule length, real steps) of the second pass: the schedule is long enough that its last
    ``denoising_strength`` part holds the wanted number of real steps."""
    real = request.hr_second_pass_steps or request.steps
    strength = request.denoising_strength
    if strength <= 0:
        return real, 0
    schedule = math.ceil(real / strength)
    while int(schedule * strength) < real:  # float rounding: never fewer real steps than asked
        schedule += 1
    return schedule, real


def upscale_only(request: GenerationRequest) -> bool:
    """Hires fix that only upscales: an image upscaler at denoising strength 0 (nothing to redraw)."""
    return request.enable_hr and request.denoising_strength == 0 and request.hr_upscaler not in LATENT_UPSCALE_MODES


def hires_params(request: GenerationRequest) -> dict[str, object]:
    """Infotext keys of the optional hires settings (the main ones come from the infotext table)."""
    if not request.enable_hr:
        return {}
    return {
        "Hires sampler": request.hr_sampler_name,
        "Hires schedule type": request.hr_scheduler,
        "Hires prompt": request.hr_prompt or None,
        "Hires negative prompt": request.hr_negative_prompt or None,
    }


def _cover(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (w, h) with the source's aspect ratio that covers ``target``."""
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * scale)), max(target[1], round(height * scale))


def upscale_latents(latents: torch.Tensor, mode: str, size: tuple[int, int], cover: tuple[int, int]) -> torch.Tensor:
    """Resize latents with an A1111 latent mode to ``cover`` (h, w), then centre-crop to ``size`` (h, w)."""
    interpolation, antialias = LATENT_UPSCALE_MODES[mode]
    kwargs = {"antialias": antialias} if interpolation in ("bilinear", "bicubic") else {}
    resized = F.interpolate(latents.float(), size=cover, mode=interpolation, **kwargs).to(latents.dtype)
    top, left = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    return resized[:, :, top : top + size[0], left : left + size[1]]


def hires_pass(request: GenerationRequest, model: LoadedModel, latents: torch.Tensor, *, upscalers,
               conditioning, generators: list[torch.Generator],
               make_noise: Callable[[tuple[int, int, int]], torch.Tensor],
               on_step: Callable[[int, torch.Tensor], None], device,
               patches: Sequence[UnetPatch] = (), step_cache_interval: int = 0) -> torch.Tensor:
    """Upscale the first pass's latents and redraw them; returns the latents at the hires size.

    ``patches`` are the always-on scripts' UNet patches; they see ``pass_index=1`` and the hires size.
    ``step_cache_interval`` is the step-caching option (:mod:`pipelines.step_cache`); this pass starts its own cache.
    """
    width, height = request.hires_size
    factor = model.vae_scale_factor
    size = (height // factor, width // factor)
    cover = _cover(request.width, request.height, (width, height))
    dtype = model.unet.dtype
    if request.hr_upscaler in LATENT_UPSCALE_MODES:
        init = upscale_latents(latents, request.hr_upscaler, size, (cover[1] // factor, cover[0] // factor))
    else:
        pixels, _ = latent_ops.decode(model.vae, latents, allow_upcast=not model.vae_upcast)
        images = [upscalers.upscale(image, request.hr_upscaler, size=(width, height), crop=True)
                  for image in latent_ops.tensor_to_pil(pixels)]
        init = latent_ops.encode(model.vae, latent_ops.pil_to_tensor(images), generators)
    init = init.to(device=device, dtype=dtype)
    schedule, _ = hires_steps(request)
    scheduler = build_scheduler(request.hr_sampler_name or request.sampler_name,
                                request.hr_scheduler or request.scheduler, model.scheduler_config,
                                seeds=[g.initial_seed() for g in generators])
    timesteps, real = img2img_timesteps(scheduler, schedule, request.denoising_strength, device)
    if not len(timesteps):
        return init
    noise = make_noise((init.shape[1], *size)).to(device=device, dtype=dtype)
    start = scheduler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    add_time_ids = torch.tensor([[height, width, 0, 0, height, width]]) if model.is_sdxl else None
    inpaint = None
    if model.is_inpainting:
        seeds = [int(g.initial_seed()) for g in generators]
        inpaint = blank_inpaint_conditioning(model, init.shape[0], width, height, seeds, device)
    return denoise(model.unet, DenoiseInputs(
        latents=start, timesteps=timesteps, scheduler=scheduler, conditioning=conditioning,
        cfg_scale=request.cfg_scale, generators=generators, steps=real, add_time_ids=add_time_ids,
        inpaint=inpaint, patches=patches, size=(width, height), pass_index=1,
        step_cache_interval=step_cache_interval), on_step)
