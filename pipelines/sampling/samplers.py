"""Sampler and schedule-type names users know from A1111, mapped to diffusers schedulers (docs/compatibility.md §5)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers


@dataclass(frozen=True)
class Sampler:
    """One entry of the Sampling method dropdown."""

    name: str
    scheduler_class: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    default_schedule: str = "Uniform"
    aliases: tuple[str, ...] = ()

    @property
    def cls(self) -> type[Any]:
        return getattr(diffusers, self.scheduler_class)

    @property
    def schedule_types(self) -> tuple[str, ...]:
        """Schedule types this sampler can run, "Automatic" first."""
        accepted = inspect.signature(self.cls.__init__).parameters
        return ("Automatic",) + tuple(
            name for name, overrides in SCHEDULE_TYPES.items() if all(key in accepted for key in overrides)
        )


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "Karras",
                ("k_dpmpp_2m",)),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, "Karras", ("k_dpmpp_sde",)),
        Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "Uniform",
                ("k_dpmpp_2m_sde",)),
        Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "Uniform", ("k_dpmpp_3m_sde",)),
        Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, "Uniform", ("k_euler_a", "k_euler_ancestral")),
        Sampler("Euler", "EulerDiscreteScheduler", {}, "Uniform", ("k_euler",)),
        Sampler("LMS", "LMSDiscreteScheduler", {}, "Uniform", ("k_lms",)),
        Sampler("Heun", "HeunDiscreteScheduler", {}, "Uniform", ("k_heun",)),
        Sampler("DPM2", "KDPM2DiscreteScheduler", {}, "Karras", ("k_dpm_2",)),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "Karras", ("k_dpm_2_a",)),
        Sampler("DDIM", "DDIMScheduler", {}, "Uniform", ("ddim",)),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, "Uniform", ("plms",)),
        Sampler("UniPC", "UniPCMultistepScheduler", {}, "Uniform", ("unipc",)),
        Sampler("LCM", "LCMScheduler", {}, "Uniform", ("lcm",)),
    )
}

#: Schedule types and the scheduler config overrides that select them. "Automatic" means the
#: sampler's own default schedule; "Uniform" resets the sigma options to the model's spacing.
SCHEDULE_TYPES: dict[str, Mapping[str, Any]] = {
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Beta": {"use_beta_sigmas": True},
}

SCHEDULE_NAMES: tuple[str, ...] = ("Automatic", *SCHEDULE_TYPES)

_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def find_sampler(name: str) -> Sampler:
    """The sampler called ``name`` or one of its aliases; ValueError lists the valid names."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    for sampler in SAMPLERS.values():
        if name in sampler.aliases:
            return sampler
    raise ValueError(f"sampler_name: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def resolve_schedule(sampler: Sampler, schedule: str) -> str:
    """The concrete schedule type for ``schedule`` ("Automatic" becomes the sampler's default).

    A schedule the sampler's diffusers class cannot run is an error, not a silent fallback.
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"scheduler: unknown schedule type {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    allowed = sampler.schedule_types
    if schedule not in allowed:
        raise ValueError(
            f"scheduler: {sampler.name} cannot use the {schedule} schedule; choose one of {', '.join(allowed)}"
        )
    if schedule == "Automatic":
        return sampler.default_schedule if sampler.default_schedule in allowed else "Uniform"
    return schedule


def fitting_schedule(sampler_name: str, schedule: str) -> tuple[str, str | None]:
    """The schedule type ``sampler_name`` runs with when ``schedule`` is asked for, and a warning if it differs.

    A1111's samplers take every schedule type; some diffusers classes cannot (Euler a has no Karras sigmas).
    Such a request, e.g. from a pasted A1111 infotext or an old script, runs with the sampler's own default
    schedule rather than failing; the caller reports the warning and records the schedule actually used.
    """
    sampler = find_sampler(sampler_name)
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"scheduler: unknown schedule type {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if schedule in sampler.schedule_types:
        return schedule, None
    used = resolve_schedule(sampler, "Automatic")
    return "Automatic", (f"{sampler.name} cannot use the {schedule} schedule; it ran with {used} "
                         f"(its schedules: {', '.join(sampler.schedule_types)})")


def build_scheduler(sampler_name: str, schedule: str, model_config: Mapping[str, Any], *,
                    seeds: Sequence[int] | None = None):
    """A fresh diffusers scheduler for this sampler and schedule, from the model's own scheduler config.

    The model config keeps ``prediction_type`` (v-prediction for SD 2.x 768 models), beta schedule and
    timestep spacing; only the sampler's and schedule's keys are overridden. Keys the class does not accept
    are dropped by diffusers' ``from_config``. ``seeds`` (one per image of the batch) seed samplers that have
    their own noise source (DPM++ SDE's Brownian tree, one tree per image), so that a seed fixes the image and
    image k of a batch equals a single run with its seed.
    """
    sampler = find_sampler(sampler_name)
    schedule = resolve_schedule(sampler, schedule)
    # Private keys go too: diffusers' "_use_default_values" would make it ignore our timestep_spacing.
    config = {k: v for k, v in dict(model_config).items() if k not in _SIGMA_OPTIONS and not k.startswith("_")}
    config.update(sampler.kwargs)
    config.update(SCHEDULE_TYPES[schedule])
    accepted = inspect.signature(sampler.cls.__init__).parameters
    if "noise_sampler_seed" in accepted and seeds is not None:
        config["noise_sampler_seed"] = [int(s) for s in seeds]
    return sampler.cls.from_config(config)
