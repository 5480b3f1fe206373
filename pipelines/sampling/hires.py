"""Hires. fix (docs/compatibility.md §9): upscale the first pass, then redraw it at the larger size as img2img.

Latent modes resize the latents directly; image upscalers (Lanczos, Nearest, ESRGAN family) work on the
decoded image, which is then encoded again. The second pass runs ``hr_second_pass_steps`` real denoising
steps (0: as many as the first pass) at ``denoising_strength``.

With a hires checkpoint (``hr_checkpoint_name``) the second pass runs on that model: the first model's VAE
decodes, the hires model's VAE encodes, and the hires prompts are encoded by the hires model's text
encoders. Latent modes pass latents over unchanged only between models that share a latent space (SD 1.x
and 2.x); between SDXL and SD 1.x/2.x they resize the decoded pixels instead (see :func:`upscale_first_pass`).

Flux.1 and SD 3.5 run the second pass in their own loop as their img2img (:func:`_family_hires_pass`,
:mod:`pipelines.sampling.flow_img2img`), on the hires prompts their own text encoders encode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.job_control import JobStopped
from pipelines.models.catalog import ModelFile
from pipelines.models.manager import LoadedModel
from pipelines.plugins.scripts import UnetPatch
from pipelines.prompts.embeddings import EmbeddingDatabase
from pipelines.prompts.encoding import Conditioning, PromptEncoder, build_conditioning
from pipelines.prompts.parser import extract_extra_networks
from pipelines.request import LATENT_UPSCALE_MODES, GenerationRequest
from pipelines.sampling import flow_img2img
from pipelines.sampling import latents as latent_ops
from pipelines.sampling.denoise import DenoiseInputs, ModelSwitch, denoise, img2img_timesteps
from pipelines.sampling.img2img import SourceLatents, blank_inpaint_conditioning
from pipelines.sampling.previews import StepReporter
from pipelines.sampling.refiner import add_time_ids as sdxl_time_ids
from pipelines.sampling.samplers import build_scheduler
from pipelines.sampling.seeds import image_noise
from pipelines.upscaling.library import DEFAULT_OVERLAP, DEFAULT_TILE


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


def _latent_space(model: LoadedModel) -> tuple[object, ...]:
    """What latents of ``model`` mean: SD 1.x and 2.x share one latent space, SDXL has its own."""
    config = model.vae.config
    return model.is_sdxl, config.latent_channels, config.scaling_factor, getattr(config, "shift_factor", None)


def upscale_first_pass(request: GenerationRequest, model: LoadedModel, latents: torch.Tensor, *,
                       generators: list[torch.Generator], upscalers,
                       switch_model: Callable[[], LoadedModel] | None = None,
                       should_stop: Callable[[], object] | None = None,
                       on_progress: Callable[[int, int], None] | None = None,
                       tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> tuple[LoadedModel, torch.Tensor]:
    """The first pass's latents upscaled to the hires size; returns (hires model, its init latents).

    ``switch_model`` loads the hires checkpoint when the request names one other than ``model``. It is
    called once nothing more is needed of ``model`` (with a checkpoint cache of 1 it unloads it). Then:
    an image upscaler works on pixels decoded by the first model's VAE and encoded by the hires model's;
    a latent mode hands its latents over as they are when both models share a latent space (SD 1.x and
    2.x do) and otherwise resizes the decoded pixels with the same interpolation before encoding them.
    ``should_stop``/``on_progress``/``tile``/``overlap`` go to the image upscaler (interrupt between tiles;
    the ``upscaler_tile`` options).
    """
    width, height = request.hires_size
    cover = _cover(request.width, request.height, (width, height))
    latent_mode = request.hr_upscaler in LATENT_UPSCALE_MODES
    first_space = _latent_space(model)
    pixels = None
    if not latent_mode or switch_model is not None:
        decoded, _ = latent_ops.decode(model.vae, latents, allow_upcast=not model.vae_upcast)
        pixels = decoded.float().cpu()
    if switch_model is not None:
        latents = latents.cpu()
        model = switch_model()
    if latent_mode and _latent_space(model) == first_space:
        factor = model.vae_scale_factor
        return model, upscale_latents(latents, request.hr_upscaler, (height // factor, width // factor),
                                      (cover[1] // factor, cover[0] // factor))
    if pixels is None:  # decoded above unless latent mode stayed on the first model, which returned
        raise RuntimeError("hires fix: the first pass was not decoded to pixels")
    if latent_mode:
        resized = upscale_latents(pixels, request.hr_upscaler, (height, width), (cover[1], cover[0])).clamp(-1, 1)
    else:
        images = [upscalers.upscale(image, request.hr_upscaler, size=(width, height), crop=True, tile=tile,
                                    overlap=overlap, should_stop=should_stop, on_progress=on_progress)
                  for image in latent_ops.tensor_to_pil(pixels)]
        resized = latent_ops.pil_to_tensor(images)
    return model, latent_ops.encode(model.vae, resized, generators)


def hires_pass(request: GenerationRequest, model: LoadedModel, init: torch.Tensor, *,
               conditioning, generators: list[torch.Generator],
               make_noise: Callable[[tuple[int, int, int]], torch.Tensor],
               on_step: Callable[[int, torch.Tensor], None], device,
               patches: Sequence[UnetPatch] = (), step_cache_interval: int = 0, switch: ModelSwitch | None = None,
               aesthetic_scores: tuple[float, float] = (2.5, 6.0)) -> torch.Tensor:
    """Redraw ``init`` (the upscaled first pass, see :func:`upscale_first_pass`) on ``model``, the hires
    model; returns the latents at the hires size.

    ``patches`` are the always-on scripts' UNet patches; they see ``pass_index=1`` and the hires size.
    ``step_cache_interval`` is the step-caching option (:mod:`pipelines.sampling.step_cache`); this pass
    starts its own cache. ``switch`` hands the rest of the pass to the refiner (:mod:`pipelines.sampling.refiner`).
    """
    width, height = request.hires_size
    factor = model.vae_scale_factor
    size = (height // factor, width // factor)
    if model.spec.sample is not None:
        return _family_hires_pass(request, model, init, conditioning, make_noise((init.shape[1], *size)), on_step)
    dtype = model.unet.dtype
    init = init.to(device=device, dtype=dtype)
    schedule, _ = hires_steps(request)
    scheduler = build_scheduler(request.hr_sampler_name or request.sampler_name,
                                request.hr_scheduler or request.scheduler, model.scheduler_config,
                                seeds=[g.initial_seed() for g in generators], sdxl=model.is_sdxl)
    timesteps, real = img2img_timesteps(scheduler, schedule, request.denoising_strength, device)
    if not len(timesteps):
        return init
    noise = make_noise((init.shape[1], *size)).to(device=device, dtype=dtype)
    start = scheduler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    add_time_ids = sdxl_time_ids(model, width, height, aesthetic_scores)
    inpaint = None
    if model.is_inpainting:
        seeds = [int(g.initial_seed()) for g in generators]
        inpaint = blank_inpaint_conditioning(model, init.shape[0], width, height, seeds, device)
    return denoise(model.unet, DenoiseInputs(
        latents=start, timesteps=timesteps, scheduler=scheduler, conditioning=conditioning,
        cfg_scale=request.cfg_scale, generators=generators, steps=real, add_time_ids=add_time_ids,
        inpaint=inpaint, patches=patches, size=(width, height), pass_index=1,
        step_cache_interval=step_cache_interval, switch=switch), on_step)


def _family_hires_pass(request: GenerationRequest, model: LoadedModel, init: torch.Tensor, conditioning,
                       noise: torch.Tensor, on_step: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """The hires pass of a family with its own loop (Flux.1, SD 3.5): its img2img from ``init`` at the hires size,
    on a schedule long enough that ``denoising_strength`` leaves the hires pass's real steps."""
    width, height = request.hires_size
    sample = model.spec.sample
    if sample is None:
        raise RuntimeError(f"{model.spec.label} has no sampling loop of its own")
    steps = flow_img2img.schedule_for(hires_steps(request)[1], request.denoising_strength)
    second = request.model_copy(update={
        "steps": steps, "width": width, "height": height,
        "sampler_name": request.hr_sampler_name or request.sampler_name,
        "scheduler": request.hr_scheduler or request.scheduler})
    return sample(model, noise, conditioning, second, on_step, SourceLatents(init, init, noise))


