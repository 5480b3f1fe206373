"""Opt-in step caching (DeepCache-style): off is exact, a partial call's math equals the full UNet's, and a
cached run calls the deep UNet only on its full steps, with a close but different image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pydantic import ValidationError

from pipelines.images.infotext import parse_infotext
from pipelines.models import acceleration
from pipelines.options import Options
from pipelines.request import GenerationRequest
from pipelines.sampling.step_cache import StepCache, unet_runner
from tests import helpers
from tests.fixtures.tiny_controlnets import tiny_controlnet
from tests.fixtures.tiny_models import tiny_components
from tests.helpers import SD15, SDXL

#: Mean absolute difference, in 0..255 levels, a cached run may be from the exact one on the tiny models.
CLOSE = 12.0


def txt2img(**kw) -> GenerationRequest:
    return helpers.txt2img(**{"steps": 8, **kw})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float32)


def deep_calls(engine, request: GenerationRequest, interval: int) -> tuple[int, object]:
    """(mid_block calls, result) of one job with the step cache at ``interval``."""
    unet = engine.models.get(request.checkpoint).unet
    calls = []
    handle = unet.mid_block.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = engine.generate(request, options=engine.options.with_overrides({"step_cache_interval": interval}))
    finally:
        handle.remove()
    return len(calls), result


def unet_inputs(family: str, unet, rows: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random UNet inputs for a CFG-doubled batch (``rows``), with SDXL's added conditions."""
    generator = torch.Generator().manual_seed(5)
    config = unet.config
    sample = torch.randn(rows, config.in_channels, size, size, generator=generator)
    embeds = torch.randn(rows, 7, config.cross_attention_dim, generator=generator)
    kwargs = {}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * rows)}
    return sample, embeds, kwargs


