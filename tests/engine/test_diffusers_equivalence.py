"""Our engine gives the same images as plain diffusers pipelines with the same settings (issue 2's 'done')."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from pipelines.sampling.samplers import build_scheduler
from tests.fixtures.pictures import picture
from tests.helpers import img2img, pixels, txt2img


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _max_diff(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("checkpoint, pipeline_class", [
    ("tiny-sd15.safetensors", StableDiffusionPipeline),
    ("tiny-sd21-v.safetensors", StableDiffusionPipeline),
    ("tiny-sdxl.safetensors", StableDiffusionXLPipeline),
])
@pytest.mark.parametrize("sampler, schedule", [("Euler a", "Automatic"), ("DPM++ 2M", "Karras"),
                                               ("DPM++ 2M SDE", "Karras")])  # step noise drawn by us
def test_txt2img_equals_plain_diffusers(engine, checkpoint, pipeline_class, sampler, schedule):
    request = txt2img(checkpoint=checkpoint, sampler_name=sampler, scheduler=schedule, batch_size=2, seed=21,
                      steps=5, width=64, height=64)
    ours = engine.generate(request).images
    model = engine.models.get(checkpoint)
    pipe = pipeline_class(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler(sampler, schedule, model.scheduler_config)
    theirs = pipe(prompt=[request.prompt] * 2, negative_prompt=[request.negative_prompt] * 2,
                  num_inference_steps=request.steps, guidance_scale=request.cfg_scale, width=64, height=64,
                  generator=_generators([21, 22])).images
    assert _max_diff(ours, theirs) <= 1


def test_img2img_equals_plain_diffusers(engine):
    request = img2img(denoising_strength=0.6, steps=10, batch_size=2, seed=8, sampler_name="Euler")
    ours = engine.generate(request).images
    model = engine.models.get(request.checkpoint)
    pipe = StableDiffusionImg2ImgPipeline(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("Euler", "Automatic", model.scheduler_config)
    theirs = pipe(prompt=[request.prompt] * 2, negative_prompt=[""] * 2, image=picture(), strength=0.6,
                  num_inference_steps=10, guidance_scale=request.cfg_scale, generator=_generators([8, 9])).images
    assert _max_diff(ours, theirs) <= 1
