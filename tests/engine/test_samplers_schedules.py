"""A1111's twelve schedule types and the samplers diffusers has no scheduler for, on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.images.infotext import parse_infotext
from pipelines.job_control import JobControl
from pipelines.sampling.samplers import SAMPLERS, SCHEDULES, find_sampler, find_schedule
from tests.fixtures.pictures import half_mask, picture
from tests.helpers import SD15, img2img, pixels, txt2img

NEW_SAMPLERS = ["DPM++ 2S a", "DPM++ 2M SDE Heun", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++"]


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_new_sampler_makes_an_image_recorded_by_its_a1111_name(engine, name):
    result = engine.generate(txt2img(sampler_name=find_sampler(name).aliases[0], steps=4, seed=11))
    image = pixels(result.images[0])
    assert np.isfinite(image).all() and image.std() > 1
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Sampler"] == name
    assert not result.warnings


@pytest.mark.parametrize(("sampler", "schedule"), [("Euler", s.label) for s in SCHEDULES]
                         + [("DPM++ 2S a", label) for label in ("KL Optimal", "Simple", "DDIM", "Beta")])
def test_every_schedule_type_runs_and_is_recorded(engine, sampler, schedule):
    result = engine.generate(txt2img(sampler_name=sampler, scheduler=schedule, steps=4, seed=3))
    assert not result.warnings, result.warnings
    image = pixels(result.images[0])
    assert np.isfinite(image).all() and image.std() > 1
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Sampler"] == sampler
    assert parsed.get("Schedule type", "Automatic") == schedule


@pytest.mark.parametrize("name", ["kl_optimal", "align_your_steps", "SGMUniform", "POLYEXPONENTIAL", "Simple"])
def test_schedule_by_a1111_name_alias_or_label(engine, name):
    label = find_schedule(name).label
    assert txt2img(scheduler=name).scheduler == label
    result = engine.generate(txt2img(sampler_name="Euler", scheduler=name, steps=3))
    assert parse_infotext(result.infotexts[0])["Schedule type"] == label


def _unet_sigmas(engine, monkeypatch, request) -> list[float]:
    unet = engine.models.get(request.checkpoint).unet
    seen: list[float] = []
    original = unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(round(float(timestep), 2))
        return original(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    engine.generate(request)
    monkeypatch.undo()
    return seen


def test_schedule_types_give_distinct_timesteps(engine, monkeypatch):
    # The tiny random UNet barely shows a schedule in its pixels; the timesteps it is asked at do.
    seen = {s.label: tuple(_unet_sigmas(engine, monkeypatch, txt2img(sampler_name="Euler", scheduler=s.label,
                                                                       steps=7)))
            for s in SCHEDULES if s.label not in ("Automatic", "DDIM")}
    # SD 1.5's own spacing (Uniform) is DDIM's: leading, offset 1.
    assert seen["Uniform"] == tuple(_unet_sigmas(engine, monkeypatch, txt2img(sampler_name="Euler", scheduler="DDIM",
                                                                             steps=7)))
    assert len(set(seen.values())) == len(seen), seen


@pytest.mark.parametrize("name", ["DPM adaptive", "DPM fast", "Restart"])
def test_progress_per_model_call_and_interrupt_stops_the_sampler(engine, monkeypatch, name):
    unet = engine.models.get(SD15).unet
    calls = 0
    original = unet.forward

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    reports: list[int] = []
    engine.generate(txt2img(sampler_name=name, steps=6), control=JobControl(
        on_progress=lambda p: reports.append(p.sampling_step)))
    assert calls >= 6 and len(reports) >= calls  # a report (and an interrupt check) before every model call

    calls = 0
    control = JobControl()

    def stop_at_third_call(progress):
        if calls >= 2:
            control.interrupt()

    control.on_progress = stop_at_third_call
    result = engine.generate(txt2img(sampler_name=name, steps=6), control=control)
    assert calls <= 3, f"{name} kept calling the model after the interrupt ({calls} calls)"
    assert result is not None


@pytest.mark.parametrize("name", ["DPM++ 2S a", "DPM fast", "Restart", "DDIM CFG++"])
def test_new_samplers_run_img2img_and_inpaint(engine, name):
    result = engine.generate(img2img(sampler_name=name, steps=6))
    assert pixels(result.images[0]).std() > 1
    source = pixels(picture().resize((64, 64)))
    request = img2img(sampler_name=name, steps=6, mask=half_mask(), mask_blur=0, denoising_strength=1.0,
                      inpainting_fill=1)
    inpainted = pixels(engine.generate(request).images[0])
    # A plain UNet keeps the original outside the mask (the right half of half_mask stays).
    assert np.abs(inpainted[:, 40:] - source[:, 40:]).mean() < np.abs(inpainted[:, :24] - source[:, :24]).mean()


def test_new_sampler_on_v_prediction_and_sdxl(engine):
    for checkpoint in ("tiny-sd21-v.safetensors", "tiny-sdxl.safetensors"):
        result = engine.generate(txt2img(checkpoint=checkpoint, sampler_name="DPM++ 2S a",
                                         scheduler="Align Your Steps", steps=3))
        assert np.isfinite(pixels(result.images[0])).all() and pixels(result.images[0]).std() > 1


def test_every_sampler_lists_automatic_first():
    for sampler in SAMPLERS.values():
        assert sampler.schedule_types[0] == "Automatic"
