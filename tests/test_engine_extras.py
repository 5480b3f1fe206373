"""Engine pieces that the generation tests do not reach: pickles through the engine, VAE decode paths,
the benchmark, and the command-line flags."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipelines import latents as latent_ops
from pipelines.checkpoints import UnsafeCheckpointError
from tests.test_engine import txt2img
from tests.tiny_models import tiny_standalone_vae, write_malicious_ckpt, write_tiny_ckpt
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
    from pipelines import bench

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
