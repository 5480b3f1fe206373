"""Pixel-space operations of img2img and inpaint: resize modes, masks, masked-content fill, crop and paste."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from scipy.ndimage import uniform_filter

LANCZOS = Image.Resampling.LANCZOS


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """Bring ``image`` to width x height the way A1111's resize modes do.

    0 just resize (stretch), 1 crop and resize (cover, centre crop), 2 resize and fill (fit, then fill the
    borders with the stretched edge pixels), 3 latent upscale (stretched here; the engine resizes latents).
    """
    image = image.convert("RGB")
    if mode in (0, 3):
        return image.resize((width, height), LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        return ImageOps.fit(image, (width, height), LANCZOS)
    if mode != 2:
        raise ValueError(f"resize_mode must be 0, 1, 2 or 3, got {mode}")
    if ratio < src_ratio:  # image is wider: fit width, fill top and bottom
        fit_w, fit_h = width, max(1, round(width / src_ratio))
    else:
        fit_w, fit_h = max(1, round(height * src_ratio)), height
    resized = image.resize((fit_w, fit_h), LANCZOS)
    result = Image.new("RGB", (width, height))
    x, y = (width - fit_w) // 2, (height - fit_h) // 2
    result.paste(resized, (x, y))
    if y > 0:
        result.paste(resized.crop((0, 0, fit_w, 1)).resize((fit_w, y)), (x, 0))
        bottom = height - y - fit_h
        if bottom > 0:
            result.paste(resized.crop((0, fit_h - 1, fit_w, fit_h)).resize((fit_w, bottom)), (x, y + fit_h))
    if x > 0:
        result.paste(result.crop((x, 0, x + 1, height)).resize((x, height)), (0, 0))
        right = width - x - fit_w
        if right > 0:
            result.paste(result.crop((x + fit_w - 1, 0, x + fit_w, height)).resize((right, height)), (x + fit_w, 0))
    return result


def prepare_mask(mask: Image.Image, *, invert: bool, blur: int) -> Image.Image:
    """The mask as "L" (255 = redraw), inverted if asked, edges blurred by ``blur`` pixels."""
    if mask.mode in ("RGBA", "LA"):
        # A mask drawn in a browser arrives as strokes on transparency: the alpha channel is the mask.
        alpha = mask.getchannel("A")
        mask = alpha if alpha.getextrema() != (255, 255) else mask.convert("L")
    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def mask_bbox(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box around the mask's redraw area, padded, clipped to the image; None when nothing is masked."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height))


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int, limit: tuple[int, int]):
    """Grow ``box`` to the aspect ratio width:height (so the crop is not distorted), inside the image."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    ratio = width / height
    if bw / bh < ratio:
        grow = round(bh * ratio) - bw
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = round(bw / ratio) - bh
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    lw, lh = limit
    if x2 > lw:
        x1, x2 = x1 - (x2 - lw), lw
    if x1 < 0:
        x2, x1 = min(x2 - x1, lw), 0
    if y2 > lh:
        y1, y2 = y1 - (y2 - lh), lh
    if y1 < 0:
        y2, y1 = min(y2 - y1, lh), 0
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": paint the redraw area with colours spread in from around it.

    Repeated normalised blurs of the kept pixels, from wide to narrow, so the area holds the surrounding
    colours rather than the original content.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = (np.asarray(mask, dtype=np.float32) < 128).astype(np.float32)[..., None]
    filled = rgb * keep
    for radius in (256, 64, 16, 4, 1):
        blurred = _blur(rgb * keep, radius)
        weight = _blur(np.repeat(keep, 3, axis=2), radius)
        spread = np.where(weight > 1e-4, blurred / np.maximum(weight, 1e-4), 0)
        filled = np.where(keep > 0, rgb, np.where(weight > 1e-4, spread, filled))
    return Image.fromarray(filled.clip(0, 255).astype(np.uint8))


def _blur(array: np.ndarray, radius: int) -> np.ndarray:
    """Box blur of an (H, W, C) float array over H and W."""
    return uniform_filter(array, size=(2 * radius + 1, 2 * radius + 1, 1), mode="nearest")


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Put the generated pixels where the mask says redraw and keep the original elsewhere."""
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))
