"""Samplers diffusers has no scheduler for: DPM++ 2S a, DPM fast, DPM adaptive, Restart and DDIM CFG++
(docs/compatibility.md §5).

They are written, as in k-diffusion, over a denoiser ``model(x, sigma, step) -> Prediction`` in sigma space
(``x = x0 + sigma * noise``, the space diffusers' Euler works in), and make as many model calls as their
algorithm needs (DPM adaptive: as many as its error control asks for). :class:`KDiffusionScheduler` gives
them the scheduler surface the rest of the engine uses (``set_timesteps``, ``timesteps``, ``add_noise``,
``init_noise_sigma``, ...); the denoising loop (:func:`pipelines.sampling.denoise.denoise`) sees its
``sample`` method and hands it a denoiser that runs the UNet with classifier-free guidance, reports progress
and checks for interrupt at every model call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from pipelines.sampling.schedules import ModelSigmas, SigmaFunction, karras


class Prediction(NamedTuple):
    """The guided denoised estimate at one model call, and the unguided (negative-prompt) one."""

    denoised: torch.Tensor
    uncond: torch.Tensor


#: ``model(x, sigma, step)``: ``step`` is the user-visible step the call belongs to (for progress and prompt
#: editing); it may exceed the step count for samplers that make extra calls, and the loop clamps it.
Denoiser = Callable[[torch.Tensor, float, int], Prediction]
#: Fresh standard normal noise shaped like the latents, one seeded generator per image.
NoiseSource = Callable[[], torch.Tensor]


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add noise of sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _derivative(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def sample_dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: NoiseSource,
                              eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) to each ancestral step's sigma_down (a midpoint call in log sigma), then noise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i).denoised
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + _derivative(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, math.exp(-s), i).denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0:
            x = x + noise() * sigma_up
    return x


class _DpmSolver:
    """DPM-Solver (Lu et al., 2022) steps of order 1-3 in ``t = -log(sigma)``, on the noise prediction."""

    def __init__(self, model: Denoiser, step_of: Callable[[float], int]):
        self.model = model
        self.step_of = step_of

    def eps(self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: float) -> torch.Tensor:
        if key not in cache:
            sigma = math.exp(-t)
            cache[key] = (x - self.model(x, sigma, self.step_of(t)).denoised) / sigma
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - math.exp(-t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sigma_next = math.exp(-t_next)
        return x - sigma_next * math.expm1(h) * eps - sigma_next / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
              - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sigma_next = math.exp(-t_next)
        return x - sigma_next * math.expm1(h) * eps - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def _progress(t_start: float, t_end: float, steps: int) -> Callable[[float], int]:
    """The user-visible step of a call at ``t``: how far it is from t_start to t_end, in ``steps`` parts."""
    def step_of(t: float) -> int:
        return max(0, min(int((t - t_start) / (t_end - t_start) * steps), steps - 1))
    return step_of


def sample_dpm_fast(model: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, n: int,
                    noise: NoiseSource, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver-Fast: ``n`` model calls in steps of order 3 (the last ones 2 and 1), evenly in log sigma."""
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = n // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    solver = _DpmSolver(model, _progress(t_start, t_end, n))
    for i, order in enumerate(orders):
        t, t_next = float(ts[i]), float(ts[i + 1])
        sigma_up = 0.0
        t_target = t_next
        if eta:
            sigma_down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
            t_target = min(t_end, -math.log(sigma_down))
            sigma_up = math.sqrt(max(math.exp(-t_next) ** 2 - math.exp(-t_target) ** 2, 0.0))
        cache: dict[str, torch.Tensor] = {}
        step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
        x = step(x, t, t_target, cache)
        if sigma_up:
            x = x + sigma_up * noise()
    return x


