"""Our samplers (pipelines/sampling/k_samplers.py) against exact solutions and reference trajectories.

The toy model: data x0 ~ N(mu, s^2) per element. Its ideal denoiser is known in closed form,
D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), and the probability-flow ODE from sigma_max to 0 maps x to
mu + (x - mu) * s / sqrt(s^2 + sigma_max^2). A deterministic sampler must land there; a stochastic one must
give samples with mean mu and standard deviation s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.sampling import k_samplers as ks
from pipelines.sampling.schedules import SIGMA_FUNCTIONS, ModelSigmas, karras

MU, S = 0.5, 0.8
MODEL = ModelSigmas(np.linspace(0.03, 14.6, 1000))


def ideal(x: torch.Tensor, sigma: float, step: int = 0) -> ks.Prediction:
    denoised = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
    return ks.Prediction(denoised, denoised)


def exact(x: torch.Tensor, sigma_max: float, sigma_end: float = 0.0) -> torch.Tensor:
    return MU + (x - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_max**2)


def start(n: int = 4096, sigma_max: float = 14.6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(S**2 + sigma_max**2)


def noise_source(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(n, generator=g, dtype=torch.float64)


def sigmas(n: int) -> list[float]:
    return [float(v) for v in karras(n, MODEL)]


def test_dpm_fast_without_noise_follows_the_ode():
    x = start()
    errors = [float((ks.sample_dpm_fast(ideal, x, 0.03, 14.6, n, noise_source(1, len(x)), eta=0.0)
                     - exact(x, 14.6, 0.03)).abs().max()) for n in (12, 24, 48)]
    assert errors[0] > 10 * errors[1] > 10 * errors[2] and errors[2] < 2e-4, errors  # third order


def test_dpm_adaptive_without_noise_follows_the_ode():
    x = start()
    errors = [float((ks.sample_dpm_adaptive(ideal, x, 0.03, 14.6, 10, noise_source(1, len(x)), eta=0.0, rtol=rtol,
                                            atol=1e-4) - exact(x, 14.6, 0.03)).abs().max())
              for rtol in (0.05, 0.0005)]
    assert errors[1] < errors[0] / 5 and errors[1] < 0.03, errors


def test_restart_below_20_steps_is_heun_and_follows_the_ode():
    x = start()
    # Without the final step to 0 (an Euler step) every step is Heun's: second order.
    errors = [float((ks.sample_restart(ideal, x, sigmas(n)[:-1], noise_source(1, len(x))) - exact(x, 14.6, 0.03))
                    .abs().max()) for n in (5, 10, 19)]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] / 4 and errors[2] < 0.05, errors  # second order


def test_restart_segments_for_20_and_36_steps():
    pairs = ks.restart_steps(sigmas(20))
    # 20 steps: an 11-step Karras schedule plus one restart of 9 steps back up from sigma ~0.1 to ~2.
    assert len(pairs) == 11 + 9
    ups = [(a, b) for (a, b), (_, prev) in zip(pairs[1:], pairs[:-1]) if a > prev]
    assert len(ups) == 1 and 1.5 < ups[0][0] < 2.6
    assert len(ks.restart_steps(sigmas(40))) == 40


@pytest.mark.parametrize("sampler", ["2s_ancestral", "dpm_fast", "dpm_adaptive", "restart"])
def test_stochastic_samplers_sample_the_data_distribution(sampler):
    x = start(n=40000, seed=2)
    noise = noise_source(3, len(x))
    if sampler == "2s_ancestral":
        out = ks.sample_dpmpp_2s_ancestral(ideal, x, sigmas(20), noise)
    elif sampler == "dpm_fast":
        out = ks.sample_dpm_fast(ideal, x, 0.03, 14.6, 20, noise)
    elif sampler == "dpm_adaptive":
        out = ks.sample_dpm_adaptive(ideal, x, 0.03, 14.6, 20, noise)
    else:
        out = ks.sample_restart(ideal, x, sigmas(24), noise)
    assert abs(float(out.mean()) - MU) < 0.03
    assert abs(float(out.std()) - S) < 0.03


def reference_dpmpp_2s_ancestral(model, x, sigma_list, noise):
    """DPM++ 2S a written directly from k-diffusion's formulas (tensors, as k-diffusion has it)."""
    sigma_list = torch.tensor(sigma_list, dtype=torch.float64)
    for i in range(len(sigma_list) - 1):
        denoised = model(x, float(sigma_list[i])).denoised
        up = min(sigma_list[i + 1], (sigma_list[i + 1] ** 2 * (sigma_list[i] ** 2 - sigma_list[i + 1] ** 2)
                                     / sigma_list[i] ** 2) ** 0.5)
        down = (sigma_list[i + 1] ** 2 - up**2) ** 0.5
        if down == 0:
            x = x + (x - denoised) / sigma_list[i] * (down - sigma_list[i])
        else:
            t, t_next = -sigma_list[i].log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, float((-s).exp())).denoised
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigma_list[i + 1] > 0:
            x = x + noise() * up
    return x