def switches_model(request: GenerationRequest, first: ModelFile, hires: ModelFile | None) -> bool:
    """Whether the hires pass redraws on another checkpoint (``hires``) than the first pass's (``first``)."""
    return request.enable_hr and hires is not None and hires.title != first.title and not upscale_only(request)


def encode_hires_prompts(request: GenerationRequest, model: LoadedModel, encode_prompts: list[str],
                         encode_negative_prompts: list[str], embeddings: EmbeddingDatabase | None) -> Conditioning:
    """The hires pass's conditioning (hr_prompt / hr_negative_prompt, else the job's prompts as the encoder
    sees them) by ``model``'s text encoders."""
    hr_prompts = [extract_extra_networks(request.hr_prompt)[0] or p for p in encode_prompts]
    hr_negatives = [extract_extra_networks(request.hr_negative_prompt)[0] or n for n in encode_negative_prompts]
    if model.spec.encode is not None:  # a family with its own text encoders (Flux.1, SD 3.5)
        with torch.inference_mode():
            return model.spec.encode(model, hr_prompts[: request.batch_size], hr_negatives[: request.batch_size],
                                     max(hires_steps(request)[1], 1), request)[0]
    encoder = PromptEncoder.from_pipeline(model.pipe, embeddings=embeddings)
    with torch.inference_mode():
        return build_conditioning(encoder, hr_prompts[: request.batch_size], hr_negatives[: request.batch_size],
                                  max(hires_steps(request)[1], 1), request.clip_skip)


