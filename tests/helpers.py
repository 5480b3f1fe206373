"""What many tests share: the tiny checkpoints' names, small generation requests and API bodies.

The checkpoints are written by ``tests/fixtures/tiny_models.py`` (fixture ``tiny_models``). The builders
take keyword overrides, so a test spells out only what it is about::

    engine.generate(txt2img(sampler_name="DDIM", steps=2))
    requests.post(f"{url}/sdapi/v1/txt2img", json=payload(prompt="a cat", seed=7))
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.request import GenerationRequest, Img2ImgRequest
from tests.fixtures.pictures import picture

SD15 = "tiny-sd15.safetensors"
SD21 = "tiny-sd21-v.safetensors"
SDXL = "tiny-sdxl.safetensors"
SD15_INPAINTING = "tiny-sd15-inpainting.safetensors"
SD15_DIFFUSERS = "tiny-sd15-diffusers"
#: One checkpoint of each family and layout: SD 1.5, SD 2.1 (v-prediction), SDXL, inpainting, diffusers folder.
CHECKPOINTS = [SD15, SD21, SDXL, SD15_INPAINTING, SD15_DIFFUSERS]


def txt2img(**overrides) -> GenerationRequest:
    """A small txt2img request (64x64, 4 Euler steps, seed 1234, SD 1.5, not saved) with ``overrides``."""
    base = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, width=64, height=64, seed=1234,
                checkpoint=SD15, sampler_name="Euler", save_images=False)
    return GenerationRequest(**{**base, **overrides})


def img2img(**overrides) -> Img2ImgRequest:
    """A small img2img request on :func:`tests.fixtures.pictures.picture` (denoising 0.5) with ``overrides``."""
    base = dict(prompt="a painting", steps=4, width=64, height=64, seed=3, checkpoint=SD15, sampler_name="Euler",
                init_images=[picture()], denoising_strength=0.5, save_images=False)
    return Img2ImgRequest(**{**base, **overrides})


def payload(**overrides) -> dict:
    """The smallest HTTP API body (64x64, 4 steps) with ``overrides``."""
    return {"steps": 4, "width": 64, "height": 64, **overrides}


def pixels(image: Image.Image) -> np.ndarray:
    """An image's pixels as signed integers, ready to subtract."""
    return np.asarray(image, dtype=np.int16)