def nonlinear(x: torch.Tensor, sigma: float, step: int = 0) -> ks.Prediction:
    denoised = torch.tanh(x / (1 + sigma)) * 0.9 + 0.05 * sigma
    return ks.Prediction(denoised, denoised * 0.5)


def test_dpmpp_2s_ancestral_matches_the_reference_trajectory():
    x = start(n=256, seed=4)
    ours = ks.sample_dpmpp_2s_ancestral(nonlinear, x, sigmas(8), noise_source(5, len(x)))
    reference = reference_dpmpp_2s_ancestral(nonlinear, x, sigmas(8), noise_source(5, len(x)))
    assert torch.allclose(ours, reference, atol=1e-9)


def reference_ddim_cfgpp(model, x_k, sigma_list):
    """DDIM CFG++ as A1111 writes it, in DDPM space (x = sqrt(alpha) * x_k, alpha = 1 / (1 + sigma^2))."""
    alpha = [1 / (1 + s**2) for s in sigma_list]
    x = x_k * math.sqrt(alpha[0])
    for i in range(len(sigma_list) - 1):
        a_t, a_prev = alpha[i], alpha[i + 1]
        x_k = x / math.sqrt(a_t)
        prediction = model(x_k, sigma_list[i])
        e_t = (x_k - prediction.denoised) / sigma_list[i]
        e_uncond = (x_k - prediction.uncond) / sigma_list[i]
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e_uncond
    return x / math.sqrt(alpha[-1])


def test_ddim_cfgpp_matches_the_reference_and_leaves_along_the_unguided_noise():
    x = start(n=256, seed=6)
    schedule = [float(v) for v in SIGMA_FUNCTIONS["ddim"](10, MODEL)]
    ours = ks.sample_ddim_cfgpp(nonlinear, x, schedule, noise_source(0, len(x)))
    assert torch.allclose(ours, reference_ddim_cfgpp(nonlinear, x, schedule), atol=1e-9)
    # With the guided prediction in both places it is plain DDIM, which differs.
    plain = ks.sample_ddim_cfgpp(lambda x_, s, i=0: ks.Prediction(nonlinear(x_, s).denoised,
                                                                   nonlinear(x_, s).denoised),
                                 x, schedule, noise_source(0, len(x)))
    assert not torch.allclose(ours, plain, atol=1e-3)


@pytest.mark.parametrize("name", sorted(SIGMA_FUNCTIONS))
def test_every_schedule_is_decreasing_from_sigma_max(name):
    values = SIGMA_FUNCTIONS[name](8, MODEL)
    assert np.all(np.diff(values) < 0), values
    assert values[0] == pytest.approx(14.6, rel=0.02) or name in ("ddim", "align_your_steps")
    assert values[-1] == 0 or name == "kl_optimal"


def test_schedule_formulas():
    assert SIGMA_FUNCTIONS["karras"](4, MODEL)[:4] == pytest.approx(
        [(14.6 ** (1 / 7) + r * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for r in np.linspace(0, 1, 4)])
    assert SIGMA_FUNCTIONS["align_your_steps"](10, MODEL)[:3] == pytest.approx([14.615, 6.0, 3.55], rel=0.05)
    assert SIGMA_FUNCTIONS["align_your_steps"](11, MODEL)[:11] == pytest.approx(
        [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
    kl = SIGMA_FUNCTIONS["kl_optimal"](4, MODEL)
    assert np.diff(np.arctan(kl)) == pytest.approx([np.diff(np.arctan(kl))[0]] * 4)
    simple = SIGMA_FUNCTIONS["simple"](4, MODEL)
    assert simple[:4] == pytest.approx(MODEL.sigmas[[999, 749, 499, 249]])
    assert len(SIGMA_FUNCTIONS["ddim"](7, MODEL)) == 9  # A1111's DDIM stride makes 8 steps for 7 here
