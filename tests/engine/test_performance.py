"""Speed features keep the image: previews that do not wait for the GPU, TAESD previews, channels-last,
torch.compile (where supported), the LCM sampler and CFG 1 skipping the unconditional pass."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderTiny

from pipelines.models import acceleration
from pipelines.models.taesd import find_taesd, load_taesd
from pipelines.sampling import latents as latent_ops
from pipelines.sampling.previews import PreviewMaker, preview_maker
from tests.helpers import SD15, SDXL, txt2img

#: Mean absolute difference, in 0..255 levels, allowed between an optimised and a plain image (fp32, CPU).
TOLERANCE = 0.5


def mean_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def tiny_taesd(seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_preview_maker_gives_the_synchronous_preview(family):
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    maker = PreviewMaker(family)
    assert maker.poll() is None
    maker.submit(latents)
    image = maker.poll()
    assert image is not None and maker.poll() is None  # each preview is handed out once
    expected = latent_ops.preview(latents, family)
    assert image.size == expected.size == (48, 32)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_taesd_folder_gives_full_size_previews(engine, tmp_path):
    model = engine.models.get(SD15)
    folder = tmp_path / "VAE-taesd"
    tiny_taesd().save_pretrained(folder / "taesd")
    tiny_taesd(1).save_pretrained(folder / "taesdxl")
    assert find_taesd([folder], "sd1") == folder / "taesd"
    assert find_taesd([folder], "sdxl") == folder / "taesdxl"
    assert find_taesd([tmp_path / "missing"], "sd1") is None

    saved_dirs, saved_tiny = model.taesd_dirs, model.taesd
    try:
        model.taesd_dirs, model.taesd = (folder,), None
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        maker = preview_maker(model, "TAESD")
        maker.submit(latents)
        image = maker.poll()
        # The tiny VAE upsamples 8x: a full-size preview, and exactly the tiny VAE's own decode.
        assert image.size == (64, 64)
        expected = load_taesd(folder / "taesd").decode(latents, return_dict=False)[0][0]
        expected = (expected / 2 + 0.5).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(image, np.int16) - expected.astype(np.int16)).max() <= 1
        # Without weights, TAESD falls back to the cheap preview.
        model.taesd_dirs, model.taesd = (tmp_path / "empty",), None
        assert preview_maker(model, "TAESD").decoder is None
    finally:
        model.taesd_dirs, model.taesd = saved_dirs, saved_tiny


def test_taesd_single_files_load(tmp_path):
    torch.manual_seed(2)
    tiny = AutoencoderTiny()  # single files hold the published architecture (about 2.4 M weights)
    full = tmp_path / "taesd.safetensors"
    safetensors.torch.save_file(tiny.state_dict(), full)
    # The original decoder-only layout: layer k is diffusers' decoder.layers.{k-1} (after a clamp layer).
    original = {f"{int(key.split('.')[2]) + 1}.{key.split('.', 3)[3]}": value
                for key, value in tiny.state_dict().items() if key.startswith("decoder.layers.")}
    decoder_only = tmp_path / "taesd_decoder.safetensors"
    safetensors.torch.save_file(original, decoder_only)
    latents = torch.randn(1, 4, 4, 4)
    want = tiny.decode(latents).sample
    for path in (full, decoder_only):
        loaded = load_taesd(path)
        assert torch.allclose(loaded.decode(latents).sample, want, atol=1e-6)


def test_channels_last_keeps_the_image(engine):
    request = txt2img()
    plain = engine.generate(request).images[0]
    unet = engine.models.get(SD15).unet
    unet.to(memory_format=torch.channels_last)
    try:
        fast = engine.generate(request).images[0]
    finally:
        unet.to(memory_format=torch.contiguous_format)
    assert mean_diff(plain, fast) <= TOLERANCE


def test_compile_switches_on_and_off_and_tracks_sizes(engine):
    unet = engine.models.get(SD15).unet
    acceleration.compile_unet(unet)  # lazy: nothing is built until the first call
    try:
        assert acceleration.is_compiled(unet)
        assert acceleration.new_shapes(unet, [(2, 8, 8), (2, 16, 16)]) == [(2, 8, 8), (2, 16, 16)]
        assert acceleration.new_shapes(unet, [(2, 8, 8)]) == []
    finally:
        acceleration.uncompile_unet(unet)
    assert not acceleration.is_compiled(unet)
    model = engine.models.get(SD15)
    message = acceleration.prepare(model, True, [(2, 8, 8)], torch.device("cpu"))
    assert not acceleration.is_compiled(model.unet) and message is None  # CPU: compile is not offered
    shapes = acceleration.job_shapes(txt2img(batch_size=2, enable_hr=True, hr_scale=2.0), model)
    assert shapes == [(4, 8, 8), (4, 16, 16)]


@pytest.mark.gpu
@pytest.mark.skipif(not acceleration.compile_supported(torch.device("cuda")),
                    reason="torch.compile of the UNet needs a CUDA GPU with Triton")
def test_compiled_unet_keeps_the_image(tiny_models, tmp_path):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    paths = Paths(data_dir=tmp_path, models_dir=tiny_models, outputs_dir=tmp_path / "outputs")
    engine = Engine(EngineSettings(paths=paths, device="cuda", precision="full"))
    request = txt2img()
    plain = engine.generate(request).images[0]
    model = engine.models.get(SD15)
    message = acceleration.prepare(model, True, acceleration.job_shapes(request, model), model.unet.device)
    try:
        compiled = engine.generate(request).images[0]
    finally:
        acceleration.prepare(model, False, [], model.unet.device)
    assert message and "Compiling the UNet for 64x64" in message
    assert mean_diff(plain, compiled) <= TOLERANCE


@pytest.mark.parametrize("checkpoint", [SD15, SDXL])
def test_lcm_sampler_with_cfg_one_runs_one_unet_row_per_image(engine, checkpoint):
    unet = engine.models.get(checkpoint).unet
    rows = []
    hook = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        result = engine.generate(txt2img(checkpoint=checkpoint, sampler_name="LCM", steps=4, cfg_scale=1.0,
                                         batch_size=2))
        with_cfg = engine.generate(txt2img(checkpoint=checkpoint, sampler_name="LCM", steps=4, cfg_scale=2.0))
    finally:
        hook.remove()
    assert rows == [2] * 4 + [2] * 4  # CFG 1: no unconditional half; CFG 2 with batch 1: two rows
    assert len(result.images) == 2 and "Sampler: LCM" in result.infotexts[0] and "CFG scale: 1" in result.infotexts[0]
    assert np.asarray(result.images[0]).std() > 0 and np.asarray(with_cfg.images[0]).std() > 0
