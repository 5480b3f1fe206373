"""img2img and inpaint stages: init images and masks in, latents and inpaint inputs out, and back.

Pixel work (resize modes, mask blur, fill, crop) lives in :mod:`pipelines.images.ops`; this module turns
it into what the denoising loop needs and puts the results back into the picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipelines.images import ops as imageops
from pipelines.models.manager import LoadedModel
from pipelines.request import INPAINTING_FILL, RESIZE_MODES, Img2ImgRequest
from pipelines.sampling import latents as latent_ops
from pipelines.sampling.denoise import InpaintLatents, img2img_timesteps
from pipelines.sampling.seeds import generators_for


@dataclass
class Img2ImgSource:
    """The init image(s) of an img2img/inpaint batch, brought to the job's size, and the mask if any."""

    images: list[Image.Image]  # at width x height, what the VAE encodes
    originals: list[Image.Image]  # at width x height, composited back outside the mask
    mask: Image.Image | None  # "L", width x height, blurred, 255 = redraw
    crop_box: tuple[int, int, int, int] | None = None  # "Only masked": where the crop came from
    full_images: list[Image.Image] | None = None  # "Only masked": the whole pictures to paste into
    full_mask: Image.Image | None = None


def prepare_img2img_source(request: Img2ImgRequest, first_image: int, count: int) -> Img2ImgSource:
    """Resize the init images; for inpaint, prepare the mask and, for "Only masked", the crop."""
    pick = [request.init_images[(first_image + k) % len(request.init_images)] for k in range(count)]
    w, h = request.width, request.height
    if request.mask is None:
        images = [imageops.resize_image(im, w, h, request.resize_mode) for im in pick]
        return Img2ImgSource(images, images, None)
    full = [imageops.resize_image(im, pick[0].width, pick[0].height, 0) if im.size != pick[0].size else
            im.convert("RGB") for im in pick]
    mask = imageops.prepare_mask(request.mask.resize(full[0].size), invert=request.inpainting_mask_invert,
                                 blur=request.mask_blur)
    if request.inpaint_full_res:
        box = imageops.mask_bbox(mask, request.inpaint_full_res_padding)
        if box is not None:
            box = imageops.expand_to_ratio(box, w, h, full[0].size)
            crops = [im.crop(box).resize((w, h), imageops.LANCZOS) for im in full]
            crop_mask = mask.crop(box).resize((w, h), imageops.LANCZOS)
            return Img2ImgSource(crops, crops, crop_mask, box, full, mask)
    images = [imageops.resize_image(im, w, h, request.resize_mode) for im in full]
    mask = imageops.resize_image(mask.convert("RGB"), w, h, request.resize_mode).convert("L")
    return Img2ImgSource(images, images, mask)


def masked_content(source: Img2ImgSource, fill: int) -> list[Image.Image]:
    """The pixels the VAE encodes: for masked content "fill" the redraw area is painted over first."""
    if source.mask is None or fill != 0:
        return source.images
    return [imageops.fill_masked(im, source.mask) for im in source.images]


def latent_mask(mask: Image.Image, shape: tuple[int, int], device, dtype,
                resample: Image.Resampling = Image.Resampling.BILINEAR) -> torch.Tensor:
    """The mask at latent size as (1, 1, h, w) in 0..1."""
    small = mask.resize((shape[1], shape[0]), resample)
    array = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
    return array[None, None].to(device=device, dtype=dtype)


@dataclass
class SourceLatents:
    """An img2img / inpaint batch's source in latent space, before any noise is added."""

    image_latents: torch.Tensor  # the encoded source images (masked content "fill" painted in)
    init: torch.Tensor  # what is noised: image_latents with "latent noise" / "latent nothing" in the mask
    noise: torch.Tensor  # the batch's noise, drawn after the encoding
    mask: torch.Tensor | None = None  # (B, 1, h, w) in 0..1, 1 = redraw; None: plain img2img


