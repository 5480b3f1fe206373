"""The denoising loop, shared by txt2img, img2img and inpaint, for SD 1.x, 2.x and SDXL.

Why our own loop rather than calling the diffusers pipelines: the conditioning changes during sampling
(prompt editing), every image keeps its own noise generator (seed k of a batch equals a single run),
inpainting needs A1111's masked-content modes, and interrupt/skip/preview hook into every step. The math
is diffusers': same scheduler calls, same classifier-free guidance, same UNet inputs; a test checks that
the images equal plain diffusers pipelines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipelines.job_control import JobStopped
from pipelines.plugins.scripts import UnetCall, UnetPatch, combined_residuals
from pipelines.sampling.k_samplers import KDiffusionScheduler, Prediction
from pipelines.sampling.seeds import step_noise
from pipelines.sampling.step_cache import unet_runner

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


class StepConditioningLike(Protocol):
    """The conditioning of one sampling step (read-only: :class:`pipelines.prompts.encoding.StepConditioning`)."""

    @property
    def cond(self) -> torch.Tensor: ...
    @property
    def uncond(self) -> torch.Tensor: ...
    @property
    def pooled(self) -> torch.Tensor | None: ...
    @property
    def uncond_pooled(self) -> torch.Tensor | None: ...


class ConditioningLike(Protocol):
    def at_step(self, step: int) -> StepConditioningLike: ...


@dataclass
class InpaintLatents:
    """What inpainting adds to a denoising run, all at latent size."""

    mask: torch.Tensor  # (B, 1, h, w), 1 = redraw
    image_latents: torch.Tensor  # (B, 4, h, w): the original, kept outside the mask
    noise: torch.Tensor  # the initial noise, to re-noise the original at each step
    masked_image_latents: torch.Tensor | None = None  # for 9-channel inpainting UNets


@dataclass
class SwitchTarget:
    """The model a run switches to (the refiner): its UNet, its conditioning (same step numbering) and its
    SDXL ``add_time_ids`` ((1, k), or (2, k): the uncond row, then the cond row)."""

    unet: Any
    conditioning: ConditioningLike
    add_time_ids: torch.Tensor | None = None


@dataclass
class ModelSwitch:
    """Hand the rest of a run to another model from the first UNet call at which ``due(timestep)`` holds
    (:func:`pipelines.sampling.refiner.switch_due`); ``load`` is called once, then. The scheduler, the latents
    and the noise generators carry on: the sampler continues on the same sigma schedule."""

    due: Callable[[float], bool]
    load: Callable[[], SwitchTarget]


@dataclass
class DenoiseInputs:
    """Everything one denoising run needs; the latents are already noised for the first timestep."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: SchedulerMixin
    conditioning: ConditioningLike
    cfg_scale: float
    generators: list[torch.Generator]
    #: Sampling steps the user sees (a 2nd-order sampler makes two UNet calls per step).
    steps: int
    add_time_ids: torch.Tensor | None = None  # SDXL micro-conditioning, (1, 6)
    inpaint: InpaintLatents | None = None
    #: Always-on scripts' additions to every UNet call (ControlNet residuals), for this run only.
    patches: Sequence[UnetPatch] = ()
    #: Size in pixels of the image being made, and which pass this is (0 first, 1 hires): for the patches.
    size: tuple[int, int] = (0, 0)
    pass_index: int = 0
    #: Opt-in step caching (:mod:`pipelines.sampling.step_cache`): the whole UNet runs every this many calls;
    #: 0 = always.
    step_cache_interval: int = 0
    #: The refiner's switch, or None. After it, the always-on scripts' patches (made for the first UNet) stop.
    switch: ModelSwitch | None = None


StepHook = Callable[[int, torch.Tensor], None]


def _unet_conditioning(cond: StepConditioningLike, batch: int, use_cfg: bool, add_time_ids, device,
                       dtype) -> tuple[torch.Tensor, dict[str, Any]]:
    embeds = torch.cat([cond.uncond, cond.cond]) if use_cfg else cond.cond
    kwargs: dict[str, Any] = {}
    if add_time_ids is not None:
        wanted = [cond.uncond_pooled, cond.pooled] if use_cfg else [cond.pooled]
        parts = [tensor for tensor in wanted if tensor is not None]
        if len(parts) != len(wanted):
            raise ValueError("SDXL conditioning (add_time_ids) needs the pooled prompt embeddings")
        pooled = torch.cat(parts) if use_cfg else parts[0]
        time_ids = _time_ids(add_time_ids, batch, use_cfg).to(device=device, dtype=dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids}
    return embeds.to(device=device, dtype=dtype), kwargs


def _time_ids(add_time_ids: torch.Tensor, batch: int, use_cfg: bool) -> torch.Tensor:
    """One row per UNet input: (1, k) ids serve every row; (2, k) ids give the uncond rows the first and the
    cond rows the second (the refiner's two aesthetic scores)."""
    uncond, cond = add_time_ids[:1], add_time_ids[-1:]
    rows = [uncond.repeat(batch, 1), cond.repeat(batch, 1)] if use_cfg else [cond.repeat(batch, 1)]
    return torch.cat(rows)


