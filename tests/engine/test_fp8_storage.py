"""The ``fp8_storage`` option (A1111's "FP8 weight"): the denoiser kept in float8, cast per layer as it runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines.images.infotext import parse_infotext
from pipelines.sampling.samplers import build_scheduler
from tests.helpers import SD15, pixels, txt2img

SDXL = "tiny-sdxl.safetensors"


@pytest.fixture(scope="module")
def fp8_engine(engine_factory, tiny_models, tmp_path_factory):
    """An engine of its own (these tests reload models as the option changes), with the built-in LoRA extension."""
    from tests.fixtures.tiny_loras import write_tiny_loras
    from webui.extensions import load_extensions

    write_tiny_loras(tiny_models / "Lora", "sd1")
    engine = engine_factory(checkpoint_cache=2)
    load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no_plugins"))
    return engine


def _options(engine, choice: str):
    return engine.options.model_copy(update={"fp8_storage": choice})


def _linear_weight_dtypes(denoiser: torch.nn.Module) -> set[torch.dtype]:
    return {module.weight.dtype for module in denoiser.modules() if isinstance(module, torch.nn.Linear)}


def test_fp8_weight_gives_diffusers_layerwise_casting_pixels(fp8_engine):
    request = txt2img(checkpoint=SD15, sampler_name="Euler", batch_size=2, seed=31)
    full = fp8_engine.generate(request, options=_options(fp8_engine, "Disable"))
    reference_components = dict(fp8_engine.models.get(SD15, fp8_storage="Disable").pipe.components)
    reference_components["unet"] = copy.deepcopy(reference_components["unet"])
    reference_components["unet"].enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                          compute_dtype=torch.float32)

    stored = fp8_engine.generate(request, options=_options(fp8_engine, "Enable"))

    model = fp8_engine.models.get(SD15, fp8_storage="Enable")
    assert model.fp8 and _linear_weight_dtypes(model.unet) == {torch.float8_e4m3fn}
    assert model.unet.dtype == torch.float32  # what sampling computes in
    pipe = StableDiffusionPipeline(**reference_components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("Euler", "Automatic", model.scheduler_config)
    theirs = pipe(prompt=[request.prompt] * 2, negative_prompt=[request.negative_prompt] * 2,
                  num_inference_steps=request.steps, guidance_scale=request.cfg_scale, width=64, height=64,
                  generator=[torch.Generator("cpu").manual_seed(seed) for seed in (31, 32)]).images
    for ours, reference, unrounded in zip(stored.images, theirs, full.images, strict=True):
        assert int(np.abs(pixels(ours) - pixels(reference)).max()) <= 1
        assert not np.array_equal(pixels(ours), pixels(unrounded)), "fp8 rounding must change the weights used"
    assert parse_infotext(stored.infotexts[0])["FP8 weight"] == "Enable"
    assert "FP8 weight" not in parse_infotext(full.infotexts[0])


def test_turning_it_off_loads_the_full_precision_weights_again(fp8_engine):
    request = txt2img(checkpoint=SD15, seed=5)
    before = fp8_engine.generate(request, options=_options(fp8_engine, "Disable")).images[0]
    fp8_engine.generate(request, options=_options(fp8_engine, "Enable"))
    after = fp8_engine.generate(request, options=_options(fp8_engine, "Disable")).images[0]
    model = fp8_engine.models.get(SD15, fp8_storage="Disable")
    assert not model.fp8 and _linear_weight_dtypes(model.unet) == {torch.float32}
    assert np.array_equal(pixels(before), pixels(after))


def test_enable_for_sdxl_stores_only_sdxl_models_in_fp8(fp8_engine):
    assert not fp8_engine.models.get(SD15, fp8_storage="Enable for SDXL").fp8
    sdxl = fp8_engine.models.get(SDXL, fp8_storage="Enable for SDXL")
    assert sdxl.fp8 and torch.float8_e4m3fn in _linear_weight_dtypes(sdxl.unet)


def test_the_engines_option_applies_to_models_loaded_outside_a_job(fp8_engine):
    fp8_engine.options = _options(fp8_engine, "Enable")
    try:
        assert fp8_engine.models.get(SD15).fp8  # as the top bar or /sdapi/v1/options load it
    finally:
        fp8_engine.options = _options(fp8_engine, "Disable")
    assert not fp8_engine.models.get(SD15).fp8


def test_a_lora_applies_over_fp8_weights(fp8_engine):
    options = _options(fp8_engine, "Enable")
    plain = fp8_engine.generate(txt2img(checkpoint=SD15, seed=9), options=options)
    tagged = txt2img(checkpoint=SD15, seed=9, prompt="a photo of a cat <lora:tiny-sd15-lora-kohya:1>")
    first, second = (fp8_engine.generate(tagged, options=options) for _ in range(2))
    assert not first.warnings, first.warnings
    assert not np.array_equal(pixels(plain.images[0]), pixels(first.images[0])), "the LoRA must change the image"
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    assert _linear_weight_dtypes(fp8_engine.models.get(SD15, fp8_storage="Enable").unet) >= {torch.float8_e4m3fn}


def test_an_unknown_choice_names_the_option():
    from pipelines.models.acceleration import fp8_wanted

    with pytest.raises(ValueError, match="fp8_storage: 'Always' is not one of Disable, Enable for SDXL, Enable"):
        fp8_wanted("Always", "sd1", torch.device("cpu"))


def test_a_flux_transformer_runs_from_fp8_storage(tmp_path):
    from pipelines.engine import Engine
    from pipelines.options import Options
    from pipelines.request import GenerationRequest
    from pipelines.settings import EngineSettings, Paths
    from tests.fixtures.tiny_flux import write_tiny_flux

    write_tiny_flux(tmp_path / "models")
    paths = Paths(data_dir=tmp_path / "data", models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    engine = Engine(EngineSettings(paths=paths, device="cpu"), Options(fp8_storage="Enable"))
    request = GenerationRequest(prompt="a photo of a cat", seed=3, steps=2, width=64, height=64, save_images=False,
                                checkpoint="tiny-flux-dev.safetensors")
    result = engine.generate(request)
    model = engine.models.get("tiny-flux-dev.safetensors")
    assert model.fp8 and torch.float8_e4m3fn in _linear_weight_dtypes(model.unet)
    assert pixels(result.images[0]).std() > 1
    assert parse_infotext(result.infotexts[0])["FP8 weight"] == "Enable"
