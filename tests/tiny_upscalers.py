"""Tiny random-weight upscaler models for tests: an ESRGAN (RRDBNet) in the original ESRGAN key layout.

The weights are built by hand, key by key, the way ``RRDB_ESRGAN_x4.pth`` lays them out
(``model.0`` first conv, ``model.1.sub.<b>.RDB<r>.conv<c>.0`` dense blocks, ``model.1.sub.<nb>`` trunk
conv, then one nearest-upsample + conv per factor of 2, the HR conv and the last conv), so spandrel's
architecture detection is exercised on a real layout rather than on a module it built itself.

Random weights alone make a model whose output clamps to black or white. Instead the convolutions
outside the trunk start as identities plus small noise and the dense trunk is small random noise: the
model then behaves like a nearest-neighbour upscale plus a texture that depends on each pixel's
neighbourhood (about 18 input pixels around it), which is what tiling tests need to see.
"""

from __future__ import annotations

import math
from pathlib import Path

import safetensors.torch
import torch

#: spandrel 0.4 builds RRDB dense blocks with a fixed growth of 32 channels, so the file must use 32.
GROWTH_CHANNELS = 32


def tiny_esrgan_state_dict(
    scale: int = 4, num_feat: int = 8, num_block: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The state dict of a seeded tiny ESRGAN x``scale`` (1, 2, 4 or 8) in the original ESRGAN key layout."""
    if scale not in (1, 2, 4, 8):
        # Old-layout ESRGAN encodes the scale as the number of x2 upsampling stages; x3 cannot be told apart.
        raise ValueError(f"scale must be 1, 2, 4 or 8, got {scale}")
    generator = torch.Generator().manual_seed(seed)

    def conv(out_ch: int, in_ch: int, std: float, identity: bool) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
        if identity:
            for channel in range(min(out_ch, in_ch)):
                weight[channel, channel, 1, 1] += 1.0
        return weight, torch.zeros(out_ch)

    state: dict[str, torch.Tensor] = {}

    def put(key: str, out_ch: int, in_ch: int, std: float, identity: bool = False) -> None:
        state[f"{key}.weight"], state[f"{key}.bias"] = conv(out_ch, in_ch, std, identity)

    put("model.0", num_feat, 3, 0.005, identity=True)
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                in_ch = num_feat + (index - 1) * GROWTH_CHANNELS
                out_ch = GROWTH_CHANNELS if index < 5 else num_feat
                put(f"model.1.sub.{block}.RDB{rdb}.conv{index}.0", out_ch, in_ch, 0.05)
    put(f"model.1.sub.{num_block}", num_feat, num_feat, 0.05)
    layer = 3  # model.2 is the first nn.Upsample; each stage is Upsample, Conv, LeakyReLU
    for _ in range(int(math.log2(scale))):
        put(f"model.{layer}", num_feat, num_feat, 0.002, identity=True)
        layer += 3
    layer -= 1  # without upsampling stages the HR conv directly follows the trunk at model.2
    put(f"model.{layer}", num_feat, num_feat, 0.002, identity=True)
    put(f"model.{layer + 2}", 3, num_feat, 0.002, identity=True)
    return state


def write_tiny_esrgan(path: Path, scale: int = 4, *, seed: int = 0) -> Path:
    """Write a tiny ESRGAN x``scale`` to ``path`` (``.pth``: ``torch.save`` of a plain dict of tensors,
    as the original ESRGAN releases are; ``.safetensors``: safetensors) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_esrgan_state_dict(scale, seed=seed)
    if path.suffix.lower() == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    elif path.suffix.lower() == ".pth":
        torch.save(state, path)
    else:
        raise ValueError(f"{path}: expected a .pth or .safetensors file name")
    return path