def encode_source(request: Img2ImgRequest, model: LoadedModel, source: Img2ImgSource,
                  make_noise: Callable[[], torch.Tensor], generators: list[torch.Generator], device,
                  mask_resample: Image.Resampling = Image.Resampling.BILINEAR) -> SourceLatents:
    """Encode the init images and apply the masked content.

    Each image's generator first samples the VAE's latent distribution, then draws the noise (the order
    diffusers' img2img pipelines use, so the same seeds give the same images). ``mask_resample`` brings the
    mask to latent size.
    """
    dtype = model.unet.dtype
    images = masked_content(source, request.inpainting_fill)
    pixels = latent_ops.pil_to_tensor(images)
    image_latents = latent_ops.encode(model.vae, pixels, generators).to(device=device, dtype=dtype)
    noise = make_noise().to(device=device, dtype=dtype)
    if source.mask is None:
        return SourceLatents(image_latents, image_latents, noise)
    h, w = image_latents.shape[-2:]
    mask = latent_mask(source.mask, (h, w), device, dtype, mask_resample).expand(len(images), 1, h, w)
    init = image_latents
    if request.inpainting_fill == 2:  # latent noise
        init = init * (1 - mask) + noise * mask
    elif request.inpainting_fill == 3:  # latent nothing
        init = init * (1 - mask)
    return SourceLatents(image_latents, init, noise, mask)


def img2img_latents(request: Img2ImgRequest, model: LoadedModel, source: Img2ImgSource, scheduler,
                    make_noise: Callable[[], torch.Tensor], generators: list[torch.Generator], device):
    """Encode the init images, apply masked content, and noise them to the strength's first timestep
    (:func:`encode_source`). Returns (latents, timesteps, real steps, inpaint inputs or None).
    """
    dtype = model.unet.dtype
    start = encode_source(request, model, source, make_noise, generators, device)
    timesteps, real_steps = img2img_timesteps(scheduler, request.steps, request.denoising_strength, device)
    inpaint = None
    if start.mask is not None and source.mask is not None:
        mask, masked = start.mask, None
        if model.is_inpainting:
            # The inpainting UNet sees a hard mask and the picture with the redraw area blanked, as in training.
            mask = (mask >= 0.5).to(dtype)
            keep = torch.from_numpy(np.asarray(source.mask) < 128)[None, None].to(torch.float32)
            seeds = [int(g.initial_seed()) for g in generators]
            masked = latent_ops.encode(model.vae, latent_ops.pil_to_tensor(source.images) * keep,
                                       generators_for(seeds)).to(device=device, dtype=dtype)
        inpaint = InpaintLatents(mask=mask, image_latents=start.image_latents, noise=start.noise,
                                 masked_image_latents=masked)
    latents = scheduler.add_noise(start.init, start.noise, timesteps[:1].repeat(len(start.init))) \
        if len(timesteps) else start.init
    return latents, timesteps, real_steps, inpaint


def blank_inpaint_conditioning(model: LoadedModel, count: int, width: int, height: int, seeds: list[int],
                               device) -> InpaintLatents:
    """What an inpainting UNet sees when nothing is masked (txt2img, img2img): redraw everything, over
    the latents of a mid-grey picture, as A1111 does."""
    dtype = model.unet.dtype
    grey = torch.zeros(count, 3, height, width)
    masked = latent_ops.encode(model.vae, grey, generators_for(seeds)).to(device=device, dtype=dtype)
    mask = torch.ones(count, 1, *masked.shape[-2:], device=device, dtype=dtype)
    return InpaintLatents(mask=mask, image_latents=masked, noise=torch.zeros_like(masked),
                          masked_image_latents=masked)


def finish_inpaint(images: list[Image.Image], source: Img2ImgSource) -> list[Image.Image]:
    """Keep the original pixels outside the mask; for "Only masked", paste the crop back into the picture."""
    if source.mask is None:
        return images
    images = [imageops.composite(im, orig, source.mask) for im, orig in zip(images, source.originals)]
    if source.crop_box is None:
        return images
    if source.full_images is None or source.full_mask is None:
        raise ValueError("an \"Only masked\" img2img source (crop_box set) needs full_images and full_mask")
    x1, y1, x2, y2 = source.crop_box
    full_mask = source.full_mask.crop(source.crop_box)
    pasted = []
    for im, full in zip(images, source.full_images):
        patch = im.resize((x2 - x1, y2 - y1), imageops.LANCZOS)
        canvas = full.copy()
        canvas.paste(patch, (x1, y1), full_mask)
        pasted.append(canvas)
    return pasted


def img2img_infotext_params(request: Img2ImgRequest) -> dict[str, object]:
    extra: dict[str, object] = {}
    if request.mask is not None:
        extra["Mask blur"] = request.mask_blur
        extra["Inpaint area"] = "Only masked" if request.inpaint_full_res else None
        extra["Masked area padding"] = request.inpaint_full_res_padding if request.inpaint_full_res else None
        extra["Mask mode"] = "Inpaint not masked" if request.inpainting_mask_invert else None
        extra["Masked content"] = INPAINTING_FILL[request.inpainting_fill]
    if request.resize_mode:
        extra["Resize mode"] = RESIZE_MODES[request.resize_mode]
    return extra


