"""SD 3.5 through the engine: the three layouts load offline (T5 optional) and give plain diffusers' pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.images.infotext import parse_infotext
from pipelines.models import families
from pipelines.models.weights import ModelFileError
from pipelines.request import GenerationRequest
from tests.fixtures.tiny_sd3 import tiny_sd3_pipeline, write_tiny_sd3
from tests.helpers import pixels

CLIPS = ["sd35_clip_l.safetensors", "sd35_clip_g.safetensors", "sd35_vae.safetensors"]


@pytest.fixture(scope="module")
def sd3_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-models")
    return root, write_tiny_sd3(root)


@pytest.fixture(scope="module")
def sd3_engine(sd3_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    data = tmp_path_factory.mktemp("sd3-data")
    paths = Paths(data_dir=data, models_dir=sd3_models[0], outputs_dir=data / "outputs")
    return Engine(EngineSettings(paths=paths, device="cpu", checkpoint_cache=1))


def _request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 9, "steps": 3,
                                "width": 64, "height": 64, "save_images": False, **fields})


def _reference(with_t5: bool, tokenizer_dir, seeds):
    pipe = tiny_sd3_pipeline(with_t5, tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a photo of a cat"] * len(seeds), negative_prompt=["blurry"] * len(seeds),
                num_inference_steps=3, height=64, width=64, guidance_scale=4.5,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds]).images


def _max_diff(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs, strict=True))


def test_detection(sd3_models):
    _, paths = sd3_models
    for name in ("diffusers", "single", "transformer"):
        assert families.family_of_path(paths[name]).name == "sd3", name


@pytest.mark.parametrize("checkpoint, modules, with_t5", [
    ("tiny-sd35-diffusers", [], True),
    ("tiny-sd35", [], True),  # one bf16 file holding everything
    ("tiny-sd35-transformer", CLIPS, False),  # split files, T5 left out
    ("tiny-sd35-transformer", [*CLIPS, "t5xxl_sd35.safetensors"], True),
])
def test_equals_plain_diffusers_sd3_pipeline(sd3_engine, sd3_models, checkpoint, modules, with_t5):
    result = sd3_engine.generate(_request(checkpoint=checkpoint, additional_modules=modules, batch_size=2))
    assert _max_diff(result.images, _reference(with_t5, sd3_models[1]["t5_tokenizer"], [9, 10])) <= 1
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["CFG scale"] == 4.5 and parsed["Sampler"] == "Euler"  # the family's defaults
    assert "Distilled CFG Scale" not in parsed


def test_missing_clip_g_names_the_file_and_folder(sd3_engine, sd3_models):
    root, _ = sd3_models
    with pytest.raises(ModelFileError) as error:
        sd3_engine.generate(_request(checkpoint="tiny-sd35-transformer",
                                     additional_modules=["sd35_clip_l.safetensors", "sd35_vae.safetensors"]))
    message = str(error.value)
    assert "CLIP-G text encoder" in message and "clip_g.safetensors" in message
    assert str(root / "text_encoder") in message


def test_lora_in_peft_format_equals_diffusers(sd3_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from tests.fixtures.tiny_sd3 import write_tiny_sd3_lora
    from webui.extensions import load_extensions

    root, paths = sd3_models
    lora = write_tiny_sd3_lora(root / "Lora")
    data = tmp_path_factory.mktemp("sd3-lora-data")
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=root, outputs_dir=data / "outputs"),
                                   device="cpu", checkpoint_cache=1))
    load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no_plugins"))
    result = engine.generate(_request(checkpoint="tiny-sd35-diffusers",
                                      prompt=f"a photo of a cat <lora:{lora.stem}:0.6>"))
    assert "Lora hashes" in parse_infotext(result.infotexts[0]) and not result.warnings
    pipe = tiny_sd3_pipeline(True, paths["t5_tokenizer"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], [0.6])
    theirs = pipe(prompt=["a photo of a cat"], negative_prompt=["blurry"], num_inference_steps=3, height=64, width=64,
                  guidance_scale=4.5, generator=[torch.Generator("cpu").manual_seed(9)]).images
    assert _max_diff(result.images, theirs) <= 1
    plain = _reference(True, paths["t5_tokenizer"], [9])
    assert _max_diff(result.images, plain) > 0


def test_our_prompt_language_shapes_the_clip_part(sd3_engine):
    from pipelines.models.families import sd3

    def image(prompt: str, **fields):
        result = sd3_engine.generate(_request(checkpoint="tiny-sd35-diffusers", prompt=prompt, **fields))
        return result.images, result.warnings

    plain, plain_warnings = image("a photo of a cat")
    weighted, warnings = image("a photo of a (cat:1.4)")
    same, _ = image("a photo of a (cat:1.0)")
    broken, _ = image("a photo BREAK of a cat")
    assert _max_diff(same, plain) == 0 and not plain_warnings
    assert _max_diff(weighted, plain) > 0 and _max_diff(broken, plain) > 0
    assert any("T5 reads the plain text" in warning for warning in warnings)
    # Past 75 CLIP tokens a second chunk carries the rest (diffusers would cut it off).
    long = "a photo of a cat, " * 19
    first, _ = image(long + "red")
    second, _ = image(long + "blue")
    assert _max_diff(first, second) > 0
    model = sd3_engine.models.get("tiny-sd35-diffusers")
    conditioning, _ = sd3.encode(model, [long + "red"], [""], 3, _request())
    segment = conditioning.at_step(0)
    assert segment.cond.shape[1] == 2 * 77 + sd3.MAX_SEQUENCE_LENGTH == segment.uncond.shape[1]
