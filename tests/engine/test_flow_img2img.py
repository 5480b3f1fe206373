"""img2img, inpaint and Hires. fix of the flow-matching families (Flux.1, SD 3.5) through the engine: the pixels of
plain diffusers' img2img / inpaint pipelines on the same tiny models with the same generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
)

from pipelines.images.infotext import parse_infotext
from pipelines.job_control import JobControl
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.sampling import flow_img2img
from tests.fixtures.pictures import half_mask, picture
from tests.fixtures.tiny_flux import tiny_flux_pipeline
from tests.fixtures.tiny_sd3 import tiny_sd3_pipeline
from tests.helpers import pixels

PROMPT = "a photo of a cat"
#: (checkpoint, the diffusers call arguments beyond the common ones) per family.
FAMILIES = {
    "flux": ("tiny-flux-dev-diffusers", {"guidance_scale": 3.5}),
    "sd3": ("tiny-sd35-diffusers", {"guidance_scale": 4.5, "negative_prompt": ["blurry"] * 2}),
}


def _reference(family: str, flow_models, cls, seeds: list[int], **kwargs):
    """Plain diffusers' ``cls`` pipeline on the family's tiny models."""
    paths = flow_models[1][family]
    base = tiny_flux_pipeline(True, paths["t5_tokenizer"]) if family == "flux" else \
        tiny_sd3_pipeline(True, paths["t5_tokenizer"])
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    extra = FAMILIES[family][1]
    extra = {**extra, "negative_prompt": extra["negative_prompt"][: len(seeds)]} if "negative_prompt" in extra \
        else extra
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    if cls is not StableDiffusion3InpaintPipeline:
        return pipe(prompt=[PROMPT] * len(seeds), height=64, width=64, generator=generators, **extra, **kwargs).images
    # diffusers' SD 3 inpaint pipeline decodes without the VAE's shift_factor (its other SD 3 pipelines add it):
    # its latents are compared, decoded as StableDiffusion3Pipeline decodes them.
    latents = pipe(prompt=[PROMPT] * len(seeds), height=64, width=64, generator=generators, output_type="latent",
                   **extra, **kwargs).images
    config = pipe.vae.config
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def _img2img(family: str, **fields) -> Img2ImgRequest:
    negative = {"negative_prompt": "blurry"} if family == "sd3" else {}
    return Img2ImgRequest(**{"prompt": PROMPT, **negative, "seed": 5, "steps": 4, "width": 64, "height": 64,
                             "checkpoint": FAMILIES[family][0], "init_images": [picture()],
                             "save_images": False, **fields})


def _max_diff(ours, theirs, region=np.s_[:, :]) -> int:
    return max(int(np.abs(pixels(a)[region] - pixels(b)[region]).max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_img2img_equals_plain_diffusers(flow_engine, flow_models, family):
    cls = FluxImg2ImgPipeline if family == "flux" else StableDiffusion3Img2ImgPipeline
    # 4 steps at 0.6: diffusers' flow pipelines run 3 (A1111's UNet rule would run 2)
    result = flow_engine.generate(_img2img(family, denoising_strength=0.6, batch_size=2))
    # one image per generator: diffusers encodes a single image once, with the first generator only
    theirs = _reference(family, flow_models, cls, [5, 6], image=[picture()] * 2, strength=0.6, num_inference_steps=4)
    assert _max_diff(result.images, theirs) <= 1
    assert result.seeds == [5, 6]
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Denoising strength"] == 0.6 and parsed["Steps"] == 4


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_inpaint_equals_plain_diffusers_inside_the_mask_and_keeps_the_rest(flow_engine, flow_models, family):
    cls = FluxInpaintPipeline if family == "flux" else StableDiffusion3InpaintPipeline
    result = flow_engine.generate(_img2img(family, denoising_strength=0.8, mask=half_mask(), mask_blur=0,
                                           inpainting_fill=1))
    theirs = _reference(family, flow_models, cls, [5], image=picture(), mask_image=half_mask(), strength=0.8,
                        num_inference_steps=4)
    masked, kept = np.s_[:, :32], np.s_[:, 32:]
    assert _max_diff(result.images, theirs, masked) <= 1  # redrawn as diffusers redraws it
    assert _max_diff(result.images, [picture()], kept) == 0  # the original outside the mask (A1111's paste-back)
    assert parse_infotext(result.infotexts[0])["Masked content"] == "original"



def test_the_source_is_noised_as_flow_match_euler_noises_it():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    torch.manual_seed(0)
    source, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    start = flow_img2img.FlowStart(scheduler, scheduler.timesteps, noise, None, 1.0)
    for index in (0, 2, 5):
        scheduler.set_begin_index(index)
        expected = scheduler.scale_noise(source, scheduler.timesteps[index:index + 1].repeat(2), noise)
        assert torch.allclose(start.noised(source, index), expected)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "UniPC"])
def test_img2img_inpaint_and_hires_run_on_the_multistep_flow_samplers(flow_engine, family, sampler):
    euler = flow_engine.generate(_img2img(family, denoising_strength=0.7, mask=half_mask(), mask_blur=0)).images
    result = flow_engine.generate(_img2img(family, sampler_name=sampler, denoising_strength=0.7, mask=half_mask(),
                                           mask_blur=0))
    assert parse_infotext(result.infotexts[0])["Sampler"] == sampler and not result.warnings
    assert _max_diff(result.images, euler) > 0  # the sampler really ran
    assert _max_diff(result.images, [picture()], np.s_[:, 32:]) == 0  # and inpaint kept the rest
    hires = flow_engine.generate(GenerationRequest(prompt=PROMPT, seed=5, steps=3, width=64, height=64,
                                                   save_images=False, checkpoint=FAMILIES[family][0],
                                                   sampler_name=sampler, enable_hr=True, hr_scale=1.5,
                                                   hr_upscaler="Latent", denoising_strength=0.6))
    assert hires.images[0].size == (96, 96) and pixels(hires.images[0]).std() > 1

def test_inpaint_options_change_only_the_masked_part(flow_engine):
    plain = flow_engine.generate(_img2img("flux", mask=half_mask(), mask_blur=0, inpainting_fill=1)).images
    for options in ({"inpainting_fill": 2}, {"inpainting_fill": 3}, {"inpainting_fill": 0},
                    {"inpainting_fill": 1, "mask_blur": 4}):
        other = flow_engine.generate(_img2img("flux", mask=half_mask(), **{"mask_blur": 0, **options})).images
        assert _max_diff(other, plain) > 0, options
        assert _max_diff(other, [picture()], np.s_[:, 48:]) == 0, options  # past the blur
    inverted = flow_engine.generate(_img2img("flux", mask=half_mask(), mask_blur=0, inpainting_fill=1,
                                             inpainting_mask_invert=True)).images
    assert _max_diff(inverted, [picture()], np.s_[:, :32]) == 0 and _max_diff(inverted, [picture()]) > 0


def test_only_masked_pastes_the_crop_back(flow_engine):
    mask = half_mask().crop((0, 0, 64, 64))
    mask.paste(0, (0, 0, 64, 32))  # the lower-left quarter only
    result = flow_engine.generate(_img2img("sd3", mask=mask, mask_blur=0, inpaint_full_res=True,
                                           inpaint_full_res_padding=8))
    assert result.images[0].size == (64, 64)
    assert _max_diff(result.images, [picture()], np.s_[:32, :]) == 0
    assert _max_diff(result.images, [picture()], np.s_[32:, :32]) > 0
    assert parse_infotext(result.infotexts[0])["Inpaint area"] == "Only masked"


def test_batch_of_source_images_and_batch_count(flow_engine):
    flipped = picture().transpose(0)
    result = flow_engine.generate(_img2img("flux", init_images=[picture(), flipped], batch_size=2, n_iter=2))
    assert len(result.images) == 4 and result.seeds == [5, 6, 7, 8]
    one = flow_engine.generate(_img2img("flux", init_images=[flipped], seed=6)).images
    assert _max_diff(result.images[1:2], one) <= 1  # each image: its own source and its own CPU noise


def test_real_steps_progress_and_interrupt(flow_engine):
    assert flow_img2img.real_steps(4, 0.6) == 3 and flow_img2img.real_steps(10, 0.5) == 5
    assert flow_img2img.schedule_for(3, 0.6) == 4 and flow_img2img.schedule_for(5, 0.35) == 12
    control = JobControl()
    original, seen = control.update, []

    def record(**fields):
        original(**fields)
        seen.append(fields)
        if fields.get("step") == 1 and "preview" in fields:
            control.interrupt()

    control.update = record
    result = flow_engine.generate(_img2img("sd3", denoising_strength=0.6), control=control)
    assert result.interrupted and len(result.images) == 1
    assert any(fields.get("steps") == 3 for fields in seen)  # 3 of the 4 steps really run
    assert _max_diff(result.images, flow_engine.generate(_img2img("sd3", denoising_strength=0.6)).images) > 0


@pytest.mark.parametrize("family, upscaler", [("flux", "Latent"), ("sd3", "Lanczos"), ("flux", "Lanczos")])
def test_hires_fix_gives_the_hires_size_and_infotext(flow_engine, family, upscaler):
    negative = {"negative_prompt": "blurry"} if family == "sd3" else {}
    request = GenerationRequest(prompt=PROMPT, **negative, seed=3, steps=2, width=64, height=64,
                                checkpoint=FAMILIES[family][0], save_images=False, enable_hr=True, hr_scale=1.5,
                                hr_upscaler=upscaler, hr_second_pass_steps=2, denoising_strength=0.5,
                                hr_prompt="a photo of a dog")
    control = JobControl()
    original, steps = control.update, []

    def record(**fields):
        original(**fields)
        steps.append(fields.get("steps"))

    control.update = record
    result = flow_engine.generate(request, control=control)
    assert result.images[0].size == (96, 96) and not result.interrupted
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Hires upscale"] == 1.5 and parsed["Hires upscaler"] == upscaler
    assert parsed["Hires steps"] == 2 and parsed["Denoising strength"] == 0.5
    assert parsed["Hires prompt"] == "a photo of a dog" and parsed["Size"] == "64x64"
    assert steps.count(2) >= 2  # the first pass's 2 steps, then the hires pass's 2 real steps
    other = flow_engine.generate(request.model_copy(update={"hr_prompt": ""}))
    assert _max_diff(result.images, other.images) > 0  # the hires prompt conditions the second pass


def test_hires_size_not_a_multiple_of_16_is_refused(flow_engine):
    from pipelines.plan import RequestError

    with pytest.raises(RequestError, match="multiple of 16") as error:
        flow_engine.plan(GenerationRequest(prompt=PROMPT, width=64, height=64, checkpoint=FAMILIES["flux"][0],
                                           enable_hr=True, hr_scale=1.4))  # 88x88
    assert error.value.field == "hr_scale"


def test_hires_pass_on_a_checkpoint_of_the_other_family(flow_engine):
    request = GenerationRequest(prompt=PROMPT, seed=3, steps=2, width=64, height=64, checkpoint=FAMILIES["flux"][0],
                                save_images=False, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                denoising_strength=0.5, hr_checkpoint_name=FAMILIES["sd3"][0])
    result = flow_engine.generate(request)
    same = flow_engine.generate(request.model_copy(update={"hr_checkpoint_name": None}))
    assert result.images[0].size == (96, 96) and _max_diff(result.images, same.images) > 0
    assert parse_infotext(result.infotexts[0])["Hires checkpoint"] == "tiny-sd35-diffusers"