def denoise(unet, inputs: DenoiseInputs, on_step: StepHook) -> torch.Tensor:
    """Run the sampler over ``inputs.timesteps``; returns the final latents.

    ``on_step(step, latents)`` runs before every UNet call with the user-visible step number; it may raise
    :class:`~pipelines.job_control.JobStopped` to stop (interrupt / skip) and it makes previews. The raised
    exception then carries the latents to decode: the scheduler's estimate of the finished latents at the
    last step (A1111's ``denoised``), or the current latents when it gives none.
    """
    scheduler = inputs.scheduler
    latents = inputs.latents
    device, dtype = latents.device, unet.dtype
    use_cfg = inputs.cfg_scale > 1.0
    batch = latents.shape[0]
    order = getattr(scheduler, "order", 1)
    inpaint = inputs.inpaint
    own_sampler = isinstance(scheduler, KDiffusionScheduler)
    calls = scheduler.expected_calls() if own_sampler else len(inputs.timesteps)
    call_unet = unet_runner(unet, inputs.step_cache_interval, calls)
    cfg_scale = inputs.cfg_scale * getattr(scheduler, "cfg_scale_multiplier", 1.0)
    current: StepConditioningLike | None = None
    # What the refiner switch replaces: the UNet's runner, conditioning, time ids, patches, inpainting input.
    conditioning, add_time_ids, patches = inputs.conditioning, inputs.add_time_ids, inputs.patches
    switch = inputs.switch
    takes_mask = _takes_mask(unet, inpaint)
    # Set at the first call (no conditioning is None), then whenever prompt editing changes it.
    embeds: torch.Tensor
    cond_kwargs: dict[str, Any]

    def predict(index: int, step: int, latents: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's guided prediction for ``latents`` at timestep ``t``, and the unguided one."""
        nonlocal current, embeds, cond_kwargs, call_unet, conditioning, add_time_ids, patches, switch, takes_mask
        if switch is not None and switch.due(float(t)):
            target = switch.load()
            switch, current = None, None
            call_unet = _from_call(unet_runner(target.unet, inputs.step_cache_interval, calls - index), index)
            conditioning, add_time_ids, patches = target.conditioning, target.add_time_ids, ()
            takes_mask = _takes_mask(target.unet, inpaint)
        cond = conditioning.at_step(step)
        if cond is not current:  # prompt editing: new embeddings from this step on
            embeds, cond_kwargs = _unet_conditioning(cond, batch, use_cfg, add_time_ids, device, dtype)
            current = cond
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        unet_kwargs = dict(cond_kwargs)
        if patches:
            unet_kwargs.update(combined_residuals(patches, UnetCall(
                step=step, steps=inputs.steps, timestep=t, sample=model_input, encoder_hidden_states=embeds,
                added_cond_kwargs=cond_kwargs.get("added_cond_kwargs"), cfg=use_cfg, width=inputs.size[0],
                height=inputs.size[1], pass_index=inputs.pass_index)))
        if takes_mask and inpaint is not None and inpaint.masked_image_latents is not None:
            extra = torch.cat([inpaint.mask, inpaint.masked_image_latents], dim=1)
            model_input = torch.cat([model_input, torch.cat([extra] * 2) if use_cfg else extra], dim=1)
        noise_pred = call_unet(index, model_input, t, embeds, unet_kwargs)
        if not use_cfg:
            return noise_pred, noise_pred
        uncond, text = noise_pred.chunk(2)
        return uncond + cfg_scale * (text - uncond), uncond

    def blends() -> bool:
        """A plain UNet does not know the mask: the original is kept outside it (after a switch, too)."""
        return inpaint is not None and not takes_mask

    if own_sampler:
        return _sample_own(scheduler, inputs, on_step, predict, blends)

    step_kwargs: dict[str, object] = {"generator": inputs.generators} if _accepts_generator(scheduler) else {}
    own_noise = _takes_step_noise(scheduler)
    denoised: torch.Tensor | None = None
    for i, t in enumerate(inputs.timesteps):
        step = min(i // order, inputs.steps - 1)
        _report_step(on_step, step, latents, denoised)
        noise_pred, _ = predict(i, step, latents, t)
        if own_noise:
            step_kwargs["variance_noise"] = step_noise(inputs.generators, tuple(noise_pred.shape), device)
        output = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)
        latents, denoised = output[0], _denoised_estimate(scheduler, output)
        if inpaint is not None and blends():
            # A plain UNet does not know the mask: keep the original, noised to the next timestep, outside it.
            original = inpaint.image_latents
            if i < len(inputs.timesteps) - 1:
                original = scheduler.add_noise(original, inpaint.noise, inputs.timesteps[i + 1 : i + 2])
            latents = (1 - inpaint.mask) * original + inpaint.mask * latents
            if denoised is not None:
                denoised = (1 - inpaint.mask) * inpaint.image_latents + inpaint.mask * denoised
    return latents


def _report_step(on_step: StepHook, step: int, latents: torch.Tensor, denoised: torch.Tensor | None) -> None:
    """Report ``step``; when the job is interrupted or skipped there, hand the stop the best estimate of the
    finished image so far (the last denoised prediction, else the current latents) to decode."""
    try:
        on_step(step, latents)
    except JobStopped as stop:
        if stop.latents is None:
            stop.latents = denoised if denoised is not None else latents
        raise


def _from_call(runner: Callable[..., torch.Tensor], first: int) -> Callable[..., torch.Tensor]:
    """``runner`` (a new UNet's, see :func:`unet_runner`) counting its calls from call ``first`` of the run."""
    return lambda index, *args: runner(index - first, *args)


def _takes_mask(unet, inpaint: InpaintLatents | None) -> bool:
    """Whether ``unet`` is an inpainting UNet given the mask and masked image as extra input channels."""
    in_channels = getattr(getattr(unet, "config", None), "in_channels", 9)
    return inpaint is not None and inpaint.masked_image_latents is not None and in_channels == 9


def _sample_own(scheduler: KDiffusionScheduler, inputs: DenoiseInputs, on_step: StepHook,
                predict: Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                blends: Callable[[], bool]) -> torch.Tensor:
    """Run one of our samplers (:mod:`pipelines.sampling.k_samplers`): it calls the model as often as its
    algorithm needs, and every call reports progress (and may be interrupted) through ``on_step``.

    As A1111 does for these samplers, a plain UNet's inpainting keeps the original outside the mask in each
    denoised estimate rather than in the latents."""
    latents = inputs.latents
    device = latents.device
    inpaint = inputs.inpaint
    calls = 0
    last_denoised: torch.Tensor | None = None

    def model(x: torch.Tensor, sigma: float, step: int) -> Prediction:
        nonlocal calls, last_denoised
        step = max(0, min(step, inputs.steps - 1))
        _report_step(on_step, step, x, last_denoised)
        t = torch.tensor(scheduler.timestep_of(sigma), device=device, dtype=torch.float32)
        guided, uncond = predict(calls, step, x, t)
        calls += 1
        denoised = scheduler.denoised(x, sigma, guided.to(x.dtype))
        denoised_uncond = denoised if uncond is guided else scheduler.denoised(x, sigma, uncond.to(x.dtype))
        if inpaint is not None and blends():
            keep = 1 - inpaint.mask
            denoised = keep * inpaint.image_latents + inpaint.mask * denoised
            denoised_uncond = keep * inpaint.image_latents + inpaint.mask * denoised_uncond
        last_denoised = denoised
        return Prediction(denoised, denoised_uncond)

    def noise() -> torch.Tensor:
        return step_noise(inputs.generators, tuple(latents.shape), device).to(latents.dtype)

    return scheduler.sample(model, latents, noise)


def _denoised_estimate(scheduler, output: tuple) -> torch.Tensor | None:
    """The scheduler's estimate of the finished latents after a step: the ``pred_original_sample`` most
    schedulers return, or the data prediction the DPM-Solver++ / UniPC multistep schedulers keep; None when
    it has neither."""
    if len(output) > 1 and isinstance(output[1], torch.Tensor) and output[1].shape == output[0].shape:
        return output[1]
    config = scheduler.config
    predicts_data = str(getattr(config, "algorithm_type", "")).endswith("dpmsolver++") or (
        getattr(config, "predict_x0", False) is True)
    kept = getattr(scheduler, "model_outputs", None)
    if predicts_data and kept and isinstance(kept[-1], torch.Tensor) and kept[-1].shape == output[0].shape:
        return kept[-1]
    return None


def _accepts_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def _takes_step_noise(scheduler) -> bool:
    """Whether we hand the scheduler its per-step noise (the SDE DPM++ samplers take it as ``variance_noise``):
    the same values it would draw from the generators, without its blocking CPU-to-GPU copy. The ancestral
    samplers (Euler a, DPM2 a, LCM) take no such argument and still draw and copy it themselves."""
    sde = getattr(scheduler.config, "algorithm_type", None) in ("sde-dpmsolver", "sde-dpmsolver++")
    return sde and "variance_noise" in inspect.signature(scheduler.step).parameters


def img2img_timesteps(scheduler, steps: int, strength: float, device) -> tuple[torch.Tensor, int]:
    """Timesteps of an img2img run: the last ``int(steps * strength)`` of a ``steps``-step schedule,
    as diffusers and A1111 both do. Returns (timesteps, real steps)."""
    scheduler.set_timesteps(steps, device=device)
    real = min(int(steps * strength), steps)
    start = max(steps - real, 0)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps, real


def txt2img_timesteps(scheduler, steps: int, device) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler.timesteps

