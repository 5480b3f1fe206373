"""Noise schedules: the sigmas of A1111's twelve schedule types, from a model's training noise levels
(docs/compatibility.md §5).

A model trained with a discrete DDPM schedule has one noise level per training timestep,
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``. A schedule type picks ``n`` of them (or levels between
them) from the largest down, and appends the final level (0 for all but KL Optimal, which ends at the
smallest training level). The diffusers samplers get most schedule types through their own options
(``use_karras_sigmas``, ``timestep_spacing``, ...); these functions give the rest to the samplers that take
custom sigmas, and all of them to our own samplers (:mod:`pipelines.sampling.k_samplers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

#: Align Your Steps' 10-step noise levels for SD 1.x/2.x and for SDXL (interpolated log-linearly for other
#: step counts).
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
#: The Beta schedule's distribution parameters (A1111's option defaults, and diffusers').
BETA_ALPHA = BETA_BETA = 0.6


@dataclass(frozen=True)
class ModelSigmas:
    """A model's noise level at each training timestep, ascending (index = timestep)."""

    sigmas: np.ndarray
    sdxl: bool = False

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor | np.ndarray, sdxl: bool = False) -> ModelSigmas:
        alphas = np.asarray(alphas_cumprod, dtype=np.float64)
        return cls(np.sqrt((1 - alphas) / alphas), sdxl)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: float | np.ndarray) -> np.ndarray:
        """The (fractional) timestep of a noise level, interpolating log sigma between training timesteps."""
        log_sigmas = np.log(self.sigmas)
        log_sigma = np.log(np.maximum(np.atleast_1d(np.asarray(sigma, dtype=np.float64)), 1e-10))
        low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
        high = low + 1
        weight = np.clip((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low]), 0.0, 1.0)
        return low + weight

    def t_to_sigma(self, t: float | np.ndarray) -> np.ndarray:
        """The noise level at a fractional timestep (log-linear between training timesteps)."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0, len(self.sigmas) - 1)
        low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
        weight = t - low
        log_sigmas = np.log(self.sigmas)
        return np.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[high])


def _with_zero(sigmas: np.ndarray | list[float]) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """``n`` levels at evenly spaced timesteps from the last training timestep to the first."""
    return _with_zero(model.t_to_sigma(np.linspace(len(model.sigmas) - 1, 0, n)))


def karras(n: int, model: ModelSigmas, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): evenly spaced in ``sigma ** (1 / rho)``."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = model.sigma_min ** (1 / rho), model.sigma_max ** (1 / rho)
    return _with_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def exponential(n: int, model: ModelSigmas) -> np.ndarray:
    """Evenly spaced in log sigma."""
    return _with_zero(np.exp(np.linspace(math.log(model.sigma_max), math.log(model.sigma_min), n)))


def polyexponential(n: int, model: ModelSigmas, rho: float = 1.0) -> np.ndarray:
    """Log sigma along a polynomial ramp of degree ``rho`` (1: exponential)."""
    ramp = np.linspace(1, 0, n) ** rho
    log_min, log_max = math.log(model.sigma_min), math.log(model.sigma_max)
    return _with_zero(np.exp(ramp * (log_max - log_min) + log_min))


def sgm_uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """``n + 1`` evenly spaced timesteps from the last to the first, the final one dropped (SGM's spacing)."""
    start, end = model.sigma_to_t(model.sigma_max)[0], model.sigma_to_t(model.sigma_min)[0]
    return _with_zero(model.t_to_sigma(np.linspace(start, end, n + 1)[:-1]))


def kl_optimal(n: int, model: ModelSigmas) -> np.ndarray:
    """Evenly spaced in ``arctan(sigma)``; ends at the smallest training level, not 0."""
    alpha_min, alpha_max = math.atan(model.sigma_min), math.atan(model.sigma_max)
    steps = np.arange(n + 1) / n
    return np.tan(steps * alpha_min + (1.0 - steps) * alpha_max)


def align_your_steps(n: int, model: ModelSigmas) -> np.ndarray:
    """Align Your Steps' optimised levels for the model family, log-linearly interpolated to ``n`` steps."""
    table = np.asarray(AYS_SDXL if model.sdxl else AYS_SD1, dtype=np.float64)
    if n == len(table):
        return _with_zero(table)
    xs = np.linspace(0, 1, len(table))
    log_ascending = np.log(table[::-1])
    return _with_zero(np.exp(np.interp(np.linspace(0, 1, n), xs, log_ascending))[::-1])


def simple(n: int, model: ModelSigmas) -> np.ndarray:
    """Every ``len / n``-th training level from the largest, rounded down."""
    stride = len(model.sigmas) / n
    return _with_zero([model.sigmas[-(1 + int(x * stride))] for x in range(n)])


def normal(n: int, model: ModelSigmas) -> np.ndarray:
    """Evenly spaced timesteps from the largest level's to the smallest's, both included."""
    start, end = model.sigma_to_t(model.sigma_max)[0], model.sigma_to_t(model.sigma_min)[0]
    return _with_zero(model.t_to_sigma(np.linspace(start, end, n)))


def ddim(n: int, model: ModelSigmas) -> np.ndarray:
    """DDIM's timesteps: every ``len // n``-th training timestep from 1 up, largest first."""
    stride = max(len(model.sigmas) // n, 1)
    picked = [model.sigmas[x] for x in range(1, len(model.sigmas), stride)]
    return _with_zero(picked[::-1])


def beta(n: int, model: ModelSigmas) -> np.ndarray:
    """Lee et al. (2024): levels at the quantiles of a Beta(0.6, 0.6) distribution, denser at both ends."""
    from scipy import stats

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
    return _with_zero(model.sigma_min + quantiles * (model.sigma_max - model.sigma_min))


SigmaFunction = Callable[[int, ModelSigmas], np.ndarray]

#: Each schedule type's sigmas, by A1111 name ("automatic" is the sampler's default, so it has none).
SIGMA_FUNCTIONS: dict[str, SigmaFunction] = {
    "uniform": uniform,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
    "simple": simple,
    "normal": normal,
    "ddim": ddim,
    "beta": beta,
}