@pytest.mark.parametrize(("family", "inpainting"), [("sd1", False), ("sdxl", False), ("sd1", True)])
def test_partial_call_with_the_cache_of_the_same_inputs_equals_the_full_unet(family, inpainting):
    unet = tiny_components(family, inpainting=inpainting)["unet"].eval()
    sample, embeds, kwargs = unet_inputs(family, unet)
    t = torch.tensor(601)
    cache = StepCache(unet, interval=3, calls=10)
    with torch.inference_mode():
        full = cache(0, sample, t, embeds, kwargs)
        plain = unet(sample, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
        partial = cache.partial(sample, t, embeds, kwargs)
    assert torch.equal(full, plain)
    assert cache.full_calls == 1 and cache.partial_calls == 1
    torch.testing.assert_close(partial, full, rtol=0, atol=1e-5)
    # at another timestep and input the partial call is no longer the full one (it reuses the deep features)
    with torch.inference_mode():
        moved = cache.partial(sample * 0.5, torch.tensor(101), embeds, kwargs)
        exact = unet(sample * 0.5, torch.tensor(101), encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
    assert not torch.allclose(moved, exact, atol=1e-3)


def test_partial_call_adds_the_controlnet_residuals_of_the_branch_it_runs():
    unet = tiny_components("sd1")["unet"].eval()
    controlnet = tiny_controlnet("sd1")
    sample, embeds, _ = unet_inputs("sd1", unet)
    t = torch.tensor(601)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        down, mid = controlnet(sample, t, encoder_hidden_states=embeds, controlnet_cond=hint, return_dict=False)
        kwargs = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        cache = StepCache(unet, interval=2, calls=10)
        full = cache(0, sample, t, embeds, kwargs)
        partial = cache(1, sample, t, embeds, kwargs)
        without = cache.partial(sample, t, embeds, {})
    assert cache.full_calls == 1 and cache.partial_calls == 2
    # residuals stopping (a guidance window) or down-only (adapter-style) residuals make the call full
    assert cache.needs_full(1, sample, embeds, {})
    assert cache.needs_full(1, sample, embeds, {"down_block_additional_residuals": tuple(down)})
    torch.testing.assert_close(partial, full, rtol=0, atol=1e-5)
    assert not torch.allclose(without, full, atol=1e-3)  # the shallow residuals do count


def test_full_calls_follow_the_interval_and_new_embeddings_refresh_the_cache():
    unet = tiny_components("sd1")["unet"].eval()
    sample, embeds, _ = unet_inputs("sd1", unet)
    edited = embeds + 1
    cache = StepCache(unet, interval=3, calls=8)
    fulls = []
    with torch.inference_mode():
        for i in range(8):
            before = cache.full_calls
            # prompt editing at call 4: new embeddings make that call full
            cache(i, sample, torch.tensor(900 - 100 * i), embeds if i < 4 else edited, {})
            fulls.append(cache.full_calls > before)
    assert [i for i, full in enumerate(fulls) if full] == [0, 3, 4, 6, 7]  # first, every 3rd, new prompt, last


def test_interval_zero_calls_the_unet_plainly():
    unet = tiny_components("sd1")["unet"].eval()
    assert not isinstance(unet_runner(unet, 0, 10), StepCache)
    assert isinstance(unet_runner(unet, 2, 10), StepCache)


def test_interval_zero_is_the_default_and_pixel_identical(engine):
    calls, off = deep_calls(engine, txt2img(), 0)
    default = engine.generate(txt2img())
    assert calls == 8  # one batched CFG forward per step
    assert np.array_equal(pixels(off), pixels(default))
    assert "Step cache" not in parse_infotext(off.infotexts[0])


def test_interval_three_skips_the_deep_unet_and_stays_close(engine):
    exact = pixels(engine.generate(txt2img()))
    calls, cached = deep_calls(engine, txt2img(), 3)
    assert calls == 4  # steps 0, 3, 6 and the last (7)
    diff = float(np.abs(pixels(cached) - exact).mean())
    assert 0 < diff < CLOSE
    assert parse_infotext(cached.infotexts[0])["Step cache"] == 3


def test_a_compiled_unet_runs_whole_and_the_job_says_so(engine, monkeypatch):
    unet = engine.models.get(SD15).unet
    exact = pixels(engine.generate(txt2img()))
    # What torch.compile sets, eager underneath (is_compiled() is True); the CPU would un-compile it before the job.
    monkeypatch.setattr(acceleration, "prepare", lambda *args, **kwargs: None)
    unet._compiled_call_impl = unet._call_impl
    try:
        calls, result = deep_calls(engine, txt2img(), 2)
    finally:
        unet._compiled_call_impl = None
    assert calls == 8 and np.array_equal(pixels(result), exact)
    assert "Step cache" not in parse_infotext(result.infotexts[0])  # the infotext tells what ran
    assert any("step caching is off for this model" in w for w in result.warnings), result.warnings


def test_sdxl_and_hires_restart_the_cache(engine):
    request = txt2img(checkpoint=SDXL, steps=6, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                      hr_second_pass_steps=4, denoising_strength=0.5)
    calls, result = deep_calls(engine, request, 2)
    # first pass: 0, 2, 4, 5 (last); hires pass, a new cache: 0, 2, 3 (last)
    assert calls == 4 + 3
    assert result.images[0].size == (96, 96)
    exact = pixels(engine.generate(request))
    assert 0 < float(np.abs(pixels(result) - exact).mean()) < CLOSE


def test_controlnet_job_runs_with_the_cache(tiny_models, engine_factory, tmp_path_factory):
    from tests.fixtures.api_helpers import b64_png
    from tests.fixtures.tiny_controlnets import write_tiny_controlnets
    from webui.extensions import load_extensions

    write_tiny_controlnets(tiny_models / "ControlNet")
    engine = engine_factory(checkpoint_cache=2)
    load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("plugins"))
    square = Image.new("RGB", (64, 64))
    ImageDraw.Draw(square).rectangle((16, 16, 47, 47), fill=(255, 255, 255))
    unit = {"module": "none", "model": "tiny-controlnet-sd15", "image": b64_png(square)}
    request = txt2img(alwayson_scripts={"controlnet": [unit]})
    exact = pixels(engine.generate(request))
    calls, cached = deep_calls(engine, request, 2)
    assert calls == 5  # 0, 2, 4, 6, 7
    params = parse_infotext(cached.infotexts[0])
    assert params["Step cache"] == 2 and "ControlNet 0" in params
    assert 0 < float(np.abs(pixels(cached) - exact).mean()) < CLOSE


@pytest.mark.parametrize("value", [1, 6, -1])
def test_option_accepts_only_off_or_two_to_five(value):
    assert Options().step_cache_interval == 0
    assert Options(step_cache_interval=5).step_cache_interval == 5
    with pytest.raises(ValidationError, match="step_cache_interval"):
        Options(step_cache_interval=value)
