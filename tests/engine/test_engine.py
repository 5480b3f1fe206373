"""The engine on the tiny models: families, samplers, seeds, batches, img2img, inpaint, saving, control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.images.saving import read_infotext
from pipelines.job_control import JobControl
from pipelines.options import Options
from pipelines.request import GenerationRequest
from pipelines.sampling.samplers import SAMPLERS
from tests.fixtures.pictures import half_mask, picture
from tests.helpers import CHECKPOINTS, SD15, img2img, pixels, txt2img


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_every_family_generates_with_infotext(engine, checkpoint):
    result = engine.generate(txt2img(checkpoint=checkpoint))
    assert len(result.images) == 1
    image = result.images[0]
    assert image.size == (64, 64)
    assert pixels(image).std() > 1  # a real decoded image, not a flat fill
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Prompt"] == "a photo of a cat"
    assert parsed["Negative prompt"] == "blurry"
    assert parsed["Seed"] == 1234 and parsed["Steps"] == 4 and parsed["Size-1"] == 64
    assert parsed["Model"] == checkpoint.removesuffix(".safetensors")
    assert parsed["Model hash"] == engine.registry.find_checkpoint(checkpoint).short_hash
    assert parsed["RNG"] == "CPU"


def test_families_are_detected(engine):
    families = {name: engine.models.get(name).family for name in CHECKPOINTS}
    assert families["tiny-sd15.safetensors"].name == "sd1"
    assert families["tiny-sd21-v.safetensors"].name == "sd2"
    assert families["tiny-sd21-v.safetensors"].prediction_type == "v_prediction"
    assert engine.models.get("tiny-sd21-v.safetensors").scheduler_config["prediction_type"] == "v_prediction"
    assert families["tiny-sdxl.safetensors"].name == "sdxl"
    assert families["tiny-sd15-inpainting.safetensors"].inpainting
    assert engine.models.get("tiny-sd15-inpainting.safetensors").unet.config.in_channels == 9


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_and_is_deterministic(engine, sampler):
    request = txt2img(sampler_name=sampler, steps=3)
    first = engine.generate(request).images[0]
    second = engine.generate(request).images[0]
    assert np.array_equal(pixels(first), pixels(second)), "the same request must give the same pixels"
    assert pixels(first).std() > 1


def _unet_timesteps(engine, monkeypatch, request) -> list[float]:
    """The timesteps the UNet is called with during one job."""
    unet = engine.models.get(request.checkpoint).unet
    seen: list[float] = []
    original = unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(round(float(timestep), 3))
        return original(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    engine.generate(request)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "SGM Uniform", "Beta", "Uniform"])
def test_schedule_types_set_the_timesteps(engine, monkeypatch, schedule):
    # The tiny random UNet predicts nearly the same noise at every timestep, so the schedule barely shows in
    # its pixels; what the UNet is asked at each step shows whether the schedule is used.
    automatic = _unet_timesteps(engine, monkeypatch, txt2img(sampler_name="Euler", steps=4))
    scheduled = _unet_timesteps(engine, monkeypatch, txt2img(sampler_name="Euler", steps=4, scheduler=schedule))
    assert len(scheduled) == 4 and scheduled[0] > scheduled[-1]
    if schedule == "Uniform":  # Euler's automatic schedule is uniform
        assert scheduled == automatic
    else:
        assert scheduled != automatic


def test_schedule_a_sampler_cannot_run_falls_back_with_a_warning(engine):
    # A pasted A1111 infotext may pair Euler a with Karras; diffusers' Euler a has no Karras sigmas.
    result = engine.generate(txt2img(sampler_name="Euler a", scheduler="Karras", seed=5))
    plain = engine.generate(txt2img(sampler_name="Euler a", seed=5))
    assert any("Euler a cannot use the Karras schedule" in w for w in result.warnings)
    assert parse_infotext(result.infotexts[0])["Schedule type"] == "Automatic"
    assert np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))


def test_unknown_schedule_falls_back_with_a_warning(engine):
    # A1111 runs an unknown schedule name with the sampler's default and warns; it is never refused.
    result = engine.generate(txt2img(sampler_name="Euler", scheduler="Karas", seed=5))
    plain = engine.generate(txt2img(sampler_name="Euler", seed=5))
    assert any("unknown schedule type 'Karas'" in w for w in result.warnings)
    assert parse_infotext(result.infotexts[0])["Schedule type"] == "Automatic"
    assert np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_batch_image_k_equals_single_run_with_seed_plus_k(engine, sampler):
    batch = engine.generate(txt2img(sampler_name=sampler, batch_size=3, seed=77))
    assert batch.seeds == [77, 78, 79]
    for k in range(3):
        single = engine.generate(txt2img(sampler_name=sampler, seed=77 + k)).images[0]
        assert np.abs(pixels(single) - pixels(batch.images[k])).max() <= 1


def test_batch_count_runs_batches_in_sequence(engine):
    result = engine.generate(txt2img(n_iter=2, batch_size=2, seed=10))
    assert result.seeds == [10, 11, 12, 13]
    assert len(result.images) == 4 and len(result.infotexts) == 4
    assert [parse_infotext(t)["Seed"] for t in result.infotexts] == [10, 11, 12, 13]


def test_random_seed_is_recorded(engine):
    result = engine.generate(txt2img(seed=-1))
    assert 0 <= result.seeds[0] <= 4294967294
    again = engine.generate(txt2img(seed=result.seeds[0])).images[0]
    assert np.array_equal(pixels(again), pixels(result.images[0]))


def test_variation_seed(engine):
    plain = engine.generate(txt2img(seed=5)).images[0]
    zero = engine.generate(txt2img(seed=5, subseed=9, subseed_strength=0.0)).images[0]
    assert np.array_equal(pixels(plain), pixels(zero))
    full = engine.generate(txt2img(seed=5, subseed=9, subseed_strength=1.0)).images[0]
    other = engine.generate(txt2img(seed=9)).images[0]  # Euler draws no noise per step: only the start counts
    assert np.abs(pixels(full) - pixels(other)).max() <= 1
    half = engine.generate(txt2img(seed=5, subseed=9, subseed_strength=0.5))
    assert not np.array_equal(pixels(half.images[0]), pixels(plain))
    parsed = parse_infotext(half.infotexts[0])
    assert parsed["Variation seed"] == 9 and parsed["Variation seed strength"] == 0.5


def test_seed_resize_keeps_noise_centred(engine):
    result = engine.generate(txt2img(width=80, height=64, seed_resize_from_w=64, seed_resize_from_h=64))
    assert result.images[0].size == (80, 64)
    assert parse_infotext(result.infotexts[0])["Seed resize from"] == "64x64"


def test_clip_skip_and_cfg_change_the_image(engine):
    base = pixels(engine.generate(txt2img()).images[0])
    assert not np.array_equal(base, pixels(engine.generate(txt2img(clip_skip=2)).images[0]))
    assert not np.array_equal(base, pixels(engine.generate(txt2img(cfg_scale=2)).images[0]))


def test_cfg_one_skips_the_unconditional_pass(engine, monkeypatch):
    unet = engine.models.get(SD15).unet
    batch_sizes = []
    original = unet.forward

    def spy(sample, *args, **kwargs):
        batch_sizes.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    engine.generate(txt2img(cfg_scale=1.0, steps=2))
    assert batch_sizes == [1, 1]
    batch_sizes.clear()
    engine.generate(txt2img(cfg_scale=7.0, steps=2))
    assert batch_sizes == [2, 2]  # CFG: conditional and unconditional in one forward


def test_tiling_is_seamless_and_undone(engine):
    model = engine.models.get(SD15)
    tiled = pixels(engine.generate(txt2img(tiling=True, width=64, height=64)).images[0])
    plain = pixels(engine.generate(txt2img()).images[0])
    assert not np.array_equal(tiled, plain)
    assert all(m.padding_mode == "zeros" for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert parse_infotext(engine.generate(txt2img(tiling=True)).infotexts[0])["Tiling"] in (True, "True")


def test_images_are_saved_with_infotext(engine_factory):
    engine = engine_factory()
    result = engine.generate(txt2img(save_images=True, batch_size=2, seed=42))
    assert [p.name for p in result.paths] == ["00000-42.png", "00001-43.png"]
    assert result.paths[0].parent.parent.name == "txt2img-images"
    for path, text in zip(result.paths, result.infotexts):
        assert read_infotext(path) == text
    assert result.grid_path is not None and result.grid_path.parent.parent.name == "txt2img-grids"
    assert Image.open(result.grid_path).size == (128, 64)
    again = engine.generate(txt2img(save_images=True, seed=1))
    assert again.paths[0].name == "00002-1.png"


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_other_formats_keep_infotext(engine_factory, fmt):
    engine = engine_factory()
    options = engine.options.with_overrides({"samples_format": fmt})
    result = engine.generate(txt2img(save_images=True), options=options)
    assert result.paths[0].suffix == f".{fmt}"
    assert read_infotext(result.paths[0]) == result.infotexts[0]


def test_infotext_round_trip_rebuilds_the_request(engine):
    request = txt2img(sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5.5, clip_skip=2, seed=99,
                      subseed=3, subseed_strength=0.25, width=72, height=64)
    result = engine.generate(request)
    fields = request_fields_from_infotext(parse_infotext(result.infotexts[0]))
    rebuilt = GenerationRequest(**{k: v for k, v in fields.items() if k in GenerationRequest.model_fields},
                                checkpoint=SD15, save_images=False)
    for name in ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed",
                 "subseed", "subseed_strength", "width", "height", "clip_skip"):
        assert getattr(rebuilt, name) == getattr(request, name), name
    again = engine.generate(rebuilt)
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))


# --- img2img and inpaint -------------------------------------------------------------------------


def test_img2img_follows_the_init_image(engine):
    source = pixels(picture())
    low = pixels(engine.generate(img2img(denoising_strength=0.2)).images[0])
    high = pixels(engine.generate(img2img(denoising_strength=1.0)).images[0])
    # Tiny random models cannot reproduce a picture, but less denoising stays closer to the VAE's rendering
    # of the init image than full denoising.
    rendered = pixels(engine.generate(img2img(denoising_strength=0.0)).images[0])
    assert np.abs(low - rendered).mean() < np.abs(high - rendered).mean()
    assert rendered.shape == source.shape


def test_img2img_steps_scale_with_denoising(engine):
    seen = []
    control = JobControl(on_progress=lambda p: seen.append(p.sampling_steps))
    engine.generate(img2img(steps=10, denoising_strength=0.5), control=control)
    assert max(seen) == 5


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_size(engine, mode):
    result = engine.generate(img2img(init_images=[picture((96, 48))], width=64, height=80, resize_mode=mode))
    assert result.images[0].size == (64, 80)


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_keeps_the_unmasked_part(engine, fill):
    init = picture()
    result = engine.generate(img2img(mask=half_mask(), mask_blur=0, inpainting_fill=fill, denoising_strength=0.9))
    out = pixels(result.images[0])
    kept = pixels(init)[:, 40:]  # right half, away from the mask edge
    assert np.array_equal(out[:, 40:], kept)
    assert not np.array_equal(out[:, :24], pixels(init)[:, :24])
    assert parse_infotext(result.infotexts[0])["Masked content"] == ["fill", "original", "latent noise",
                                                                     "latent nothing"][fill]


def test_masked_content_modes_differ(engine):
    outs = [pixels(engine.generate(img2img(mask=half_mask(), mask_blur=0, inpainting_fill=f)).images[0])
            for f in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.array_equal(outs[a][:, :24], outs[b][:, :24]), (a, b)


def test_inverted_mask_redraws_the_other_side(engine):
    init = pixels(picture())
    out = pixels(engine.generate(img2img(mask=half_mask(), mask_blur=0, inpainting_mask_invert=True)).images[0])
    assert np.array_equal(out[:, :24], init[:, :24])
    assert not np.array_equal(out[:, 40:], init[:, 40:])


def test_inpaint_only_masked_pastes_a_full_resolution_crop(engine):
    init = picture((128, 128))
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((80, 80, 100, 100), fill=255)
    result = engine.generate(img2img(init_images=[init], mask=mask, mask_blur=0, inpaint_full_res=True,
                                     inpaint_full_res_padding=8, width=64, height=64))
    out = pixels(result.images[0])
    assert out.shape == (128, 128, 3)  # the whole picture comes back, not the crop
    assert np.array_equal(out[:60, :60], pixels(init)[:60, :60])
    assert not np.array_equal(out[82:99, 82:99], pixels(init)[82:99, 82:99])
    assert parse_infotext(result.infotexts[0])["Inpaint area"] == "Only masked"


def test_inpainting_checkpoint(engine):
    result = engine.generate(img2img(checkpoint="tiny-sd15-inpainting.safetensors", mask=half_mask(),
                                     mask_blur=0, denoising_strength=1.0))
    out = pixels(result.images[0])
    assert np.array_equal(out[:, 40:], pixels(picture())[:, 40:])
    assert not np.array_equal(out[:, :24], pixels(picture())[:, :24])


def test_browser_drawn_mask_uses_alpha(engine):
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(strokes).rectangle((0, 0, 31, 63), fill=(255, 255, 255, 255))
    out = pixels(engine.generate(img2img(mask=strokes, mask_blur=0)).images[0])
    assert np.array_equal(out[:, 40:], pixels(picture())[:, 40:])


def test_img2img_images_save_to_img2img_folder(engine_factory):
    engine = engine_factory()
    result = engine.generate(img2img(save_images=True))
    assert result.paths[0].parent.parent.name == "img2img-images"
    assert parse_infotext(read_infotext(result.paths[0]))["Denoising strength"] == 0.5


# --- progress, interrupt, skip -------------------------------------------------------------------


def test_progress_reports_every_step_with_previews(engine):
    events = []
    control = JobControl(on_progress=lambda p: events.append(p), preview_every=2)
    engine.generate(txt2img(steps=5), control=control)
    steps = [e.sampling_step for e in events]
    assert set(range(5)) <= set(steps)
    previews = [e.preview for e in events if e.preview is not None]
    assert previews and previews[0].mode == "RGB" and previews[0].size == (16, 16)  # latents x 2
    assert events[-1].fraction == 1.0


def test_interrupt_keeps_finished_and_partial_batches_and_saves_only_finished(engine_factory):
    # As A1111: the stopped batch is decoded from its latents and returned with its seed and infotext, but
    # saved only with the save_incomplete_images option; later batches do not run.
    engine = engine_factory()
    control = JobControl()

    def on_progress(p):
        if p.job_no == 1 and p.sampling_step == 2:
            control.interrupt()

    control.on_progress = on_progress
    result = engine.generate(txt2img(n_iter=3, steps=4, save_images=True, seed=1), control=control)
    assert result.interrupted
    assert result.seeds == [1, 2] and len(result.images) == len(result.infotexts) == len(result.prompts) == 2
    assert parse_infotext(result.infotexts[1])["Seed"] == 2
    assert len(result.paths) == 1
    folder = result.paths[0].parent
    assert sorted(p.name for p in folder.iterdir()) == ["00000-1.png"]


def test_interrupted_images_are_saved_with_save_incomplete_images(engine_factory):
    engine = engine_factory()
    control = JobControl()

    def on_progress(p):
        if p.job_no == 1 and p.sampling_step == 2:
            control.interrupt()

    control.on_progress = on_progress
    result = engine.generate(txt2img(n_iter=3, steps=4, save_images=True, seed=1), control=control,
                             options=Options(save_incomplete_images=True))
    assert result.interrupted and result.seeds == [1, 2]
    assert [p.name for p in result.paths] == ["00000-1.png", "00001-2.png"]
    assert parse_infotext(read_infotext(result.paths[1]))["Seed"] == 2


def test_interrupted_image_is_the_denoised_estimate_not_noise(engine):
    # Decoded from the scheduler's estimate of the finished latents (A1111's "denoised"), the partial
    # image stopped at step 5 of 8 is close to the finished one; decoded noise would not be.
    full = pixels(engine.generate(txt2img(steps=8, seed=5)).images[0]).astype(float)
    control = JobControl()
    control.on_progress = lambda p: control.interrupt() if p.sampling_step == 4 else None
    partial = engine.generate(txt2img(steps=8, seed=5), control=control)
    assert partial.interrupted and len(partial.images) == 1
    noise_control = JobControl()
    noise_control.on_progress = lambda p: noise_control.interrupt() if p.sampling_step == 0 else None
    noise = engine.generate(txt2img(steps=8, seed=5), control=noise_control)
    assert len(noise.images) == 1
    near = np.abs(pixels(partial.images[0]).astype(float) - full).mean()
    far = np.abs(pixels(noise.images[0]).astype(float) - full).mean()
    assert near < far


def test_skip_stops_only_the_current_batch_and_keeps_its_image(engine):
    control = JobControl()

    def on_progress(p):
        if p.job_no == 1 and p.sampling_step == 1:
            control.skip()

    control.on_progress = on_progress
    result = engine.generate(txt2img(n_iter=3, steps=3, seed=1), control=control)
    assert not result.interrupted
    # The skipped batch's image is kept (decoded from its latents), so every seed has its image.
    assert result.seeds == [1, 2, 3] and len(result.images) == len(result.infotexts) == 3
    assert result.skipped_batches == [1]


def test_interrupt_from_another_thread_takes_effect_within_a_step(engine):
    import threading

    control = JobControl()
    started = threading.Event()
    steps_after = []

    def on_progress(p):
        if p.sampling_step >= 1:
            started.set()
        if control.interrupted:
            steps_after.append(p.sampling_step)

    control.on_progress = on_progress
    thread = threading.Thread(target=lambda: (started.wait(30), control.interrupt()))
    thread.start()
    result = engine.generate(txt2img(steps=40), control=control)
    thread.join()
    assert result.interrupted and len(result.images) == len(result.seeds) == 1
    assert len(steps_after) <= 3
