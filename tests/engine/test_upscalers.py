"""Upscalers: the registry, safe loading through spandrel, tiled inference, exact output sizes, progress and stop."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.job_control import JobControl, JobInterrupted
from pipelines.models.checkpoints import UnsafeCheckpointError
from pipelines.settings import Paths
from pipelines.upscaling import (
    Upscalers,
    count_tiles,
    inference_dtype,
    load_upscaler_model,
    pil_to_tensor,
    target_size,
    tensor_to_pil,
    tiled_upscale,
)
from tests.fixtures.tiny_upscalers import tiny_esrgan_state_dict, write_tiny_esrgan


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upscalers")
    models = root / "models"
    write_tiny_esrgan(models / "ESRGAN" / "tiny4x.pth", scale=4)
    write_tiny_esrgan(models / "RealESRGAN" / "tiny2x.safetensors", scale=2, seed=1)
    # Real-ESRGAN releases nest their weights under params_ema.
    torch.save({"params_ema": tiny_esrgan_state_dict(2, seed=2)}, models / "RealESRGAN" / "nested2x.pth")
    # Same stem as the x4 model: listed under a longer name instead of shadowing it.
    write_tiny_esrgan(models / "RealESRGAN" / "tiny4x.pth", scale=4, seed=3)
    (models / "ESRGAN" / "readme.txt").write_text("not a model")
    (models / "ESRGAN" / ".hidden.pth").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def upscalers(data_dir) -> Upscalers:
    return Upscalers(Paths.under(data_dir), device="cpu")


def smooth_image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, H, W) image with gradients, waves and a little noise, away from 0 and 1."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))
    image = torch.stack([0.2 + 0.6 * x, 0.2 + 0.6 * y, 0.5 + 0.3 * torch.sin(9 * x + 7 * y)]) + 0.05 * noise
    return image[None].clamp(0, 1)


# --------------------------------------------------------------------------- the tiny model and loading


@pytest.mark.parametrize(("name", "scale"), [("tiny4x.pth", 4), ("tiny2x.safetensors", 2), ("nested2x.pth", 2)])
def test_tiny_models_are_detected_as_esrgan(data_dir, name, scale):
    folder = "ESRGAN" if name == "tiny4x.pth" else "RealESRGAN"
    model = load_upscaler_model(data_dir / "models" / folder / name)
    assert model.architecture.id == "ESRGAN"
    assert model.scale == scale
    assert model.dtype == torch.float32 and not model.model.training


def test_the_tiny_model_upscales_the_image_it_is_given():
    model = load_upscaler_model_from(tiny_esrgan_state_dict(4))
    image = smooth_image(20, 16)
    with torch.inference_mode():
        output = model(image)
    nearest = torch.nn.functional.interpolate(image, scale_factor=4, mode="nearest")
    assert output.shape == (1, 3, 64, 80)
    # Close to the input (a plausible upscale) but with a neighbourhood-dependent texture on top.
    assert 0.005 < (output - nearest).abs().mean() < 0.15


def load_upscaler_model_from(state: dict[str, torch.Tensor]):
    import spandrel

    return spandrel.ModelLoader().load_from_state_dict(state).eval()


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    models = tmp_path / "models" / "ESRGAN"
    models.mkdir(parents=True)
    script = f"open({str(marker)!r}, 'w').close()"
    payload = {"params_ema": tiny_esrgan_state_dict(4), "callbacks": _ShellCommand(
        f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}")}
    torch.save(payload, models / "evil.pth")
    upscalers = Upscalers(Paths.under(tmp_path), device="cpu")
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"):
        upscalers.upscale(Image.new("RGB", (8, 8)), "evil", scale=2)
    assert upscalers.scale("evil") is None  # listed without a scale, never loaded
    assert not marker.exists()


class _ShellCommand:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_half_precision_only_on_accelerators():
    model = load_upscaler_model_from(tiny_esrgan_state_dict(2))
    assert inference_dtype(model, torch.device("cpu"), half=True) == torch.float32
    assert inference_dtype(model, torch.device("cuda"), half=True) == torch.float16
    assert inference_dtype(model, torch.device("cuda"), half=False) == torch.float32


# --------------------------------------------------------------------------- registry


def test_listing_names_paths_and_scales(upscalers, data_dir):
    infos = {info.name: info for info in upscalers.upscalers}
    assert list(infos) == ["None", "Lanczos", "Nearest", "tiny4x", "nested2x", "tiny2x",
                           "RealESRGAN/tiny4x.pth"]
    assert infos["None"].path is None and infos["None"].model_name is None and upscalers.scale("Lanczos") is None
    assert infos["tiny4x"].path == data_dir / "models" / "ESRGAN" / "tiny4x.pth"
    assert infos["RealESRGAN/tiny4x.pth"].model_name == "tiny4x"
    assert infos["tiny2x"].kind == "realesrgan"
    assert [upscalers.scale(name) for name in ("tiny4x", "tiny2x", "nested2x")] == [4, 2, 2]
    assert upscalers.find("tiny2x.safetensors").name == "tiny2x"
    assert upscalers.find("LANCZOS").name == "Lanczos"


def test_extra_folders_are_listed(tmp_path):
    extra = tmp_path / "elsewhere"
    write_tiny_esrgan(extra / "sub" / "extra4x.pth")
    paths = Paths(data_dir=tmp_path, models_dir=tmp_path / "models", outputs_dir=tmp_path / "out",
                  extra_dirs={"esrgan": (extra,)})
    assert Upscalers(paths).names == ["None", "Lanczos", "Nearest", "extra4x"]


def test_official_realesrgan_files_get_a1111_names(tmp_path):
    write_tiny_esrgan(tmp_path / "models" / "RealESRGAN" / "RealESRGAN_x2plus.pth", scale=2)
    upscalers = Upscalers(Paths.under(tmp_path))
    assert upscalers.names == ["None", "Lanczos", "Nearest", "R-ESRGAN 2x+"]
    assert upscalers.find("RealESRGAN_x2plus").name == "R-ESRGAN 2x+"
    assert upscalers.scale("R-ESRGAN 2x+") == 2


def test_unreadable_files_get_no_scale_and_a_log_line(tmp_path, caplog):
    # What users drop into models/ESRGAN by mistake: a truncated download, a pickle that wants code,
    # weights of an architecture spandrel does not know, and an ESRGAN with a missing layer.
    models = tmp_path / "models" / "ESRGAN"
    write_tiny_esrgan(models / "good4x.pth", scale=4)
    models.joinpath("junk.pth").write_bytes(b"this is not a model")
    torch.save({"params_ema": tiny_esrgan_state_dict(4), "hook": _ShellCommand("true")}, models / "unsafe.pth")
    torch.save({"encoder.weight": torch.zeros(4, 4)}, models / "unknown.pth")
    broken = tiny_esrgan_state_dict(2)
    del broken["model.0.bias"]
    torch.save(broken, models / "broken.pth")
    upscalers = Upscalers(Paths.under(tmp_path), device="cpu")
    bad = ("broken", "junk", "unknown", "unsafe")
    with caplog.at_level("WARNING", logger="pipelines.upscaling.library"):
        scales = {name: upscalers.scale(name) for name in upscalers.names}
    assert scales == {"None": None, "Lanczos": None, "Nearest": None, "broken": None, "good4x": 4, "junk": None,
                      "unknown": None, "unsafe": None}
    for name in bad:
        lines = [record.getMessage() for record in caplog.records if f"{name}.pth" in record.getMessage()]
        assert len(lines) == 1, (name, caplog.text)
    assert "refusing to load" in caplog.text and "not an upscaler architecture" in caplog.text
    assert "Missing key" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.upscaling.library"):
        assert [upscalers.scale(name) for name in bad] == [None] * 4
    assert not caplog.records  # logged once per file version, not at every listing
    out = upscalers.upscale(Image.new("RGB", (8, 6), (90, 120, 150)), "good4x", scale=4)
    assert out.size == (32, 24)
    with pytest.raises(ValueError, match="junk.pth"):
        upscalers.upscale(Image.new("RGB", (8, 6)), "junk", scale=2)


def test_errors_name_the_field(upscalers):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(LookupError, match=r"'4x-UltraSharp'.*None, Lanczos, Nearest, tiny4x"):
        upscalers.upscale(image, "4x-UltraSharp", scale=2)
    with pytest.raises(ValueError, match="either scale"):
        upscalers.upscale(image, "Lanczos", scale=2, size=(16, 16))
    with pytest.raises(ValueError, match="either scale"):
        upscalers.upscale(image, "Lanczos")
    with pytest.raises(ValueError, match="scale: "):
        upscalers.upscale(image, "Lanczos", scale=0)
    with pytest.raises(ValueError, match="size: "):
        upscalers.upscale(image, "Lanczos", size=(0, 16))
    with pytest.raises(ValueError, match="tile: "):
        upscalers.upscale(image, "tiny4x", scale=2, tile=8)
    with pytest.raises(ValueError, match="overlap: "):
        upscalers.upscale(image, "tiny4x", scale=2, tile=32, overlap=20)
    with pytest.raises(ValueError, match="not a model"):
        upscalers.load("Nearest")


# --------------------------------------------------------------------------- tiling


def test_tiled_inference_matches_whole_image():
    model = load_upscaler_model_from(tiny_esrgan_state_dict(4))
    image = smooth_image(56, 64)
    with torch.inference_mode():
        whole = model(image)
        tiled = tiled_upscale(model, image, 4, tile=32, overlap=16)
        # Without overlap the tiles see zero padding at their edges: the comparison can tell.
        naive = tiled_upscale(model, image, 4, tile=32, overlap=0)
    assert count_tiles(56, 64, 32, 16) == 9
    assert tiled.shape == whole.shape == (1, 3, 256, 224)
    assert (tiled - whole).abs().max() < 1e-4
    assert (naive - whole).abs().max() > 1e-3


def test_no_seams_on_a_flat_image(upscalers):
    # A flat colour upscales to a flat colour away from the image border; a tile edge would show as a line.
    image = Image.new("RGB", (64, 64), (120, 160, 90))

    def steps(tile: int, overlap: int) -> int:
        out = np.asarray(upscalers.upscale(image, "tiny4x", scale=4, tile=tile, overlap=overlap)).astype(int)
        inner = out[48:-48, 48:-48]
        return max(np.abs(np.diff(inner, axis=0)).max(), np.abs(np.diff(inner, axis=1)).max())

    assert steps(32, 16) == 0
    assert steps(32, 0) > 8


def _count_model_calls(upscalers: Upscalers, name: str) -> list[tuple[int, int]]:
    """The (height, width) of every tile the loaded model of ``name`` is called on from now on."""
    calls: list[tuple[int, int]] = []
    module = upscalers.load(name).model
    module.register_forward_hook(lambda _module, args, _out: calls.append(tuple(args[0].shape[-2:])))
    return calls


def test_tiling_defaults_and_the_calls_own_tiling(data_dir):
    upscalers = Upscalers(Paths.under(data_dir), device="cpu")
    calls = _count_model_calls(upscalers, "tiny4x")
    image = Image.fromarray((np.random.default_rng(5).random((40, 48, 3)) * 255).astype(np.uint8))
    default = upscalers.upscale(image, "tiny4x", scale=4)
    assert calls == [(40, 48)]  # the default 192 px tile holds the whole image
    calls.clear()
    tiled = upscalers.upscale(image, "tiny4x", scale=4, tile=24, overlap=8)
    assert len(calls) == count_tiles(48, 40, 24, 8) == 6 and set(calls) == {(24, 24)}
    assert np.abs(np.asarray(tiled, dtype=int) - np.asarray(default, dtype=int)).max() <= 2
    with pytest.raises(ValueError, match="overlap: "):
        upscalers.upscale(image, "tiny4x", scale=4, tile=32, overlap=20)
    with pytest.raises(ValueError, match="tile: "):
        upscalers.upscale(image, "tiny4x", scale=4, tile=8, overlap=0)


def test_progress_counts_every_tile_of_every_pass(upscalers):
    seen: list[tuple[int, int]] = []
    image = Image.fromarray((np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8))
    out = upscalers.upscale(image, "tiny2x", scale=4, tile=16, overlap=4, on_progress=lambda *a: seen.append(a))
    total = count_tiles(12, 10, 16, 4) + count_tiles(24, 20, 16, 4)  # x2 model, two passes
    assert out.size == (48, 40)
    assert seen == [(done, total) for done in range(1, total + 1)] and total == 5


def test_stop_between_tiles(upscalers):
    image = Image.new("RGB", (40, 40), (10, 20, 30))
    calls: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(JobInterrupted):
        upscalers.upscale(image, "tiny4x", scale=2, tile=16, overlap=4, should_stop=should_stop)
    assert len(calls) == 3
    job = JobControl()
    job.interrupt()
    with pytest.raises(JobInterrupted):
        upscalers.upscale(image, "tiny4x", scale=2, tile=16, overlap=4, should_stop=job.check)


# --------------------------------------------------------------------------- sizes and built-ins


@pytest.mark.parametrize(("scale", "size", "passes"), [(2, (24, 20), 1), (4, (48, 40), 1), (3.5, (42, 35), 1),
                                                       (8, (96, 80), 2), (0.5, (6, 5), 0)])
def test_scale_by_gives_exact_sizes(upscalers, scale, size, passes):
    image = Image.fromarray((np.random.default_rng(1).random((10, 12, 3)) * 255).astype(np.uint8))
    seen: list[tuple[int, int]] = []
    out = upscalers.upscale(image, "tiny4x", scale=scale, tile=0, on_progress=lambda *a: seen.append(a))
    assert out.size == size and out.mode == "RGB"
    assert len(seen) == passes


def test_x2_with_a_x4_model_is_the_x4_output_downsampled(upscalers):
    image = Image.fromarray((np.random.default_rng(2).random((10, 12, 3)) * 255).astype(np.uint8))
    x4 = upscalers.upscale(image, "tiny4x", scale=4, tile=0)
    x2 = upscalers.upscale(image, "tiny4x", scale=2, tile=0)
    assert np.array_equal(np.asarray(x2), np.asarray(x4.resize((24, 20), Image.Resampling.LANCZOS)))


def test_resize_to_with_and_without_crop(upscalers):
    # Wide image: red | blue | blue | green. Crop to a square keeps the blue middle; stretching keeps all.
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :4] = (220, 30, 30)
    pixels[:, 4:12] = (30, 30, 220)
    pixels[:, 12:] = (30, 220, 30)
    image = Image.fromarray(pixels)
    cropped = np.asarray(upscalers.upscale(image, "tiny4x", size=(32, 32), crop=True, tile=0)).astype(int)
    stretched = np.asarray(upscalers.upscale(image, "tiny4x", size=(40, 32), tile=0)).astype(int)
    assert cropped.shape == (32, 32, 3) and stretched.shape == (32, 40, 3)
    assert cropped[:, :, 2].mean() > 150 and cropped[:, :, 0].mean() < 80
    assert stretched[:, :5, 0].mean() > 150 and stretched[:, -5:, 1].mean() > 150


def test_builtin_resizers(upscalers):
    image = Image.fromarray((np.random.default_rng(3).random((10, 12, 3)) * 255).astype(np.uint8))
    lanczos = upscalers.upscale(image, "Lanczos", scale=3)
    nearest = upscalers.upscale(image, "Nearest", size=(24, 20))
    assert np.array_equal(np.asarray(lanczos), np.asarray(image.resize((36, 30), Image.Resampling.LANCZOS)))
    assert np.array_equal(np.asarray(nearest), np.asarray(image.resize((24, 20), Image.Resampling.NEAREST)))
    assert np.array_equal(np.asarray(upscalers.upscale(image, "None", scale=1)), np.asarray(image))
    assert upscalers.upscale(image, "None", size=(24, 20)).size == (24, 20)


def test_transparency_is_kept(upscalers):
    image = Image.new("RGBA", (12, 10), (200, 100, 50, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    out = upscalers.upscale(image, "tiny4x", scale=2, tile=0)
    assert out.mode == "RGBA" and out.size == (24, 20)
    assert out.getpixel((0, 0))[3] < 64 and out.getpixel((20, 15))[3] == 255


def test_target_size_and_tensor_round_trip():
    assert target_size((100, 60), scale=3.5) == (350, 210)
    assert target_size((100, 60), size=(2048, 2048)) == (2048, 2048)
    image = Image.fromarray((np.random.default_rng(4).random((5, 7, 3)) * 255).astype(np.uint8))
    pixels = pil_to_tensor(image)
    assert pixels.shape == (1, 3, 5, 7) and pixels.dtype == torch.float32
    assert np.array_equal(np.asarray(tensor_to_pil(pixels)), np.asarray(image))


# --------------------------------------------------------------------------- settings


def test_settings_tab_shows_the_upscaler_options_in_their_sections():
    from pipelines.options import Options
    from webui.ui.settings import NOT_IN_SETTINGS, option_control, option_sections

    sections = dict(option_sections())
    assert sections["Upscaling"] == ["upscaler_tile", "upscaler_tile_overlap"]
    assert "outdir_extras_samples" in sections["Saving images"]
    shown = [name for names in sections.values() for name in names]
    assert sorted(shown) == sorted(set(Options.model_fields) - NOT_IN_SETTINGS)  # each option once
    tile = option_control("upscaler_tile", 192)
    assert (tile.minimum, tile.maximum, tile.value) == (0, 2048, 192)
    assert option_control("outdir_extras_samples", "").elem_id == "setting_outdir_extras_samples"
