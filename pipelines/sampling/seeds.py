"""Seeds and initial noise (docs/compatibility.md §7).

Noise is drawn on the CPU, one generator per image, so a seed gives the same image on any device and
image k of a batch equals a single run with seed + k. Each image keeps its generator for the rest of the
job: ancestral samplers draw their per-step noise from it too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pipelines.request import MAX_SEED


def resolve_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """-1 or None becomes a random seed in [0, 4294967294]; other values pass through."""
    if seed is None or seed == -1:
        return (rng or random).randint(0, MAX_SEED)
    return int(seed)


@dataclass(frozen=True)
class SeedPlan:
    """The seeds of every image of a job, in order."""

    seeds: list[int]
    subseeds: list[int]

    @classmethod
    def for_job(cls, seed: int, subseed: int, count: int, subseed_strength: float) -> SeedPlan:
        first = resolve_seed(seed)
        first_sub = resolve_seed(subseed) if subseed_strength > 0 else max(subseed, 0)
        return cls([first + k for k in range(count)], [first_sub + k for k in range(count)])


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (linear when they are nearly parallel)."""
    low_n = low / low.norm()
    high_n = high / high.norm()
    dot = (low_n * high_n).sum().clamp(-1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1.0 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so) * low + (torch.sin(t * omega) / so) * high


def _randn(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    # Drawn as a batch of one so the values equal diffusers' randn_tensor with a per-image generator.
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]


def step_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One sampler step's fresh noise for a batch of ``shape`` (B, C, h, w): drawn on the CPU, one image per
    generator (the values diffusers would draw), and sent to ``device`` from pinned memory without waiting,
    so the step loop does not stall the GPU the way a plain copy does."""
    noise = torch.stack([_randn(generator, tuple(shape[1:])) for generator in generators])
    if device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def image_noise(
    generator: torch.Generator,
    shape: tuple[int, int, int],
    *,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Initial latent noise of one image, shape (C, H, W), on the CPU.

    ``resize_from`` is a latent (H, W): the noise is made as for that size and placed centred into
    ``shape``, so that an image keeps its composition at a nearby size ("Seed resize from").
    With ``subseed_strength`` > 0 the noise moves towards the noise of ``subseed`` by spherical
    interpolation ("Variation seed").
    """
    noise_shape = (shape[0], *resize_from) if resize_from else shape
    subnoise = None
    if subseed is not None and subseed_strength > 0:
        subnoise = _randn(torch.Generator("cpu").manual_seed(subseed), noise_shape)
    noise = _randn(generator, noise_shape)
    if subnoise is not None:
        noise = slerp(subseed_strength, noise, subnoise)
    if noise_shape != shape:
        target = _randn(generator, shape)
        h, w = min(shape[1], noise_shape[1]), min(shape[2], noise_shape[2])
        ty, tx = max((shape[1] - noise_shape[1]) // 2, 0), max((shape[2] - noise_shape[2]) // 2, 0)
        sy, sx = max((noise_shape[1] - shape[1]) // 2, 0), max((noise_shape[2] - shape[2]) // 2, 0)
        target[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
        noise = target
    return noise


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
