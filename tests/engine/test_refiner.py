"""The refiner (issue 17): SDXL refiner checkpoints load, take over the denoising at "Switch at", and match
diffusers' base (denoising_end) + refiner (denoising_start) pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.models.checkpoints import load_checkpoint
from pipelines.plan import RequestError
from pipelines.sampling.refiner import completed_ratio, refined_passes
from pipelines.sampling.samplers import build_scheduler
from tests.fixtures import tiny_models as tiny
from tests.helpers import SDXL, img2img, pixels, txt2img

REFINER = "tiny-sdxl-refiner.safetensors"
REFINER_FOLDER = "tiny-sdxl-refiner-diffusers"


def _max_diff(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs, strict=True))


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@pytest.mark.parametrize("name", [REFINER, REFINER_FOLDER])
def test_refiner_files_load_offline_with_their_weights(tiny_models, tmp_path, name):
    pipe, family = load_checkpoint(tiny_models / "Stable-diffusion" / name, torch_dtype=torch.float32,
                                   cache_dir=tmp_path)
    assert isinstance(pipe, StableDiffusionXLImg2ImgPipeline)
    assert (family.name, family.refiner, family.inpainting) == ("sdxl", True, False)
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.tokenizer_2.pad_token == "!"
    assert pipe.config.requires_aesthetics_score is True and pipe.config.force_zeros_for_empty_prompt is False
    reference = tiny.tiny_components("sdxl_refiner")
    for component in ("unet", "vae", "text_encoder_2"):
        got, want = getattr(pipe, component).state_dict(), reference[component].state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key].float(), want[key]) for key in want), component


def test_a1111_switch_rule():
    # (999 - t) / 1000 of the step's timestep reaches "Switch at": at 0.8 the refiner runs t <= 199.
    assert completed_ratio(199) >= 0.8 > completed_ratio(201)
    assert completed_ratio(0) < 1.0  # 1.0 never switches
    assert refined_passes(False, "second pass") == (True, False)
    assert refined_passes(True, "second pass") == (False, True)
    assert refined_passes(True, "first pass") == (True, False)
    assert refined_passes(True, "both passes") == (True, True)


def test_refiner_changes_the_image_and_writes_a1111_keys(engine):
    plain = engine.generate(txt2img(checkpoint=SDXL, steps=10))
    refined = engine.generate(txt2img(checkpoint=SDXL, steps=10, refiner_checkpoint=REFINER))
    assert _max_diff(plain.images, refined.images) > 0
    refiner = engine.registry.find_checkpoint(REFINER)
    params = parse_infotext(refined.infotexts[0])
    assert params["Refiner"] == f"tiny-sdxl-refiner [{refiner.short_hash}]"
    assert params["Refiner switch at"] == 0.8
    assert params["Model"] == "tiny-sdxl"  # the job's checkpoint stays the model of record
    assert "Refiner" not in parse_infotext(plain.infotexts[0])


def test_switch_at_one_is_no_refiner(engine):
    plain = engine.generate(txt2img(checkpoint=SDXL, steps=6, batch_size=2))
    never = engine.generate(txt2img(checkpoint=SDXL, steps=6, batch_size=2, refiner_checkpoint=REFINER,
                                    refiner_switch_at=1.0))
    assert _max_diff(plain.images, never.images) == 0
    assert never.infotexts == plain.infotexts  # A1111 writes the keys only once the refiner took over


@pytest.mark.parametrize("refiner_name", [REFINER, REFINER_FOLDER])
@pytest.mark.parametrize("switch_at", [0.8, 0.5])
def test_equals_diffusers_base_then_refiner(engine, refiner_name, switch_at):
    request = txt2img(checkpoint=SDXL, steps=10, batch_size=2, seed=31, sampler_name="Euler",
                      refiner_checkpoint=refiner_name, refiner_switch_at=switch_at)
    ours = engine.generate(request)
    assert parse_infotext(ours.infotexts[0])["Refiner switch at"] == switch_at
    base = engine.models.get(SDXL)
    base_pipe = StableDiffusionXLPipeline(**base.pipe.components)
    base_pipe.scheduler = build_scheduler("Euler", "Automatic", base.scheduler_config)
    refiner = engine.models.get(refiner_name)
    refiner_pipe = StableDiffusionXLImg2ImgPipeline(**refiner.pipe.components, requires_aesthetics_score=True,
                                                    force_zeros_for_empty_prompt=False)
    refiner_pipe.scheduler = build_scheduler("Euler", "Automatic", refiner.scheduler_config)
    for pipe in (base_pipe, refiner_pipe):
        pipe.set_progress_bar_config(disable=True)
    prompts, negatives = [request.prompt] * 2, [request.negative_prompt] * 2
    latents = base_pipe(prompt=prompts, negative_prompt=negatives, num_inference_steps=10, width=64, height=64,
                        guidance_scale=request.cfg_scale, denoising_end=switch_at, output_type="latent",
                        generator=_generators([31, 32])).images
    theirs = refiner_pipe(prompt=prompts, negative_prompt=negatives, image=latents, num_inference_steps=10,
                          guidance_scale=request.cfg_scale, denoising_start=switch_at,
                          generator=_generators([31, 32])).images
    assert _max_diff(ours.images, theirs) <= 1


def test_img2img_with_refiner(engine):
    plain = engine.generate(img2img(checkpoint=SDXL, steps=10, denoising_strength=0.6))
    refined = engine.generate(img2img(checkpoint=SDXL, steps=10, denoising_strength=0.6,
                                      refiner_checkpoint=REFINER, refiner_switch_at=0.7))
    assert _max_diff(plain.images, refined.images) > 0
    params = parse_infotext(refined.infotexts[0])
    assert params["Refiner switch at"] == 0.7 and params["Refiner"].startswith("tiny-sdxl-refiner [")


def test_hires_fix_refines_the_passes_the_option_names(engine):
    hires = dict(checkpoint=SDXL, steps=5, enable_hr=True, hr_scale=1.5, denoising_strength=0.6, seed=5)
    images, keys = {}, {}
    for which in (None, "first pass", "second pass", "both passes"):
        options = engine.options.with_overrides({"hires_fix_refiner_pass": which or "second pass"})
        result = engine.generate(txt2img(**hires, refiner_checkpoint=REFINER if which else None), options=options)
        images[which] = result.images
        params = parse_infotext(result.infotexts[0])
        keys[which] = (params.get("Refiner", "").split(" [")[0], params.get("Hires refiner"))
    assert keys == {None: ("", None), "first pass": ("tiny-sdxl-refiner", "first pass"),
                    "second pass": ("tiny-sdxl-refiner", None), "both passes": ("tiny-sdxl-refiner", "both passes")}
    names = list(images)
    for i, a in enumerate(names):  # each choice refines other passes: four different images
        for b in names[i + 1:]:
            assert _max_diff(images[a], images[b]) > 0, (a, b)


def test_unknown_refiner_names_the_field_and_the_choices(engine):
    with pytest.raises(RequestError) as caught:
        engine.plan(txt2img(checkpoint=SDXL, refiner_checkpoint="no-such-refiner"))
    assert caught.value.field == "refiner_checkpoint"
    message = str(caught.value)
    assert message.startswith("refiner_checkpoint:") and "tiny-sdxl-refiner.safetensors" in message


@pytest.mark.parametrize("value", [None, "", "None", "none"])
def test_none_means_no_refiner(engine, value):
    assert engine.plan(txt2img(checkpoint=SDXL, refiner_checkpoint=value)).refiner is None


def test_refiner_of_another_latent_space_is_refused(engine):
    from pipelines.models.weights import ModelFileError

    with pytest.raises(ModelFileError) as caught:
        engine.generate(txt2img(checkpoint="tiny-sd15.safetensors", refiner_checkpoint=REFINER))
    assert caught.value.field == "refiner_checkpoint" and "latent space" in str(caught.value)


def test_cache_of_one_reloads_the_base_for_each_batch(engine_factory, engine):
    request = txt2img(checkpoint=SDXL, steps=6, n_iter=2, refiner_checkpoint=REFINER)
    small = engine_factory(checkpoint_cache=1).generate(request)
    assert _max_diff(small.images, engine.generate(request).images) == 0
    assert all("Refiner: tiny-sdxl-refiner" in text for text in small.infotexts)


def test_infotext_round_trip():
    text = ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny-sdxl, "
            "Refiner: tiny-sdxl-refiner [998af32f4e], Refiner switch at: 0.75")
    fields = request_fields_from_infotext(parse_infotext(text))
    assert fields["refiner_checkpoint"] == "tiny-sdxl-refiner [998af32f4e]"
    assert fields["refiner_switch_at"] == 0.75
    assert "extra" not in fields
