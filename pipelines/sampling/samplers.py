"""Sampler and schedule-type names users know from A1111, mapped to diffusers schedulers or to our own
samplers (docs/compatibility.md §5)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers

from pipelines.sampling.k_samplers import KDiffusionScheduler
from pipelines.sampling.schedules import SIGMA_FUNCTIONS, ModelSigmas, SigmaFunction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleType:
    """One entry of the Schedule type dropdown, with A1111's name, label and aliases.

    ``config`` selects it in a diffusers scheduler (None: it has no such option, and only samplers that take
    custom sigmas run it); the sigmas themselves are :data:`pipelines.sampling.schedules.SIGMA_FUNCTIONS`.
    """

    name: str
    label: str
    config: Mapping[str, Any] | None = None
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def sigmas(self) -> SigmaFunction:
        return SIGMA_FUNCTIONS[self.name]


#: A1111 1.10's schedule types, in its order. "Automatic" is the sampler's own default; "Uniform" is the
#: model's own timestep spacing for the diffusers samplers.
SCHEDULES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic", {}),
    ScheduleType("uniform", "Uniform", {}, need_inner_model=True),
    ScheduleType("karras", "Karras", {"use_karras_sigmas": True}, default_rho=7.0),
    ScheduleType("exponential", "Exponential", {"use_exponential_sigmas": True}),
    ScheduleType("polyexponential", "Polyexponential", None, default_rho=1.0),
    ScheduleType("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}, need_inner_model=True,
                 aliases=("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal", None),
    ScheduleType("align_your_steps", "Align Your Steps", None),
    ScheduleType("simple", "Simple", None, need_inner_model=True),
    ScheduleType("normal", "Normal", {"timestep_spacing": "linspace"}, need_inner_model=True),
    ScheduleType("ddim", "DDIM", {"timestep_spacing": "leading", "steps_offset": 1}, need_inner_model=True),
    ScheduleType("beta", "Beta", {"use_beta_sigmas": True}, need_inner_model=True),
)

#: Schedule types by label (the names the UI, the infotext and the engine use).
SCHEDULE_TYPES: dict[str, ScheduleType] = {s.label: s for s in SCHEDULES}
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULE_TYPES)


def _schedule_key(value: str) -> str:
    return value.strip().lower().replace(" ", "_")


_SCHEDULE_LOOKUP: dict[str, ScheduleType] = {
    _schedule_key(key): s for s in SCHEDULES for key in (s.name, s.label, *s.aliases)
}


def find_schedule(value: str) -> ScheduleType | None:
    """The schedule type an A1111 name (``sgm_uniform``), label (``SGM Uniform``) or alias names, any case."""
    return _SCHEDULE_LOOKUP.get(_schedule_key(value))


def schedule_label(value: str) -> str:
    """The label of a known schedule type name; unknown values pass through unchanged."""
    schedule = find_schedule(value)
    return schedule.label if schedule else value


@dataclass(frozen=True)
class Sampler:
    """One entry of the Sampling method dropdown: a diffusers scheduler class with options, or one of our
    samplers (``algorithm``, :mod:`pipelines.sampling.k_samplers`)."""

    name: str
    scheduler_class: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    default_schedule: str = "Uniform"
    aliases: tuple[str, ...] = ()
    algorithm: str | None = None

    @property
    def cls(self) -> type[Any]:
        if self.algorithm:
            return KDiffusionScheduler
        return getattr(diffusers, self.scheduler_class)

    def can_run(self, schedule: ScheduleType) -> bool:
        """Whether this sampler runs ``schedule``: through its diffusers options, else as custom sigmas."""
        if self.algorithm or schedule.name == "automatic":
            return True
        accepted = inspect.signature(self.cls.__init__).parameters
        if schedule.config is not None and all(key in accepted for key in schedule.config):
            return True
        # UniPC's ``sigmas`` are for flow-matching models only.
        takes_sigmas = "sigmas" in inspect.signature(self.cls.set_timesteps).parameters
        return takes_sigmas and self.cls is not diffusers.UniPCMultistepScheduler

    @property
    def schedule_types(self) -> tuple[str, ...]:
        """Schedule types this sampler can run, "Automatic" first."""
        return tuple(s.label for s in SCHEDULES if self.can_run(s))


def _k(name: str, algorithm: str, default_schedule: str, alias: str) -> Sampler:
    return Sampler(name, "KDiffusionScheduler", {}, default_schedule, (alias,), algorithm)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "Karras",
                ("k_dpmpp_2m",)),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, "Karras", ("k_dpmpp_sde",)),
        Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "Uniform",
                ("k_dpmpp_2m_sde",)),
        Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "Exponential",
                ("k_dpmpp_2m_sde_heun",)),
        _k("DPM++ 2S a", "dpmpp_2s_ancestral", "Uniform", "k_dpmpp_2s_ancestral"),
        Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "Uniform", ("k_dpmpp_3m_sde",)),
        Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, "Uniform", ("k_euler_a", "k_euler_ancestral")),
        Sampler("Euler", "EulerDiscreteScheduler", {}, "Uniform", ("k_euler",)),
        Sampler("LMS", "LMSDiscreteScheduler", {}, "Uniform", ("k_lms",)),
        Sampler("Heun", "HeunDiscreteScheduler", {}, "Uniform", ("k_heun",)),
        Sampler("DPM2", "KDPM2DiscreteScheduler", {}, "Karras", ("k_dpm_2",)),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "Karras", ("k_dpm_2_a",)),
        _k("DPM fast", "dpm_fast", "Uniform", "k_dpm_fast"),
        _k("DPM adaptive", "dpm_adaptive", "Uniform", "k_dpm_ad"),
        _k("Restart", "restart", "Karras", "restart"),
        Sampler("DDIM", "DDIMScheduler", {}, "Uniform", ("ddim",)),
        _k("DDIM CFG++", "ddim_cfgpp", "DDIM", "ddim_cfgpp"),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, "Uniform", ("plms",)),
        Sampler("UniPC", "UniPCMultistepScheduler", {}, "Uniform", ("unipc",)),
        Sampler("LCM", "LCMScheduler", {}, "Uniform", ("lcm",)),
    )
}

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
    """The concrete schedule label for ``schedule`` ("Automatic" becomes the sampler's default).

    A schedule the sampler cannot run, or an unknown one, is an error here; requests go through
    :func:`fitting_schedule` first, which turns both into the sampler's default with a warning.
    """
    known = find_schedule(schedule)
    if known is None:
        raise ValueError(f"scheduler: unknown schedule type {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    allowed = sampler.schedule_types
    if known.label not in allowed:
        raise ValueError(
            f"scheduler: {sampler.name} cannot use the {known.label} schedule; choose one of {', '.join(allowed)}"
        )
    if known.label == "Automatic":
        return sampler.default_schedule if sampler.default_schedule in allowed else "Uniform"
    return known.label


def fitting_schedule(sampler_name: str, schedule: str) -> tuple[str, str | None]:
    """The schedule type ``sampler_name`` runs with when ``schedule`` is asked for, and a warning if it differs.

    A1111's samplers take every schedule type; some diffusers classes cannot (Euler a has no Karras sigmas).
    Such a request, e.g. from a pasted A1111 infotext or an old script, runs with the sampler's own default
    schedule rather than failing; so does an unknown schedule name, as in A1111. The caller reports the
    warning and records the schedule actually used.
    """
    sampler = find_sampler(sampler_name)
    known = find_schedule(schedule)
    used = resolve_schedule(sampler, "Automatic")
    if known is None:
        return "Automatic", (f"unknown schedule type {schedule!r}; {sampler.name} ran with its default {used} "
                             f"(schedule types: {', '.join(SCHEDULE_NAMES)})")
    if known.label in sampler.schedule_types:
        return known.label, None
    return "Automatic", (f"{sampler.name} cannot use the {known.label} schedule; it ran with {used} "
                         f"(its schedules: {', '.join(sampler.schedule_types)})")


def build_scheduler(sampler_name: str, schedule: str, model_config: Mapping[str, Any], *,
                    seeds: Sequence[int] | None = None, sdxl: bool = False):
    """A fresh scheduler for this sampler and schedule, from the model's own scheduler config.

    The model config keeps ``prediction_type`` (v-prediction for SD 2.x 768 models), beta schedule and
    timestep spacing; only the sampler's and schedule's keys are overridden. Keys the class does not accept
    are dropped by diffusers' ``from_config``. ``seeds`` (one per image of the batch) seed samplers that have
    their own noise source (DPM++ SDE's Brownian tree, one tree per image), so that a seed fixes the image and
    image k of a batch equals a single run with its seed. ``sdxl`` picks Align Your Steps' SDXL levels.
    """
    sampler = find_sampler(sampler_name)
    schedule_type = SCHEDULE_TYPES[resolve_schedule(sampler, schedule)]
    # Private keys go too: diffusers' "_use_default_values" would make it ignore our timestep_spacing.
    config = {k: v for k, v in dict(model_config).items() if k not in _SIGMA_OPTIONS and not k.startswith("_")}
    if sampler.algorithm:
        alphas = diffusers.EulerDiscreteScheduler.from_config(config).alphas_cumprod
        return KDiffusionScheduler(sampler.algorithm, schedule_type.sigmas,
                                   ModelSigmas.from_alphas_cumprod(alphas, sdxl),
                                   str(config.get("prediction_type", "epsilon")))
    config.update(sampler.kwargs)
    accepted = inspect.signature(sampler.cls.__init__).parameters
    custom_sigmas = schedule_type.config is None or not all(key in accepted for key in schedule_type.config)
    if not custom_sigmas:
        config.update(schedule_type.config or {})
    if "noise_sampler_seed" in accepted and seeds is not None:
        config["noise_sampler_seed"] = [int(s) for s in seeds]
    scheduler = sampler.cls.from_config(config)
    if custom_sigmas:
        _use_custom_sigmas(scheduler, schedule_type.sigmas, sdxl)
    return scheduler


def _use_custom_sigmas(scheduler: Any, sigmas: SigmaFunction, sdxl: bool) -> None:
    """Make ``scheduler.set_timesteps(n)`` use the schedule's own sigmas (schedulers that take ``sigmas=``)."""
    model = ModelSigmas.from_alphas_cumprod(scheduler.alphas_cumprod, sdxl)
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int, device: Any = None, **_: Any) -> None:
        original(device=device, sigmas=[float(s) for s in sigmas(num_inference_steps, model)])

    scheduler.set_timesteps = set_timesteps
