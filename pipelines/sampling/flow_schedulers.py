"""Samplers and schedule types of the flow-matching families (Flux.1, SD 3.5), with A1111's names.

The UNet families' sampler table (:mod:`pipelines.sampling.samplers`) maps names to schedulers for noise
prediction; a flow-matching model needs each scheduler's flow mode instead: ``FlowMatchEulerDiscreteScheduler``
for "Euler", and the flow sigmas (``use_flow_sigmas``, ``flow_shift``, ``prediction_type="flow_prediction"``) of
``DPMSolverMultistepScheduler`` ("DPM++ 2M") and ``UniPCMultistepScheduler`` ("UniPC"). Only Euler shifts its
sigmas before converting them to Karras / Exponential / Beta; the multistep classes convert their own noise
schedule, so they run the Simple schedule alone.

The timesteps are set as diffusers' pipelines set them, so that a job gives their pixels: Flux.1 passes the sigmas
``linspace(1, 1/steps)`` (not to the flow-sigma classes, which space their own) and, for dev, the
resolution-dependent ``mu``; SD 3.5 lets the scheduler space them. ``shift`` (the request's Shift) replaces the
model's: a fixed shift, also for Flux.1 dev instead of its dynamic one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from pipelines.sampling.samplers import SCHEDULE_TYPES


@dataclass(frozen=True)
class FlowSampler:
    """One flow-matching sampler: the diffusers class, the options that put it in flow mode, its schedule types."""

    name: str
    scheduler_class: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = ("Simple",)

    @property
    def flow_sigmas(self) -> bool:
        """Whether the class spaces its own flow sigmas (and takes ``flow_shift``, not ``shift``)."""
        return bool(self.kwargs.get("use_flow_sigmas"))


_FLOW_OPTIONS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

FLOW_SAMPLERS: dict[str, FlowSampler] = {s.name: s for s in (
    FlowSampler("Euler", "FlowMatchEulerDiscreteScheduler", {}, ("Simple", "Karras", "Exponential", "Beta")),
    FlowSampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **_FLOW_OPTIONS}),
    FlowSampler("UniPC", "UniPCMultistepScheduler", _FLOW_OPTIONS),
)}
#: The sampler names a flow family declares (``Family.samplers``), Euler (the models' own) first.
FLOW_SAMPLER_NAMES: tuple[str, ...] = tuple(FLOW_SAMPLERS)
#: Every schedule type some flow sampler runs (``Family.schedules``), Simple (the models' own) first.
FLOW_SCHEDULES: tuple[str, ...] = FLOW_SAMPLERS["Euler"].schedules


def fitting_flow_schedule(sampler_name: str, schedule: str) -> tuple[str, str | None]:
    """The schedule type ``sampler_name`` runs for ``schedule`` on a flow model, and a warning when it differs
    (the sampler's own Simple instead of one it cannot run)."""
    sampler = FLOW_SAMPLERS.get(sampler_name)
    allowed = sampler.schedules if sampler else ("Simple",)
    if schedule in allowed:
        return schedule, None
    return "Simple", f"{sampler_name} cannot use the {schedule} schedule on this model; it ran with Simple " \
                     f"(its schedules: {', '.join(allowed)})"


def _config(sampler: FlowSampler, schedule: str, base_config: Mapping[str, Any], shift: float | None
            ) -> tuple[dict[str, Any], bool]:
    """The scheduler config for ``sampler`` on a model whose (FlowMatchEuler) config is ``base_config``, and
    whether the shift is the resolution-dependent one (``mu`` then goes to ``set_timesteps``)."""
    config = {key: value for key, value in base_config.items() if not key.startswith("_")}
    dynamic = bool(config.get("use_dynamic_shifting")) and not shift
    config["use_dynamic_shifting"] = dynamic
    if shift:
        config["shift"] = shift
    if sampler.flow_sigmas:
        config["flow_shift"] = config.get("shift", 1.0)
    config.update(sampler.kwargs)
    config.update(SCHEDULE_TYPES[schedule].config or {})
    return config, dynamic


def flow_scheduler(sampler_name: str, schedule: str, base_config: Mapping[str, Any], *, shift: float | None,
                   image_seq_len: int, steps: int, device: torch.device | str,
                   sigmas: Sequence[float] | np.ndarray | None = None) -> tuple[Any, torch.Tensor]:
    """A fresh scheduler for ``sampler_name`` and ``schedule`` with its timesteps set for ``steps`` steps.

    ``base_config`` is the model's scheduler config; ``shift`` (None or 0: the model's own) overrides its shift;
    ``image_seq_len`` (latent tokens) gives the dynamic shift of models that use one (Flux.1 dev); ``sigmas`` are
    the custom unshifted sigmas of the family's pipeline (Flux.1's), None for the scheduler's own spacing.
    """
    sampler = FLOW_SAMPLERS.get(sampler_name)
    if sampler is None:
        raise ValueError(f"sampler_name: {sampler_name!r} does not run on flow-matching models; choose one of "
                         f"{', '.join(FLOW_SAMPLER_NAMES)}")
    if schedule not in sampler.schedules:
        raise ValueError(f"scheduler: {sampler_name} runs the schedule types {', '.join(sampler.schedules)} on "
                         f"flow-matching models, not {schedule!r}")
    config, dynamic = _config(sampler, schedule, base_config, shift)
    scheduler = getattr(diffusers, sampler.scheduler_class).from_config(config)
    options: dict[str, Any] = {}
    if dynamic:
        options["mu"] = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                        config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                        config.get("max_shift", 1.15))
    if sigmas is not None and not sampler.flow_sigmas:
        options["sigmas"] = list(sigmas)
    else:
        options["num_inference_steps"] = steps
    scheduler.set_timesteps(device=device, **options)
    scheduler.set_begin_index(0)
    return scheduler, scheduler.timesteps
