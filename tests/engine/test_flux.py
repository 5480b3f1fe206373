"""Flux.1 through the engine: the three layouts load offline, give plain diffusers' pixels, write Forge's keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.models import families
from pipelines.models.families import flux
from pipelines.models.weights import ModelFileError
from pipelines.request import GenerationRequest
from tests.fixtures.tiny_flux import tiny_flux_components, tiny_flux_pipeline, transformer_to_original, write_tiny_flux
from tests.helpers import pixels

SPLIT_MODULES = ["clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-models")
    return root, write_tiny_flux(root)


@pytest.fixture(scope="module")
def flux_engine(flux_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    data = tmp_path_factory.mktemp("flux-data")
    paths = Paths(data_dir=data, models_dir=flux_models[0], outputs_dir=data / "outputs")
    return Engine(EngineSettings(paths=paths, device="cpu", checkpoint_cache=2))


def _request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a photo of a cat", "seed": 5, "steps": 3, "width": 64, "height": 64,
                                "save_images": False, **fields})


def _reference(guidance: bool, tokenizer_dir, seeds, **kwargs):
    pipe = tiny_flux_pipeline(guidance, tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a photo of a cat"] * len(seeds), num_inference_steps=3, height=64, width=64,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds], **kwargs).images


def _max_diff(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs, strict=True))


def test_our_converter_equals_diffusers_on_the_real_width():
    # diffusers' converter fixes the width at 3072 (the real model); the input features may stay small.
    inner, mlp, small = 3072, 4 * 3072, 2
    torch.manual_seed(0)
    reference = transformer_to_original(tiny_flux_components(True)["transformer"])
    fake = {}
    for key, value in reference.items():
        rows = {"img_in.weight": inner, "single_blocks.0.linear1.weight": 3 * inner + mlp,
                "single_blocks.0.linear1.bias": 3 * inner + mlp}.get(key)
        if key.endswith("qkv.weight") or key.endswith("qkv.bias"):
            rows = 3 * inner
        shape = (rows, *value.shape[1:]) if rows else value.shape
        fake[key] = torch.randn(shape[:1] + tuple(min(d, small) for d in shape[1:]))
    ours = flux.convert_transformer(dict(fake))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(fake))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_detection_of_each_layout(flux_models):
    _, paths = flux_models
    for name in ("dev-diffusers", "dev-single", "schnell-unet", "dev-fp8"):
        assert families.family_of_path(paths[name]).name == "flux", name
    assert flux.module_kind(["model.diffusion_model.img_in.weight"]) is None
    from pipelines.models.weights import read_safetensors_header

    kinds = {name: flux.module_kind(read_safetensors_header(paths[name])[1]) for name in ("clip_l", "t5xxl", "ae")}
    assert kinds == {"clip_l": "clip_l", "t5xxl": "t5xxl", "ae": "vae"}


@pytest.mark.parametrize("checkpoint, modules", [
    ("tiny-flux-dev-diffusers", []),
    ("tiny-flux-dev", []),  # one bf16 file holding everything, original keys
])
def test_dev_equals_plain_diffusers_flux_pipeline(flux_engine, flux_models, checkpoint, modules):
    result = flux_engine.generate(_request(checkpoint=checkpoint, additional_modules=modules, batch_size=2))
    theirs = _reference(True, flux_models[1]["t5_tokenizer"], [5, 6], guidance_scale=3.5)
    assert _max_diff(result.images, theirs) <= 1
    assert result.seeds == [5, 6]


def test_split_schnell_files_equal_plain_diffusers(flux_engine, flux_models):
    result = flux_engine.generate(_request(checkpoint="tiny-flux-schnell", additional_modules=SPLIT_MODULES))
    assert _max_diff(result.images, _reference(False, flux_models[1]["t5_tokenizer"], [5])) <= 1
    assert "Distilled CFG Scale" not in result.infotexts[0]  # schnell has no distilled guidance


def test_infotext_round_trip_and_defaults(flux_engine):
    result = flux_engine.generate(_request(checkpoint="tiny-flux-dev", distilled_cfg_scale=4.5,
                                           sampler_name="LMS"))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Distilled CFG Scale"] == 4.5
    assert parsed["Sampler"] == "Euler" and parsed["CFG scale"] == 1.0  # the family's sampler; real CFG off
    assert any("LMS was replaced by Euler" in warning for warning in result.warnings)
    fields = request_fields_from_infotext(parsed)
    assert fields["distilled_cfg_scale"] == 4.5
    known = {name: value for name, value in fields.items() if name in GenerationRequest.model_fields}
    again = flux_engine.generate(_request(**known, checkpoint=fields["sd_model_name"]))
    assert _max_diff(again.images, result.images) == 0


def test_distilled_guidance_and_real_cfg_change_the_image(flux_engine):
    base = flux_engine.generate(_request(checkpoint="tiny-flux-dev")).images
    other = flux_engine.generate(_request(checkpoint="tiny-flux-dev", distilled_cfg_scale=9.0)).images
    real_cfg = flux_engine.generate(_request(checkpoint="tiny-flux-dev", cfg_scale=3.0,
                                             negative_prompt="a dog")).images
    assert _max_diff(base, other) > 0 and _max_diff(base, real_cfg) > 0


def test_fp8_transformer_is_upcast_on_load(flux_engine):
    model = flux_engine.models.get("tiny-flux-dev-fp8", modules=SPLIT_MODULES)
    expected = flux.convert_transformer({key: value.to(torch.float8_e4m3fn).float() for key, value in
                                         transformer_to_original(tiny_flux_components(True)["transformer"]).items()})
    loaded = model.pipe.transformer.state_dict()
    assert model.pipe.transformer.dtype == torch.float32
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    result = flux_engine.generate(_request(checkpoint="tiny-flux-dev-fp8", additional_modules=SPLIT_MODULES))
    assert len(result.images) == 1


def test_missing_text_encoder_names_the_file_and_folder(flux_engine, flux_models):
    root, _ = flux_models
    with pytest.raises(ModelFileError) as error:
        flux_engine.generate(_request(checkpoint="tiny-flux-schnell",
                                      additional_modules=["clip_l.safetensors", "ae.safetensors"]))
    message = str(error.value)
    assert "T5-XXL text encoder" in message and "t5xxl_fp16.safetensors" in message
    assert str(root / "text_encoder") in message and "tiny-flux-schnell.safetensors" in message


def test_unknown_module_is_refused_naming_the_field(flux_engine):
    from pipelines.plan import RequestError

    with pytest.raises(RequestError) as error:
        flux_engine.plan(_request(checkpoint="tiny-flux-schnell", additional_modules=["nope.safetensors"]))
    assert error.value.field == "additional_modules" and "clip_l.safetensors" in str(error.value)


def test_size_not_a_multiple_of_16_is_refused(flux_engine):
    from pipelines.plan import RequestError

    with pytest.raises(RequestError, match="width must be a multiple of 16") as error:
        flux_engine.generate(_request(checkpoint="tiny-flux-dev", width=72))
    assert error.value.field == "width"


def test_interrupt_decodes_the_latents_at_hand(flux_engine):
    from pipelines.job_control import JobControl

    control = JobControl()
    original = control.update

    def interrupt_at_step_two(**fields):
        original(**fields)
        if fields.get("step") == 2:
            control.interrupt()

    control.update = interrupt_at_step_two
    result = flux_engine.generate(_request(checkpoint="tiny-flux-dev", steps=4), control=control)
    full = flux_engine.generate(_request(checkpoint="tiny-flux-dev", steps=4)).images
    assert result.interrupted and len(result.images) == 1
    assert 0 < _max_diff(result.images, full)  # not the finished image, and not an error


def test_lora_in_peft_format_equals_diffusers_and_is_undone(flux_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from tests.fixtures.tiny_flux import write_tiny_flux_lora
    from webui.extensions import load_extensions

    root, paths = flux_models
    lora = write_tiny_flux_lora(root / "Lora")
    data = tmp_path_factory.mktemp("flux-lora-data")
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=root, outputs_dir=data / "outputs"),
                                   device="cpu", checkpoint_cache=1))
    extensions = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no_plugins"))
    assert next(r for r in extensions.records if r.name == "lora").loaded
    plain = engine.generate(_request(checkpoint="tiny-flux-dev-diffusers")).images
    with_lora = engine.generate(_request(checkpoint="tiny-flux-dev-diffusers", prompt="a photo of a cat <lora:"
                                         f"{lora.stem}:0.7>"))
    assert "Lora hashes" in parse_infotext(with_lora.infotexts[0]) and not with_lora.warnings
    pipe = tiny_flux_pipeline(True, paths["t5_tokenizer"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    theirs = pipe(prompt=["a photo of a cat"], num_inference_steps=3, height=64, width=64, guidance_scale=3.5,
                  generator=[torch.Generator("cpu").manual_seed(5)]).images
    assert _max_diff(with_lora.images, theirs) <= 1 and _max_diff(with_lora.images, plain) > 0
    after = engine.generate(_request(checkpoint="tiny-flux-dev-diffusers")).images
    assert _max_diff(after, plain) == 0  # the LoRA was only there for its job


def test_t5_reads_plain_text():
    assert flux._plain_text("a photo of a cat") == ("a photo of a cat", False)
    assert flux._plain_text("a (red:1.3) fox BREAK snow") == ("a red fox snow", True)
    assert flux._plain_text(r"a \(b\)") == ("a (b)", False)


def test_schnell_runs_its_few_steps_when_the_request_names_none(flux_engine, flux_models):
    assert flux.is_schnell(flux_models[1]["schnell-unet"]) and not flux.is_schnell(flux_models[1]["dev-single"])
    assert not flux.is_schnell(flux_models[1]["dev-diffusers"])
    fields = {"prompt": "a photo of a cat", "seed": 5, "width": 64, "height": 64, "save_images": False}
    schnell = flux_engine.generate(GenerationRequest(**fields, checkpoint="tiny-flux-schnell",
                                                     additional_modules=SPLIT_MODULES))
    assert parse_infotext(schnell.infotexts[0])["Steps"] == flux.SCHNELL_STEPS
    asked = flux_engine.generate(GenerationRequest(**fields, steps=2, checkpoint="tiny-flux-schnell",
                                                   additional_modules=SPLIT_MODULES))
    assert parse_infotext(asked.infotexts[0])["Steps"] == 2  # a request's own steps win


def test_a_refiner_is_refused_naming_the_field(flux_engine):
    from pipelines.plan import RequestError

    with pytest.raises(RequestError, match="Refiner runs on SD 1.x, SD 2.x and SDXL models, not Flux.1") as error:
        flux_engine.generate(_request(checkpoint="tiny-flux-dev", refiner_checkpoint="tiny-flux-dev"))
    assert error.value.field == "refiner_checkpoint"


def test_a_controlnet_unit_is_refused_naming_the_unit(flux_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from tests.fixtures.api_helpers import b64_png
    from tests.fixtures.pictures import picture
    from tests.fixtures.tiny_controlnets import write_tiny_controlnets
    from webui.extensions import load_extensions

    root = flux_models[0]
    write_tiny_controlnets(root / "ControlNet")
    data = tmp_path_factory.mktemp("flux-controlnet-data")
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=root, outputs_dir=data / "outputs"),
                                   device="cpu", checkpoint_cache=1))
    load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no_plugins"))
    unit = {"module": "none", "model": "tiny-controlnet-sd15", "image": b64_png(picture())}
    with pytest.raises(ValueError, match="ControlNet unit 0: ControlNet and IP-Adapter units work with SD 1.x, SD 2.x "
                                        "and SDXL checkpoints here, not with Flux.1 models"):
        engine.generate(_request(checkpoint="tiny-flux-dev", alwayson_scripts={"controlnet": [unit]}))
