"""Hires. fix on the tiny models: sizes, upscalers, steps, infotext round trip (docs/compatibility.md §9)."""

from __future__ import annotations

import pytest

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.request import LATENT_UPSCALE_MODES, GenerationRequest
from pipelines.sampling.hires import hires_steps
from tests.helpers import SD15, txt2img


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
                      denoising_strength=0.55, steps=2, hr_sampler_name="DPM++ 2M", hr_scheduler="Karras",
                      hr_prompt="a sharp, detailed cat: close-up", hr_negative_prompt="soft\nblurry")
    result = engine.generate(request)
    fields = request_fields_from_infotext(parse_infotext(result.infotexts[0]))
    for name in ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength",
                 "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        assert fields[name] == getattr(request, name), name
    assert "extra" not in fields or not any(key.startswith("Hires") for key in fields["extra"]), fields["extra"]


def test_one_side_resize_round_trips_to_the_same_size(engine):
    result = engine.generate(txt2img(enable_hr=True, width=64, height=64, hr_resize_x=96, hr_resize_y=0, steps=2))
    assert result.images[0].size == (96, 96)
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Hires resize"] == "96x0" and "Hires upscale" not in parsed
    pasted = _pasted(result.infotexts[0])
    assert (pasted.hr_resize_x, pasted.hr_resize_y) == (96, 0) and pasted.hires_size == (96, 96)


# --- hires checkpoint ------------------------------------------------------------------------------


def _pasted(infotext: str, **update) -> GenerationRequest:
    """The request that pasting ``infotext`` gives (the request's own fields of it)."""
    fields = request_fields_from_infotext(parse_infotext(infotext))
    known = {name: value for name, value in fields.items() if name in GenerationRequest.model_fields}
    return GenerationRequest(**{**known, **update})


def _spy_unets(engine, monkeypatch, titles: dict[str, str]) -> dict[str, list[tuple[int, int]]]:
    """Record the latent (h, w) of every UNet call of each model in ``titles`` (label -> checkpoint)."""
    calls: dict[str, list[tuple[int, int]]] = {}
    for label, checkpoint in titles.items():
        unet = engine.models.get(checkpoint).unet
        calls[label] = []

        def spy(sample, *args, _original=unet.forward, _calls=calls[label], **kwargs):
            _calls.append(tuple(sample.shape[-2:]))
            return _original(sample, *args, **kwargs)

        monkeypatch.setattr(unet, "forward", spy)
    return calls


def test_hires_checkpoint_runs_the_second_pass(engine, monkeypatch):
    # tiny-sd15-diffusers holds the very weights of tiny-sd15: handing the latents over must change nothing.
    calls = _spy_unets(engine, monkeypatch, {"first": SD15, "hires": "tiny-sd15-diffusers"})
    request = txt2img(enable_hr=True, steps=3, hr_second_pass_steps=2, hr_scale=1.5, hr_upscaler="Latent")
    switched = engine.generate(request.model_copy(update={"hr_checkpoint_name": "tiny-sd15-diffusers"}))
    assert calls == {"first": [(8, 8)] * 3, "hires": [(12, 12)] * 2}
    plain = engine.generate(request)
    assert switched.images[0].tobytes() == plain.images[0].tobytes()
    assert parse_infotext(switched.infotexts[0])["Hires checkpoint"] == "tiny-sd15-diffusers"
    assert parse_infotext(switched.infotexts[0])["Model"] == "tiny-sd15"
    assert "Hires checkpoint" not in parse_infotext(plain.infotexts[0])


@pytest.mark.parametrize("upscaler", ["Latent (bicubic)", "Lanczos"])
def test_another_hires_checkpoint_changes_the_pixels_and_round_trips(engine, upscaler):
    request = txt2img(enable_hr=True, steps=2, hr_upscaler=upscaler, hr_second_pass_steps=2)
    plain = engine.generate(request)
    switched = engine.generate(request.model_copy(update={"hr_checkpoint_name": "tiny-sd21-v.safetensors"}))
    assert switched.images[0].size == plain.images[0].size == (128, 128)
    assert switched.images[0].tobytes() != plain.images[0].tobytes()
    pasted = _pasted(switched.infotexts[0], checkpoint=SD15, save_images=False)
    assert pasted.hr_checkpoint_name == "tiny-sd21-v"
    again = engine.generate(pasted)
    assert again.images[0].tobytes() == switched.images[0].tobytes()


