"""Between pixels and latents: VAE encode and decode, and the cheap latent preview."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

#: Above this many pixels the VAE encodes and decodes in tiles so that 2048 px and larger images fit in memory.
VAE_TILING_PIXELS = 1536 * 1536

# Linear maps from the 4 latent channels to RGB, fitted for each latent space; good enough for a
# live preview and free of any model call.
_PREVIEW_FACTORS = {
    "sd": torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                        [-0.184, -0.271, -0.473]]),
    "sdxl": torch.tensor([[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
                          [-0.3730, -0.2499, -0.2088]]),
}


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> (B, 3, H, W) float in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images (rounded like diffusers' image processor)."""
    array = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def _scale(vae) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.config.scaling_factor, shift


@contextmanager
def _tiled_when_large(vae, pixels: int) -> Iterator[None]:
    """VAE tiling for one call when the image has more than VAE_TILING_PIXELS pixels; switched off after."""
    use_tiling = pixels > VAE_TILING_PIXELS
    if use_tiling:
        vae.enable_tiling()
    try:
        yield
    finally:
        if use_tiling:
            vae.disable_tiling()


def encode(vae, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents, one sample of the VAE's distribution per image,
    drawn from that image's generator (as diffusers' img2img does). Large images are encoded in tiles."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    scaling, shift = _scale(vae)
    latents = []
    with _tiled_when_large(vae, pixels.shape[-2] * pixels.shape[-1]):
        for i, gen in enumerate(generators):
            dist = vae.encode(pixels[i : i + 1].to(device=device, dtype=dtype)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=gen, dtype=dist.mean.dtype).to(device)
            latents.append(dist.mean + dist.std * noise)
    return (torch.cat(latents) - shift) * scaling


def decode(vae, latents: torch.Tensor, *, allow_upcast: bool = True) -> tuple[torch.Tensor, bool]:
    """Scaled latents -> pixels in [-1, 1]. Returns (pixels, upcast) where ``upcast`` says the fp16 VAE
    overflowed (NaN) and the VAE was moved to fp32 to decode again; the caller keeps it there.
    Large images are decoded in tiles."""
    scaling, shift = _scale(vae)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with _tiled_when_large(vae, latents.shape[-2] * latents.shape[-1] * factor * factor):
        dtype = next(vae.parameters()).dtype
        pixels = vae.decode((latents / scaling + shift).to(dtype), return_dict=False)[0]
        if allow_upcast and dtype != torch.float32 and not torch.isfinite(pixels).all():
            log.warning("The VAE produced NaNs in %s; decoding in fp32 (use --no-half-vae to skip this)", dtype)
            vae.to(torch.float32)
            pixels = vae.decode((latents / scaling + shift).float(), return_dict=False)[0]
            return pixels, True
        return pixels, False


def approx_preview_pixels(latents: torch.Tensor, family: str) -> torch.Tensor:
    """The first latent of a batch as RGB (3, h, w) in [0, 1] at latent size, on the latents' device:
    a fixed linear map, free of any model call."""
    factors = _PREVIEW_FACTORS["sdxl" if family == "sdxl" else "sd"].to(latents.device, torch.float32)
    if latents.shape[1] != factors.shape[0]:  # no fitted map for these latents (Flux.1's 16 channels)
        first = latents[0, :3].float()
        return (first - first.amin()) / (first.amax() - first.amin()).clamp(min=1e-6)
    rgb = torch.einsum("chw,cr->rhw", latents[0].float(), factors)
    return ((rgb + 1) / 2).clamp(0, 1)


def preview(latents: torch.Tensor, family: str) -> Image.Image:
    """A small RGB image of the first latent of a batch, without the VAE (latent size, upscaled 2x).

    Waits for the device; the step loop uses :class:`pipelines.sampling.previews.PreviewMaker`, which does not.
    """
    rgb = approx_preview_pixels(latents, family)
    array = rgb.mul(255).byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(array)
    return image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST)
