"""Engine pieces that the generation tests do not reach: pickles through the engine, VAE decode paths,
the benchmark, and the command-line flags."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipelines.models.checkpoints import UnsafeCheckpointError
from pipelines.sampling import latents as latent_ops
from tests.fixtures.tiny_models import tiny_standalone_vae, write_malicious_ckpt, write_tiny_ckpt
from tests.helpers import txt2img
from webui.flags import parse_flags


def _engine_on(tmp_path, files: dict):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    for name, writer in files.items():
        writer(tmp_path / "models" / "Stable-diffusion" / name)
    return Engine(EngineSettings(paths=Paths.under(tmp_path), device="cpu"))


def test_safe_ckpt_generates(tmp_path):
    engine = _engine_on(tmp_path, {"tiny.ckpt": write_tiny_ckpt})
    result = engine.generate(txt2img(checkpoint="tiny.ckpt"))
    assert result.images[0].size == (64, 64)


def test_malicious_ckpt_is_refused_by_the_engine_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    engine = _engine_on(tmp_path, {"evil.ckpt": lambda p: write_malicious_ckpt(p, marker)})
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        engine.generate(txt2img(checkpoint="evil.ckpt"))
    assert not marker.exists()
    assert engine.models.current is None


def test_large_images_decode_in_tiles(monkeypatch):
    torch.manual_seed(0)
    vae = tiny_standalone_vae().eval()
    latents = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        whole, _ = latent_ops.decode(vae, latents)
        monkeypatch.setattr(latent_ops, "VAE_TILING_PIXELS", 64 * 64)
        calls = []
        monkeypatch.setattr(vae, "enable_tiling", lambda *a, **k: (calls.append(1), type(vae).enable_tiling(vae)))
        tiled, _ = latent_ops.decode(vae, latents)
    assert calls, "a large image must be decoded with tiling"
    assert not vae.use_tiling, "tiling is switched off again after the decode"
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    assert torch.isfinite(tiled).all()
    # How close tiles come to the whole decode depends on trained weights (each tile has its own
    # GroupNorm statistics); a random VAE says nothing about that, so only the path is checked here.


def test_large_images_encode_in_tiles(monkeypatch):
    torch.manual_seed(0)
    vae = tiny_standalone_vae().eval()
    pixels = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.inference_mode():
        whole = latent_ops.encode(vae, pixels, [torch.Generator().manual_seed(1)])
        monkeypatch.setattr(latent_ops, "VAE_TILING_PIXELS", 64 * 64)
        calls = []
        monkeypatch.setattr(vae, "_tiled_encode", lambda x: (calls.append(x.shape), type(vae)._tiled_encode(vae, x))[1])
        tiled = latent_ops.encode(vae, pixels, [torch.Generator().manual_seed(1)])
    assert calls == [(1, 3, 128, 128)], "a large image must be encoded with tiling"
    assert not vae.use_tiling, "tiling is switched off again after the encode"
    assert tiled.shape == whole.shape == (1, 4, 16, 16)
    assert torch.isfinite(tiled).all()


def test_grids_go_to_the_grid_folder_options(engine):
    folder = engine.paths.data_dir / "grid-options"  # output folders must lie inside the data dir
    options = engine.options.with_overrides({"outdir_txt2img_grids": str(folder / "grids"),
                                             "outdir_txt2img_samples": "grid-options/samples"})
    result = engine.generate(txt2img(batch_size=2, steps=1, save_images=True), options=options)
    assert result.grid_path is not None and result.grid_path.parent == folder / "grids"
    assert [path.parent for path in result.paths] == [folder / "samples"] * 2
    default = engine.generate(txt2img(batch_size=2, steps=1, save_images=True))
    assert default.grid_path.parent.parent == engine.paths.outputs_dir / "txt2img-grids"


def test_half_precision_vae_overflow_retries_in_fp32(monkeypatch):
    vae = tiny_standalone_vae().eval().to(torch.bfloat16)
    original = type(vae).decode
    dtypes = []

    def decode(self, z, *args, **kwargs):
        dtypes.append(z.dtype)
        out = original(self, z, *args, **kwargs)
        if z.dtype != torch.float32:  # what an fp16 SDXL VAE does on some images
            out = (torch.full_like(out[0], float("nan")),)
        return out

    monkeypatch.setattr(type(vae), "decode", decode)
    with torch.inference_mode():
        pixels, upcast = latent_ops.decode(vae, torch.randn(1, 4, 8, 8))
    assert upcast and dtypes == [torch.bfloat16, torch.float32]
    assert torch.isfinite(pixels).all()
    assert next(vae.parameters()).dtype == torch.float32


def test_benchmark_reports_the_ratio(tiny_models, tmp_path):
    from benchmarks import engine as bench

    model = tmp_path / "bench-models" / "tiny-sd15-diffusers"
    shutil.copytree(tiny_models / "Stable-diffusion" / "tiny-sd15-diffusers", model)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--model", str(model), "--runs", "1", "--steps", "2", "--size", "64",
                       "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["time_ratio_vs_diffusers"] > 0
    assert figures["ours_it_per_s"] > 0 and figures["diffusers_it_per_s"] > 0
    assert figures["prompt_tokens"] > 250 and figures["prompt_parse_fraction_of_step"] >= 0


def test_flags_from_environment_and_command_line():
    flags = parse_flags(["--port", "9000", "--api-auth", "u:secret", "--medvram"],
                        {"COMMANDLINE_ARGS": "--listen --port 8000 --no-half-vae"})
    assert flags.listen and flags.port == 9000 and flags.medvram and flags.no_half_vae
    assert flags.host == "0.0.0.0" and flags.server_port == 9000
    public = flags.public()
    assert public["api_auth"] == "***" and "secret" not in json.dumps(public)
    settings = flags.engine_settings()
    assert settings.memory_mode == "medvram" and settings.no_half_vae


def test_test_flag_passes_the_rest_to_pytest():
    flags = parse_flags(["--skip-install", "--test", "-k", "engine", "-x"], {})
    assert flags.test and flags.skip_install and flags.test_args == ("-k", "engine", "-x")


def test_nowebui_defaults_to_port_7861_and_cpu_flag():
    flags = parse_flags(["--nowebui", "--use-cpu", "all", "--no-half"], {})
    assert flags.server_port == 7861
    settings = flags.engine_settings()
    assert settings.device == "cpu" and settings.precision == "full"


def test_model_folder_flags(tmp_path):
    extra = tmp_path / "more-checkpoints"
    flags = parse_flags(["--data-dir", str(tmp_path), "--ckpt-dir", str(extra)], {})
    paths = flags.paths()
    assert paths.model_dirs("checkpoint") == (tmp_path / "models" / "Stable-diffusion", extra)
    assert paths.outputs_dir == tmp_path / "outputs"


def test_pixels_round_trip_through_tensors():
    from PIL import Image

    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    back = latent_ops.tensor_to_pil(latent_ops.pil_to_tensor([image]))[0]
    assert np.array_equal(np.asarray(back), np.asarray(image))


# --- upscaler tiling in jobs, and the Extras job on files --------------------------------------------


@pytest.mark.parametrize("denoising", [0.0, 0.5])
def test_hires_image_upscaler_uses_the_tiling_options(engine, denoising):
    from pipelines.options import Options

    calls: list[tuple[int, int]] = []
    hook = engine.upscalers.load("tiny-esrgan-4x").model.register_forward_hook(
        lambda _module, args, _out: calls.append(tuple(args[0].shape[-2:])))
    request = txt2img(enable_hr=True, hr_upscaler="tiny-esrgan-4x", hr_scale=2, denoising_strength=denoising,
                      hr_second_pass_steps=1, steps=2)
    try:
        whole = engine.generate(request, options=Options(upscaler_tile=0, upscaler_tile_overlap=0))
        whole_calls = list(calls)
        calls.clear()
        tiled = engine.generate(request, options=Options(upscaler_tile=32, upscaler_tile_overlap=8))
    finally:
        hook.remove()
    assert whole_calls == [(64, 64)]  # the 64 px first pass in one model call
    assert len(calls) == 9 and set(calls) == {(32, 32)}  # 3 x 3 tiles of 32 px overlapping by at least 8
    assert whole.images[0].size == tiled.images[0].size == (128, 128)


def test_extras_job_on_several_files_opens_them_in_turn(tmp_path):
    from PIL import Image

    from pipelines.images.saving import save_image
    from pipelines.options import Options
    from pipelines.settings import Paths
    from pipelines.upscaling import Upscalers
    from pipelines.upscaling.extras import ExtrasSettings, run_extras
    from tests.fixtures.pictures import picture
    from tests.fixtures.tiny_upscalers import write_tiny_esrgan

    write_tiny_esrgan(tmp_path / "models" / "ESRGAN" / "tiny4x.pth")
    upscalers = Upscalers(Paths.under(tmp_path), device="cpu")
    sources = tmp_path / "in"
    source_info = "a lighthouse\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 16x12"
    first = save_image(picture((16, 12)), sources, seed=42, infotext=source_info, fmt="png")
    second = sources / "b.jpg"
    picture((10, 20)).save(second, quality=95)
    broken = sources / "c.png"
    broken.write_bytes(b"not an image")
    folder = tmp_path / "extras-out"
    options = Options(outdir_extras_samples=str(folder), upscaler_tile=16, upscaler_tile_overlap=4)
    settings = ExtrasSettings(scale=2, upscaler_1="tiny4x")
    results = run_extras(upscalers, [first, second], settings, options, tmp_path / "outputs", save=True)
    assert [r.image.size for r in results] == [(32, 24), (20, 40)]
    assert results[0].infotext == f"{source_info}, Postprocess upscale by: 2, Postprocess upscaler: tiny4x"
    assert results[1].infotext == "Postprocess upscale by: 2, Postprocess upscaler: tiny4x"
    assert [r.path.parent for r in results] == [folder, folder]
    assert not (tmp_path / "outputs").exists()
    with Image.open(results[0].path) as saved:
        assert saved.info["parameters"] == results[0].infotext
        assert np.array_equal(np.asarray(saved), np.asarray(results[0].image))
    # Files are read one at a time: those before an unreadable one are done and saved when it fails.
    with pytest.raises(ValueError, match="c.png"):
        run_extras(upscalers, [first, second, broken], settings, options, tmp_path / "outputs", save=True)
    assert len(list(folder.glob("*.png"))) == 4
    default = run_extras(upscalers, [first], settings, Options(), tmp_path / "outputs", save=True)
    assert default[0].path.parent.parent == tmp_path / "outputs" / "extras-images"
