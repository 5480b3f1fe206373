"""img2img's sketch sub-tabs: what a colour painting on the picture turns into (init image and mask).

*Sketch*: the painted picture is the init image. *Inpaint sketch* (A1111's mode 3): the painted colours are
both the mask (every pixel that differs from the original picture) and the colour guide: the init image is
the original with the painting laid over it, softened at the edges by the mask blur. The engine then
inpaints with that mask as usual (mask blur, masked content, inpaint area and padding apply).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def sketch_init_image(painted: Image.Image) -> Image.Image:
    """The Sketch sub-tab: the painted picture, as RGB, is the init image."""
    return painted.convert("RGB")


def inpaint_sketch(painted: Image.Image, original: Image.Image | None, *, mask_blur: int,
                   mask_alpha: float = 0.0) -> tuple[Image.Image, Image.Image]:
    """(init image, mask) from an inpaint sketch, as A1111 derives them.

    ``painted`` is the picture with the painting on it, ``original`` the picture before (None: nothing to
    compare with, so nothing is masked). The mask is white where the two differ, scaled down by
    ``mask_alpha`` (A1111's "Mask transparency", 0..100: 0 redraws fully, 100 keeps the original); the init
    image is ``painted`` (blurred by ``mask_blur``) over ``original`` through the mask blurred the same way.
    """
    if not 0 <= mask_alpha <= 100:
        raise ValueError(f"mask_alpha: the mask transparency is 0 to 100, got {mask_alpha}")
    painted = painted.convert("RGB")
    original = painted if original is None else original.convert("RGB")
    if original.size != painted.size:
        original = original.resize(painted.size, Image.Resampling.LANCZOS)
    changed = np.any(np.asarray(painted) != np.asarray(original), axis=-1)
    mask = Image.fromarray(changed.astype(np.uint8) * 255, "L")
    mask = ImageEnhance.Brightness(mask).enhance(1 - mask_alpha / 100)
    blur = ImageFilter.GaussianBlur(mask_blur)
    image = Image.composite(painted.filter(blur), original, mask.filter(blur))
    return image.convert("RGB"), mask