@dataclass
class HiresInputs:
    """Everything the hires fix of one batch needs (see :func:`run_hires_pass`)."""

    request: GenerationRequest
    #: The first pass's model and its final latents.
    model: LoadedModel
    latents: torch.Tensor
    generators: list[torch.Generator]
    subseeds: list[int]
    upscalers: Any
    reporter: StepReporter
    device: torch.device
    #: The hires prompts encoded by the first pass's model; None: encode them on the hires model.
    conditioning: Conditioning | None
    #: The job's prompts as the text encoder sees them (for encoding on the hires checkpoint).
    encode_prompts: list[str] = field(default_factory=list)
    encode_negative_prompts: list[str] = field(default_factory=list)
    embeddings: EmbeddingDatabase | None = None
    #: Loads the hires checkpoint (with the job's extra networks and tiling); None: the pass runs on ``model``.
    load_hires_model: Callable[[], LoadedModel] | None = None
    patches: Sequence[UnetPatch] = ()
    step_cache_interval: int = 0
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    #: The refiner's switch for this pass, given the hires model (None: no refiner in this pass).
    refiner_switch: Callable[[LoadedModel], ModelSwitch | None] | None = None
    #: The refiner's aesthetic scores (negative prompt, prompt), for a hires model that is an SDXL refiner.
    aesthetic_scores: tuple[float, float] = (2.5, 6.0)


@dataclass(frozen=True)
class HiresOutput:
    """What the hires fix made: latents for ``model``'s VAE to decode, or (upscale only) the final images."""

    model: LoadedModel
    latents: torch.Tensor | None = None
    images: list[Image.Image] | None = None


def run_hires_pass(inputs: HiresInputs) -> HiresOutput:
    """The hires fix of one batch, in one place: upscale the first pass (switching to the hires checkpoint
    when there is one), encode the hires prompts on that checkpoint if needed, and redraw.

    An image upscaler at denoising strength 0 only upscales: the upscaler's pixels are the result, with no
    VAE round trip (the one-click "generate, then upscale to an exact size" path).
    """
    request, reporter = inputs.request, inputs.reporter
    control = reporter.control
    if upscale_only(request):
        reporter.check()
        control.update(step=0, textinfo="Hires. fix: upscaling")
        decoded, upcast = latent_ops.decode(inputs.model.vae, inputs.latents, allow_upcast=not inputs.model.vae_upcast)
        if upcast:
            inputs.model.vae_upcast = True
        images = [inputs.upscalers.upscale(image, request.hr_upscaler, size=request.hires_size, crop=True,
                                           tile=inputs.tile, overlap=inputs.overlap, should_stop=reporter.check,
                                           on_progress=reporter.tile_progress)
                  for image in latent_ops.tensor_to_pil(decoded)]
        return HiresOutput(model=inputs.model, images=images)
    control.update(step=0, textinfo="Hires. fix")
    # From here on only the hires model is used: with a checkpoint cache of 1 the first one is gone.
    model, init = upscale_first_pass(request, inputs.model, inputs.latents, generators=inputs.generators,
                                     upscalers=inputs.upscalers, switch_model=inputs.load_hires_model,
                                     tile=inputs.tile, overlap=inputs.overlap, should_stop=reporter.check,
                                     on_progress=reporter.tile_progress)
    conditioning = inputs.conditioning
    if conditioning is None:
        conditioning = encode_hires_prompts(request, model, inputs.encode_prompts, inputs.encode_negative_prompts,
                                            inputs.embeddings)
        reporter.use_model(model)
    reporter.check()
    control.update(step=0, steps=max(hires_steps(request)[1], 1))
    generators, subseeds = inputs.generators, inputs.subseeds
    try:
        latents = hires_pass(
            request, model, init, conditioning=conditioning, generators=generators,
            make_noise=lambda shape: torch.stack([image_noise(g, shape, subseed=sub,
                                                              subseed_strength=request.subseed_strength)
                                                  for g, sub in zip(generators, subseeds)]),
            on_step=reporter.step, device=inputs.device, patches=inputs.patches,
            step_cache_interval=inputs.step_cache_interval,
            switch=inputs.refiner_switch(model) if inputs.refiner_switch is not None else None,
            aesthetic_scores=inputs.aesthetic_scores)
    except JobStopped as stop:
        if stop.latents is not None:  # latents of the hires model: its VAE decodes them
            stop.model = model
        raise
    return HiresOutput(model=model, latents=latents)
