"""The refiner (docs/compatibility.md §13): a second checkpoint takes over a denoising run part way through.

A1111's rule, kept here: before every UNet call the share of the run already done is read from the timestep
of that call, ``(999 - t) / 1000``; from the first call at which it reaches ``refiner_switch_at`` the refiner's
UNet runs, on the prompts as the refiner's text encoders encode them. The scheduler, the latents and the noise
generators carry on unchanged, so the sampler continues on the same sigma schedule (a multistep sampler keeps
its history). At 0.8 the refiner runs the timesteps below 200, as diffusers' ``denoising_end`` /
``denoising_start`` split a run; at 1.0 it never takes over.

With the Hires. fix the ``hires_fix_refiner_pass`` option (A1111's) picks the pass(es) the refiner takes over:
"second pass" (the default), "first pass" or "both passes"; each pass starts on its own checkpoint (the job's,
or the hires one), and a new batch starts on the job's checkpoint again.

An SDXL refiner is conditioned on an aesthetic score instead of the target size: its ``add_time_ids`` are
(height, width, crop top, crop left, score), with A1111's ``sdxl_refiner_high_aesthetic_score`` (6.0) for the
prompt and ``sdxl_refiner_low_aesthetic_score`` (2.5) for the negative prompt, as diffusers' refiner pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipelines.models.manager import LoadedModel

#: The values of the ``hires_fix_refiner_pass`` option, and the default A1111 leaves out of the infotext.
HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")
DEFAULT_HIRES_REFINER_PASS = "second pass"


def completed_ratio(timestep: float) -> float:
    """How much of a run is done at ``timestep``, as A1111 reads it from the nearest of the 1000 timesteps."""
    return (999 - round(timestep)) / 1000


def switch_due(switch_at: float) -> Callable[[float], bool]:
    """Whether the refiner takes over at a UNet call made at a timestep (:class:`~denoise.ModelSwitch.due`)."""
    return lambda timestep: completed_ratio(timestep) >= switch_at


def refined_passes(enable_hr: bool, hires_fix_refiner_pass: str) -> tuple[bool, bool]:
    """(first pass, hires pass): which passes of a job the refiner takes over."""
    if not enable_hr:
        return True, False
    if hires_fix_refiner_pass not in HIRES_REFINER_PASSES:
        raise ValueError(f"hires_fix_refiner_pass: one of {', '.join(HIRES_REFINER_PASSES)}, "
                         f"got {hires_fix_refiner_pass!r}")
    return hires_fix_refiner_pass != "second pass", hires_fix_refiner_pass != "first pass"


def add_time_ids(model: LoadedModel, width: int, height: int,
                 aesthetic_scores: tuple[float, float] = (2.5, 6.0)) -> torch.Tensor | None:
    """An SDXL model's micro-conditioning for a ``width`` x ``height`` image, None for SD 1.x / 2.x.

    The SDXL base gets (1, 6): original size, crop (0, 0), target size. A refiner gets (2, 5): original size,
    crop, then the aesthetic score, the negative prompt's row (``aesthetic_scores[0]``) first.
    """
    if not model.is_sdxl:
        return None
    if model.family.refiner:
        low, high = aesthetic_scores
        return torch.tensor([[height, width, 0, 0, low], [height, width, 0, 0, high]], dtype=torch.float32)
    return torch.tensor([[height, width, 0, 0, height, width]])


def latent_space(model: LoadedModel) -> tuple[object, ...]:
    """What latents of ``model`` mean: SD 1.x and 2.x share one latent space, SDXL (refiner included) has its own."""
    config = model.vae.config
    return model.is_sdxl, config.latent_channels, config.scaling_factor, getattr(config, "shift_factor", None)


def refiner_title(model: LoadedModel) -> str:
    """The infotext's ``Refiner`` value: A1111's short title, "name [short hash]"."""
    return f"{model.file.model_name} [{model.file.short_hash}]"
