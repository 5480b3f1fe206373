"""img2img, inpaint and the hires pass of the flow-matching families (Flux.1, SD 3.5), as diffusers'
``FluxImg2ImgPipeline`` / ``FluxInpaintPipeline`` and ``StableDiffusion3Img2ImgPipeline`` /
``StableDiffusion3InpaintPipeline`` run them:

- the strength keeps the last part of the schedule, by those pipelines' rule (:func:`real_steps`; it rounds
  ``steps * strength`` up where the UNet img2img of A1111 rounds it down);
- the source latents are noised to the first kept timestep with the flow-matching forward process
  (``sigma * noise + (1 - sigma) * source``, what ``FlowMatchEulerDiscreteScheduler.scale_noise`` does, written
  here from the scheduler's sigmas so that every flow sampler, DPM++ 2M and UniPC too, runs it);
- inpaint: after every step the part outside the mask is replaced by the source noised to the next timestep
  (:meth:`FlowStart.keep_unmasked`).

The families' own loops (``flux.sample``, ``sd3.sample``) use :class:`FlowStart`; the source latents come from
:func:`pipelines.sampling.img2img.encode_source` (img2img, inpaint) or the upscaled first pass (hires fix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipelines.sampling.img2img import SourceLatents


def _first_step(steps: int, strength: float) -> int:
    """The index of the first timestep an img2img run keeps (diffusers' flow pipelines' ``get_timesteps``)."""
    return int(max(steps - min(steps * strength, steps), 0))


def real_steps(steps: int, strength: float) -> int:
    """How many steps of a ``steps``-step schedule a flow img2img run at ``strength`` really runs."""
    return steps - _first_step(steps, strength)


def schedule_for(real: int, strength: float) -> int:
    """The shortest schedule whose img2img part at ``strength`` runs ``real`` steps (the hires pass's
    ``hr_second_pass_steps``); at strength 0 nothing runs whatever the length."""
    steps = max(real, 1)
    if strength <= 0:
        return steps
    while real_steps(steps, strength) < real:  # grows by at most one per step: stops at exactly ``real``
        steps += 1
    return steps


class FlowStart:
    """Where a flow-matching loop starts, and what inpaint keeps after each step.

    Without ``source`` (txt2img) the loop runs every timestep from ``noise``. With it, only the timesteps the
    strength leaves run, from the source noised to the first of them; with ``source.mask`` the part outside the
    mask follows the source. Tensors are (B, C, h, w); a packing family packs ``latents`` itself.
    """

    def __init__(self, scheduler, timesteps: torch.Tensor, noise: torch.Tensor, source: SourceLatents | None,
                 strength: float):
        self.scheduler = scheduler
        self.noise = noise
        self.timesteps = timesteps
        self.latents = noise
        self.first = 0
        self.image_latents = self.mask = None
        if source is None:
            return
        first = _first_step(len(timesteps) // scheduler.order, strength) * scheduler.order
        self.first = first
        self.timesteps = timesteps[first:]
        scheduler.set_begin_index(first)
        init = source.init.to(device=noise.device, dtype=noise.dtype)
        self.latents = self.noised(init, first) if len(self.timesteps) else init
        if source.mask is not None:
            self.image_latents = source.image_latents.to(device=noise.device, dtype=noise.dtype)
            self.mask = source.mask.to(device=noise.device, dtype=noise.dtype)

    def noised(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """``latents`` noised to the scheduler's sigma number ``index``: ``sigma * noise + (1 - sigma) * latents``."""
        sigma = self.scheduler.sigmas[index].to(device=latents.device, dtype=latents.dtype)
        return sigma * self.noise + (1.0 - sigma) * latents

    @property
    def inpaint(self) -> bool:
        return self.mask is not None

    def keep_unmasked(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """After step ``step``: outside the mask, the source noised to the next timestep (at the last step, the
        source itself)."""
        if self.mask is None or self.image_latents is None:
            return latents
        kept = self.image_latents
        if step < len(self.timesteps) - 1:
            kept = self.noised(kept, self.first + step + 1)
        return (1 - self.mask) * kept + self.mask * latents