class _PidController:
    """Step size control for DPM adaptive (an integral controller by default)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(model: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, steps: int,
                        noise: NoiseSource, eta: float = 1.0, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, max_calls: int = 1000) -> torch.Tensor:
    """DPM-Solver-23 with adaptive step size: each step compares orders 2 and 3 and the error controller
    accepts or shrinks it. ``steps`` only scales the progress report; ``max_calls`` bounds the work."""
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    calls = 0

    def counted(x_: torch.Tensor, sigma: float, step: int) -> Prediction:
        nonlocal calls
        calls += 1
        if calls > max_calls:
            raise RuntimeError(f"DPM adaptive: no convergence within {max_calls} model calls")
        return model(x_, sigma, step)

    solver = _DpmSolver(counted, _progress(t_start, t_end, steps))
    s = t_start
    x_prev = x
    pid = _PidController(h_init, 0.0, 1.0, 0.0, 1.5 if eta else order)
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        t_target, sigma_up = t, 0.0
        if eta:
            sigma_down, _ = ancestral_step(math.exp(-s), math.exp(-t), eta)
            t_target = min(t_end, -math.log(sigma_down))
            sigma_up = math.sqrt(max(math.exp(-t) ** 2 - math.exp(-t_target) ** 2, 0.0))
        cache: dict[str, torch.Tensor] = {}
        if order == 2:
            x_low = solver.step_1(x, s, t_target, cache)
            x_high = solver.step_2(x, s, t_target, cache)
        else:
            x_low = solver.step_2(x, s, t_target, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_target, cache)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + (sigma_up * noise() if sigma_up else 0)
            s = t
    return x


def restart_steps(sigmas: list[float]) -> list[tuple[float, float]]:
    """Restart sampling's (sigma, sigma_next) pairs: with 20 steps or more, the schedule is rebuilt as a shorter
    Karras schedule plus restart segments that jump back from sigma 0.1 to 2 and run down again."""
    steps = len(sigmas) - 1
    restart_list: dict[float, tuple[int, int, float]] = {}
    if steps >= 20:
        count, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        ends = ModelSigmas(np.array([sigmas[-2], sigmas[0]]))
        sigmas = [float(v) for v in karras(steps - count * times, ends)]
        restart_list = {0.1: (count + 1, times, 2.0)}
    values = np.asarray(sigmas, dtype=np.float64)
    by_index = {int(np.argmin(np.abs(values - key))): value for key, value in restart_list.items()}
    pairs: list[tuple[float, float]] = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            count, times, restart_max = by_index[i + 1]
            min_idx, max_idx = i + 1, int(np.argmin(np.abs(values - restart_max)))
            if max_idx < min_idx:
                ends = ModelSigmas(np.array([sigmas[min_idx], sigmas[max_idx]]))
                segment = [float(v) for v in karras(count, ends)[:-1]]
                pairs.extend(list(zip(segment[:-1], segment[1:])) * times)
    return pairs


def sample_restart(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: NoiseSource,
                   s_noise: float = 1.0) -> torch.Tensor:
    """Restart sampling (Xu et al., 2023): Heun steps, and at each restart segment fresh noise lifts the
    latents back to the segment's top sigma."""
    pairs = restart_steps(sigmas)
    steps = len(sigmas) - 1
    last_sigma: float | None = None
    for index, (sigma, sigma_next) in enumerate(pairs):
        step = index * steps // len(pairs)
        if last_sigma is not None and last_sigma < sigma:
            x = x + noise() * s_noise * math.sqrt(sigma**2 - last_sigma**2)
        denoised = model(x, sigma, step).denoised
        d = _derivative(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _derivative(x_2, sigma_next, model(x_2, sigma_next, step).denoised)
            x = x + (d + d_2) / 2 * dt
        last_sigma = sigma_next
    return x


def sample_ddim_cfgpp(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: NoiseSource) -> torch.Tensor:
    """DDIM (eta 0) with CFG++ (Chung et al., 2024): the step leaves along the unguided noise prediction while
    the denoised estimate is guided. In sigma space a DDIM step is ``x0 + sigma_next * eps``."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        prediction = model(x, sigma, i)
        eps_uncond = (x - prediction.uncond) / sigma
        x = prediction.denoised + sigma_next * eps_uncond
    return x


#: Our samplers by key: (function kind, default eta). "sigmas" samplers run the whole schedule; "range"
#: samplers (DPM fast / adaptive) take only its largest and smallest non-zero sigma, as in A1111.
ALGORITHMS = ("dpmpp_2s_ancestral", "dpm_fast", "dpm_adaptive", "restart", "ddim_cfgpp")


class KDiffusionScheduler:
    """The scheduler surface for one of our samplers (:data:`ALGORITHMS`) on a model's noise levels."""

    order = 1

    def __init__(self, algorithm: str, schedule: SigmaFunction, model: ModelSigmas, prediction_type: str,
                 eta: float = 1.0):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"sampler algorithm: unknown {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: {prediction_type!r} is not supported by this sampler; "
                             "choose epsilon or v_prediction")
        self.algorithm = algorithm
        self.schedule = schedule
        self.model = model
        self.eta = eta
        self.config = SimpleNamespace(prediction_type=prediction_type, algorithm=algorithm)
        #: CFG++ maps the CFG scale [0, 12.5] to a guidance weight [0, 1], as A1111 does.
        self.cfg_scale_multiplier = 1 / 12.5 if algorithm == "ddim_cfgpp" else 1.0
        self.sigmas = torch.zeros(1)
        self.timesteps = torch.zeros(0)
        self.begin_index = 0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        sigmas = np.asarray(self.schedule(num_inference_steps, self.model), dtype=np.float64)
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.timesteps = torch.tensor(self.model.sigma_to_t(sigmas[:-1]), dtype=torch.float32, device=device)
        self.begin_index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.begin_index = begin_index

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0])

    def sigma_of(self, timestep: torch.Tensor | float) -> float:
        return float(self.model.t_to_sigma(float(timestep)))

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        return sample / math.sqrt(self.sigma_of(timestep) ** 2 + 1)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma_of(timesteps.flatten()[0])
        return original + noise * sigma

    def timestep_of(self, sigma: float) -> float:
        return float(self.model.sigma_to_t(sigma)[0])

    def denoised(self, sample: torch.Tensor, sigma: float, model_output: torch.Tensor) -> torch.Tensor:
        """The denoised estimate from the UNet's output at ``sigma`` (its input was ``sample`` scaled)."""
        if self.config.prediction_type == "v_prediction":
            return sample / (sigma**2 + 1) - model_output * (sigma / math.sqrt(sigma**2 + 1))
        return sample - sigma * model_output

    @property
    def run_sigmas(self) -> list[float]:
        return [float(s) for s in self.sigmas[self.begin_index:]]

    def expected_calls(self) -> int:
        """About how many model calls :meth:`sample` makes (for the step cache's final full call)."""
        steps = len(self.run_sigmas) - 1
        return {"dpmpp_2s_ancestral": 2 * steps, "restart": 2 * len(restart_steps(self.run_sigmas))}.get(
            self.algorithm, steps)

    def sample(self, model: Denoiser, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        """Run the sampler from the current begin index to the end of the schedule."""
        sigmas = self.run_sigmas
        if len(sigmas) < 2:
            return x
        positive = [s for s in sigmas if s > 0]
        if self.algorithm == "dpmpp_2s_ancestral":
            return sample_dpmpp_2s_ancestral(model, x, sigmas, noise, self.eta)
        if self.algorithm == "dpm_fast":
            return sample_dpm_fast(model, x, min(positive), max(positive), len(sigmas) - 1, noise, self.eta)
        if self.algorithm == "dpm_adaptive":
            return sample_dpm_adaptive(model, x, min(positive), max(positive), len(sigmas) - 1, noise, self.eta)
        if self.algorithm == "restart":
            return sample_restart(model, x, sigmas, noise)
        return sample_ddim_cfgpp(model, x, sigmas, noise)
