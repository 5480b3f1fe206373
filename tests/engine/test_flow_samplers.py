"""Flow-matching samplers, schedule types, Shift and Forge's "Module N" keys on Flux.1 and SD 3.5.

What is compared: our engine's pixels with plain diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline`` on the
same tiny model, prompt and generators, the pipeline given the scheduler class in its flow mode, built here from the
model's scheduler config (not by our module). The pipelines set the timesteps themselves: FluxPipeline passes its
sigmas ``linspace(1, 1/steps)`` (dropped for the ``use_flow_sigmas`` classes) and ``mu``; SD3 passes neither.
FluxPipeline always passes ``mu``, which DPMSolverMultistepScheduler takes only with dynamic shifting, so for a fixed
shift ``s`` (schnell's 1, or a request's Shift) that reference uses dynamic shifting with ``base_shift = max_shift =
ln(s)``: ``mu = ln(s)`` and its ``flow_shift = exp(mu) = s``, the same schedule written in the pipeline's terms.
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.models.families import flux, sd3
from pipelines.request import GenerationRequest
from tests.fixtures.tiny_flux import tiny_flux_pipeline
from tests.fixtures.tiny_sd3 import tiny_sd3_pipeline
from tests.helpers import pixels

FLUX_MODULES = ["clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]
#: The diffusers class and the options that put it in flow mode, written out here independently of the engine.
CLASSES = {
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True,
                                                 "prediction_type": "flow_prediction"}),
    "UniPC": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
SCHEDULE_OPTIONS = {"Simple": {}, "Karras": {"use_karras_sigmas": True},
                    "Exponential": {"use_exponential_sigmas": True}, "Beta": {"use_beta_sigmas": True}}


def _request(**fields) -> GenerationRequest:
    # SD 3.5 runs real CFG with the negative prompt; Flux.1 (CFG scale 1) has none.
    negative = "blurry" if "sd35" in fields.get("checkpoint", "") else ""
    return GenerationRequest(**{"prompt": "a photo of a cat", "negative_prompt": negative, "seed": 5, "steps": 4,
                                "width": 64, "height": 64, "save_images": False, **fields})


def _scheduler(sampler: str, schedule: str, config: dict, shift: float | None, *, flux_pipeline: bool):
    """The scheduler handed to the diffusers pipeline (see the module docstring)."""
    name, options = CLASSES[sampler]
    # Private keys dropped: diffusers' "_use_default_values" would undo the schedule's option.
    config = {**{k: v for k, v in config.items() if not k.startswith("_")}, **options, **SCHEDULE_OPTIONS[schedule]}
    if shift:
        config.update(shift=shift, use_dynamic_shifting=False)
    fixed = config["shift"]
    if "use_flow_sigmas" in options:
        config["flow_shift"] = fixed
        if flux_pipeline and name == "DPMSolverMultistepScheduler" and not config.get("use_dynamic_shifting"):
            config.update(use_dynamic_shifting=True, base_shift=math.log(fixed), max_shift=math.log(fixed))
    return getattr(diffusers, name).from_config(config)


def _flux_reference(guidance: bool, tokenizer_dir, sampler: str, schedule: str, shift: float | None):
    pipe = tiny_flux_pipeline(guidance, tokenizer_dir)
    pipe.scheduler = _scheduler(sampler, schedule, dict(pipe.scheduler.config), shift, flux_pipeline=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a photo of a cat"], num_inference_steps=4, height=64, width=64,
                guidance_scale=3.5, generator=[torch.Generator("cpu").manual_seed(5)]).images


def _sd3_reference(tokenizer_dir, sampler: str, schedule: str, shift: float | None):
    pipe = tiny_sd3_pipeline(True, tokenizer_dir)
    pipe.scheduler = _scheduler(sampler, schedule, dict(pipe.scheduler.config), shift, flux_pipeline=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a photo of a cat"], negative_prompt=["blurry"], num_inference_steps=4, height=64, width=64,
                guidance_scale=4.5, generator=[torch.Generator("cpu").manual_seed(5)]).images


def _max_diff(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs, strict=True))


CASES = [("Euler", "Simple", None), ("DPM++ 2M", "Simple", None), ("UniPC", "Simple", None),
         ("Euler", "Karras", None), ("Euler", "Exponential", 2.0), ("Euler", "Beta", None),
         ("DPM++ 2M", "Simple", 2.0), ("UniPC", "Simple", 2.0)]


@pytest.mark.parametrize("sampler, schedule, shift", CASES)
def test_flux_dev_equals_flux_pipeline(flow_engine, flow_models, sampler, schedule, shift):
    result = flow_engine.generate(_request(checkpoint="tiny-flux-dev-diffusers", sampler_name=sampler,
                                           scheduler=schedule, shift=shift))
    assert not result.warnings
    theirs = _flux_reference(True, flow_models[1]["flux"]["t5_tokenizer"], sampler, schedule, shift)
    assert _max_diff(result.images, theirs) <= 1
    parsed = parse_infotext(result.infotexts[0])
    assert (parsed["Sampler"], parsed["Schedule type"], parsed.get("Shift")) == (sampler, schedule, shift)


@pytest.mark.parametrize("sampler, shift", [("DPM++ 2M", None), ("UniPC", None), ("Euler", 2.0)])
def test_flux_schnell_equals_flux_pipeline(flow_engine, flow_models, sampler, shift):
    result = flow_engine.generate(_request(checkpoint="tiny-flux-schnell", additional_modules=FLUX_MODULES,
                                           sampler_name=sampler, scheduler="Simple", shift=shift))
    theirs = _flux_reference(False, flow_models[1]["flux"]["t5_tokenizer"], sampler, "Simple", shift)
    assert _max_diff(result.images, theirs) <= 1


@pytest.mark.parametrize("sampler, schedule, shift", CASES)
def test_sd3_equals_sd3_pipeline(flow_engine, flow_models, sampler, schedule, shift):
    result = flow_engine.generate(_request(checkpoint="tiny-sd35-diffusers", sampler_name=sampler, scheduler=schedule,
                                           shift=shift))
    assert not result.warnings
    theirs = _sd3_reference(flow_models[1]["sd3"]["t5_tokenizer"], sampler, schedule, shift)
    assert _max_diff(result.images, theirs) <= 1


@pytest.mark.parametrize("checkpoint", ["tiny-flux-dev-diffusers", "tiny-sd35-diffusers"])
def test_samplers_and_shift_change_the_image(flow_engine, checkpoint):
    # The comparisons above would pass with one scheduler for all: the samplers and a shift must differ.
    images = [flow_engine.generate(_request(checkpoint=checkpoint, sampler_name=sampler)).images
              for sampler in CLASSES]
    shifted = flow_engine.generate(_request(checkpoint=checkpoint, shift=6.0)).images
    assert all(_max_diff(a, b) > 0 for i, a in enumerate(images) for b in images[i + 1:] + [shifted])


def test_shift_and_modules_round_trip_through_the_infotext(flow_engine):
    result = flow_engine.generate(_request(checkpoint="tiny-flux-schnell", additional_modules=FLUX_MODULES, shift=2.5,
                                           sampler_name="UniPC"))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Shift"] == 2.5
    assert [parsed[f"Module {n}"] for n in (1, 2, 3)] == ["clip_l", "t5xxl_fp16", "ae"]
    fields = request_fields_from_infotext(parsed)
    assert fields["shift"] == 2.5 and fields["additional_modules"] == ["clip_l", "t5xxl_fp16", "ae"]
    assert "extra" not in fields or not any(key.startswith("Module") for key in fields["extra"])
    known = {name: value for name, value in fields.items() if name in GenerationRequest.model_fields}
    again = flow_engine.generate(_request(**known, checkpoint=fields["sd_model_name"]))
    assert _max_diff(again.images, result.images) == 0
    plain = flow_engine.generate(_request(checkpoint="tiny-flux-dev-diffusers", shift=0))  # 0: the model's own
    assert "Shift" not in parse_infotext(plain.infotexts[0]) and "Module 1" not in plain.infotexts[0]


def test_modules_are_read_in_their_numbered_order():
    fields = request_fields_from_infotext(parse_infotext("cat\nSteps: 4, Module 2: ae, Module 10: t5, Module 1: l"))
    assert fields["additional_modules"] == ["l", "ae", "t5"]


@pytest.mark.parametrize("checkpoint, family", [("tiny-sd35-diffusers", sd3.FAMILY),
                                                ("tiny-flux-dev-diffusers", flux.FAMILY)])
def test_samplers_and_schedules_not_run_are_replaced_with_a_warning(flow_engine, checkpoint, family):
    assert family.samplers == tuple(CLASSES) and family.schedules == tuple(SCHEDULE_OPTIONS)
    result = flow_engine.generate(_request(checkpoint=checkpoint, sampler_name="LMS", scheduler="Karras"))
    assert any("LMS was replaced by Euler" in warning for warning in result.warnings)
    assert parse_infotext(result.infotexts[0])["Schedule type"] == "Karras"  # Euler runs Karras
    other = flow_engine.generate(_request(checkpoint=checkpoint, sampler_name="DPM++ 2M", scheduler="Karras"))
    assert any("DPM++ 2M cannot use the Karras schedule" in warning for warning in other.warnings)
    parsed = parse_infotext(other.infotexts[0])
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Simple")
    automatic = flow_engine.generate(_request(checkpoint=checkpoint, sampler_name="UniPC", scheduler="Automatic"))
    assert not automatic.warnings and parse_infotext(automatic.infotexts[0])["Schedule type"] == "Simple"
