"""Synthetic pictures and masks for the tests: structure the eye (and a diff) can follow."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def picture(size=(64, 64)) -> Image.Image:
    """A synthetic picture with structure: gradient, a circle and a bar."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)
    array = np.stack([np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 128, np.uint8)], axis=2)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(250, 30, 30))
    draw.rectangle((0, h - 10, w, h), fill=(0, 0, 0))
    return image


def half_mask(size=(64, 64)) -> Image.Image:
    """White (redraw) on the left half, black (keep) on the right."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size[0] // 2 - 1, size[1]), fill=255)
    return mask