def test_sdxl_hires_checkpoint_goes_through_pixels(engine, monkeypatch):
    calls = _spy_unets(engine, monkeypatch, {"hires": "tiny-sdxl.safetensors"})
    result = engine.generate(txt2img(enable_hr=True, steps=2, hr_second_pass_steps=2, hr_upscaler="Latent",
                                     hr_checkpoint_name="tiny-sdxl.safetensors"))
    assert calls["hires"] == [(16, 16)] * 2 and result.images[0].size == (128, 128)


def test_hires_checkpoint_with_a_cache_of_one_never_touches_the_unloaded_model(engine_factory, engine, monkeypatch):
    small = engine_factory(checkpoint_cache=1)
    first = small.models.get(SD15)
    events: list[str] = []
    for name, module, method in (("unet", first.unet, "forward"), ("vae", first.vae, "decode"),
                                 ("vae", first.vae, "encode"), ("text encoder", first.pipe.text_encoder, "forward")):
        def spy(*args, _original=getattr(module, method), _name=name, **kwargs):
            events.append(f"first {_name}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, method, spy)
    get = small.models.get

    def logged_get(title, *args, **kwargs):
        events.append(f"load {title}")
        return get(title, *args, **kwargs)

    monkeypatch.setattr(small.models, "get", logged_get)
    request = txt2img(enable_hr=True, steps=2, hr_second_pass_steps=2, n_iter=2, hr_upscaler="Lanczos",
                      hr_checkpoint_name="tiny-sd21-v.safetensors")
    result = small.generate(request)
    switch = next(i for i, event in enumerate(events) if event.startswith("load tiny-sd21-v"))
    assert {"first unet", "first vae", "first text encoder"} <= set(events[:switch])
    assert not [event for event in events[switch:] if event.startswith("first")], events
    assert any(event.startswith(f"load {SD15}") for event in events[switch:]), "batch 2 loads the first model again"
    assert small.models.current.file.name == "tiny-sd21-v.safetensors"
    expected = engine.generate(request)
    assert [im.tobytes() for im in result.images] == [im.tobytes() for im in expected.images]


def test_unknown_hires_checkpoint_fails_before_loading(engine_factory):
    engine = engine_factory()
    with pytest.raises(LookupError, match="hr_checkpoint_name: no model matches 'nope'; available: .*tiny-sd15"):
        engine.generate(txt2img(enable_hr=True, hr_checkpoint_name="nope"))
    assert engine.models.current is None
    assert GenerationRequest(hr_checkpoint_name="Use same checkpoint", hr_sampler_name="Use same sampler",
                             hr_scheduler="Use same scheduler").hr_checkpoint_name is None


def test_interrupt_stops_the_hires_upscaler_between_tiles(engine):
    from pipelines.job_control import JobControl

    seen: list[tuple[int, int]] = []

    def watch(progress):
        if progress.textinfo.startswith("Hires. fix") and progress.sampling_step:
            seen.append((progress.sampling_step, progress.sampling_steps))
            control.interrupt()  # after the first tile

    control = JobControl(on_progress=watch)
    options = engine.options.with_overrides({"upscaler_tile": 16, "upscaler_tile_overlap": 4})
    result = engine.generate(txt2img(enable_hr=True, hr_upscaler="tiny-esrgan-4x", steps=3), control=control,
                             options=options)
    # Interrupt keeps work: the job returns the first pass's image (the hires pass never finished).
    assert result.interrupted and [image.size for image in result.images] == [(64, 64)]
    # Tile 1 of many, then nothing until the job's closing report (step 3 = the first pass's steps).
    assert [step for step, _ in seen] == [1, 3] and seen[0][1] > 4, seen


def test_plain_txt2img_records_no_denoising(engine):
    assert "Denoising strength" not in parse_infotext(engine.generate(txt2img()).infotexts[0])


def test_unknown_hires_upscaler_fails_before_loading(engine_factory):
    engine = engine_factory()
    with pytest.raises(LookupError, match="no upscaler named 'Magic'"):
        engine.generate(txt2img(enable_hr=True, hr_upscaler="Magic"))
    assert engine.models.current is None


def test_hires_is_refused_for_img2img_and_too_large_targets():
    from pydantic import ValidationError

    from tests.fixtures.pictures import picture
    from tests.helpers import img2img

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
