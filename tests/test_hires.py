"""Hires. fix on the tiny models: sizes, upscalers, steps, infotext round trip (REFERENCE §9)."""

from __future__ import annotations

import pytest

from pipelines.hires import hires_steps
from pipelines.infotext import parse_infotext, request_fields_from_infotext
from pipelines.request import LATENT_UPSCALE_MODES, GenerationRequest
from tests.test_engine import txt2img


def _unet_calls(engine, monkeypatch, request) -> tuple[list[tuple[int, int]], object]:
    """The latent (h, w) of every UNet call of one job, and the result."""
    unet = engine.models.get(request.checkpoint).unet
    sizes: list[tuple[int, int]] = []
    original = unet.forward

    def spy(sample, *args, **kwargs):
        sizes.append(tuple(sample.shape[-2:]))
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    result = engine.generate(request)
    monkeypatch.undo()
    return sizes, result


@pytest.mark.parametrize("upscaler", [*LATENT_UPSCALE_MODES, "Lanczos", "Nearest", "tiny-esrgan-4x"])
def test_every_upscaler_gives_the_hires_size(engine, upscaler):
    result = engine.generate(txt2img(enable_hr=True, hr_scale=2, hr_upscaler=upscaler, steps=3,
                                     hr_second_pass_steps=2, width=64, height=72))
    assert result.images[0].size == (128, 144)
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Hires upscaler"] == upscaler and parsed["Hires upscale"] == 2
    assert parsed["Hires steps"] == 2 and parsed["Denoising strength"] == 0.7


def test_second_pass_runs_the_asked_steps_at_the_larger_size(engine, monkeypatch):
    request = txt2img(enable_hr=True, steps=4, hr_second_pass_steps=3, denoising_strength=0.5, hr_scale=1.5)
    sizes, result = _unet_calls(engine, monkeypatch, request)
    assert sizes == [(8, 8)] * 4 + [(12, 12)] * 3
    assert result.images[0].size == (96, 96)
    assert hires_steps(request) == (6, 3)


def test_hires_steps_zero_means_as_many_as_the_first_pass(engine, monkeypatch):
    sizes, _ = _unet_calls(engine, monkeypatch, txt2img(enable_hr=True, steps=3, denoising_strength=0.3))
    assert sizes.count((16, 16)) == 3


def test_resize_to_both_sides_covers_and_crops(engine):
    result = engine.generate(txt2img(enable_hr=True, width=64, height=64, hr_resize_x=128, hr_resize_y=80,
                                     hr_upscaler="Latent"))
    assert result.images[0].size == (128, 80)
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Hires resize"] == "128x80" and "Hires upscale" not in parsed
    image = engine.generate(txt2img(enable_hr=True, width=64, height=64, hr_resize_x=128, hr_resize_y=80,
                                    hr_upscaler="tiny-esrgan-4x")).images[0]
    assert image.size == (128, 80)


def test_one_resize_side_keeps_the_aspect_ratio():
    assert GenerationRequest(enable_hr=True, width=512, height=768, hr_resize_x=1024).hires_size == (1024, 1536)


def test_hires_works_for_sdxl_and_sd2(engine):
    for checkpoint in ("tiny-sdxl.safetensors", "tiny-sd21-v.safetensors", "tiny-sd15-inpainting.safetensors"):
        result = engine.generate(txt2img(checkpoint=checkpoint, enable_hr=True, steps=2, hr_second_pass_steps=2))
        assert result.images[0].size == (128, 128), checkpoint


def test_hires_prompt_and_sampler_are_recorded(engine):
    result = engine.generate(txt2img(enable_hr=True, steps=2, hr_sampler_name="Euler a", hr_prompt="a sharp cat",
                                     hr_negative_prompt="soft"))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Hires sampler"] == "Euler a" and parsed["Hires prompt"] == "a sharp cat"
    assert parsed["Hires negative prompt"] == "soft"
    plain = engine.generate(txt2img(enable_hr=True, steps=2))
    assert result.images[0].tobytes() != plain.images[0].tobytes()


def test_infotext_round_trip_restores_hires(engine):
    request = txt2img(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2,
                      denoising_strength=0.55, steps=2)
    result = engine.generate(request)
    fields = request_fields_from_infotext(parse_infotext(result.infotexts[0]))
    for name in ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength"):
        assert fields[name] == getattr(request, name), name


def test_plain_txt2img_records_no_denoising(engine):
    assert "Denoising strength" not in parse_infotext(engine.generate(txt2img()).infotexts[0])


def test_unknown_hires_upscaler_fails_before_loading(engine_factory):
    engine = engine_factory()
    with pytest.raises(LookupError, match="no upscaler named 'Magic'"):
        engine.generate(txt2img(enable_hr=True, hr_upscaler="Magic"))
    assert engine.models.current is None


def test_hires_is_refused_for_img2img_and_too_large_targets():
    from pydantic import ValidationError

    from tests.pictures import picture
    from tests.test_engine import img2img

    with pytest.raises(ValidationError, match="enable_hr"):
        img2img(enable_hr=True, init_images=[picture()])
    with pytest.raises(ValidationError, match="larger than 4096"):
        GenerationRequest(enable_hr=True, width=2048, height=2048, hr_scale=4)


def test_generate_then_upscale_to_an_exact_size(engine, monkeypatch):
    """The seed's workflow: txt2img, then an ESRGAN to an exact final size, recorded in one infotext."""
    request = txt2img(enable_hr=True, hr_upscaler="tiny-esrgan-4x", denoising_strength=0.0, width=64, height=64,
                      hr_resize_x=256, hr_resize_y=256, steps=2)
    sizes, result = _unet_calls(engine, monkeypatch, request)
    assert sizes == [(8, 8)] * 2  # no second pass
    assert result.images[0].size == (256, 256)
    plain = engine.generate(txt2img(width=64, height=64, steps=2)).images[0]
    expected = engine.upscalers.upscale(plain, "tiny-esrgan-4x", size=(256, 256), crop=True)
    assert result.images[0].tobytes() == expected.tobytes(), "the upscaler's pixels, without a VAE round trip"
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Hires upscaler"] == "tiny-esrgan-4x" and parsed["Hires resize"] == "256x256"
    assert parsed["Denoising strength"] == 0
