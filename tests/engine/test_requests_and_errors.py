"""Bad input fails before any model work, with a message naming the field and the allowed values."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from pipelines.engine import EngineError
from pipelines.request import GenerationRequest, Img2ImgRequest
from tests.fixtures.pictures import picture
from tests.helpers import txt2img


@pytest.mark.parametrize("field, value, message", [
    ("width", 100, "width must be a multiple of 8"),
    ("height", 100000, "less than or equal to 4096"),
    ("steps", 0, "greater than or equal to 1"),
    ("cfg_scale", math.nan, "cfg_scale"),
    ("sampler_name", "Euler z", "unknown sampler 'Euler z'; choose one of DPM++ 2M"),
    ("hr_sampler_name", "Euler z", "hr_sampler_name: unknown sampler 'Euler z'; choose one of DPM++ 2M"),
    ("seed", 2**40, "less than or equal to 4294967294"),
    ("prompt", "x" * 1_000_000, "at most 20000 characters"),
    ("batch_size", 0, "greater than or equal to 1"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValidationError) as raised:
        GenerationRequest(**{field: value})
    text = str(raised.value)
    assert field in text and message in text


def test_schedule_names_become_labels_and_unknown_ones_are_kept_for_a_warning():
    # As in A1111, an unknown schedule type is not an error: the job runs the sampler's default and warns
    # (tests/engine/test_engine.py checks the warning).
    assert GenerationRequest(scheduler="sgm_uniform", hr_scheduler="KL_OPTIMAL").scheduler == "SGM Uniform"
    assert GenerationRequest(hr_scheduler="kl_optimal").hr_scheduler == "KL Optimal"
    assert GenerationRequest(scheduler="Wobbly").scheduler == "Wobbly"


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="wobble"):
        GenerationRequest(wobble=1)


def test_an_image_that_is_not_an_image():
    with pytest.raises(ValidationError, match=r"init_images\[0\] is not an image"):
        Img2ImgRequest(init_images=["not an image"])
    with pytest.raises(ValidationError, match="mask is not an image"):
        Img2ImgRequest(init_images=[picture()], mask=b"bytes")


def test_missing_model_fails_before_loading_and_lists_models(engine_factory):
    engine = engine_factory()
    with pytest.raises(LookupError, match=r"no model matches 'nope'; available: .*tiny-sd15.safetensors \["):
        engine.generate(txt2img(checkpoint="nope"))
    assert engine.models.current is None  # nothing was loaded
    with pytest.raises(LookupError, match="vae: no VAE matches 'nope.pt'; choose one of Automatic, tiny-vae"):
        engine.generate(txt2img(vae="nope.pt"))
    assert engine.models.current is None


def test_unknown_style_fails_before_loading(engine_factory):
    engine = engine_factory()
    with pytest.raises((KeyError, LookupError), match="no-such-style"):
        engine.generate(txt2img(styles=["no-such-style"]))
    assert engine.models.current is None


def test_out_of_memory_is_reported_and_the_next_job_works(engine_factory, monkeypatch):
    engine = engine_factory()
    unet = engine.models.get("tiny-sd15.safetensors").unet
    original = unet.forward

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(unet, "forward", exhausted)
    with pytest.raises(EngineError, match="Out of memory at 64x64, batch size 1: try a smaller size"):
        engine.generate(txt2img())
    monkeypatch.setattr(unet, "forward", original)
    assert len(engine.generate(txt2img()).images) == 1


def test_unknown_prompt_tag_is_reported(engine):
    result = engine.generate(txt2img(prompt="a cat <lora:nothing:0.8>"))
    assert any("lora" in w for w in result.warnings)
    assert "<lora:nothing:0.8>" in result.infotexts[0]  # the infotext keeps the prompt as written
