"""Flux.1 and SD 3.5 LoRAs in the layouts trainers publish (kohya sd-scripts, ComfyUI, ai-toolkit, XLabs, diffusers /
peft) through ``<lora:name:w>``: the engine's pixels equal those of the plain diffusers pipeline whose weights were
merged by hand from the file (W + w * alpha / rank * up @ down, in the layout the file names), the library tells
each file's family, and a LoRA of the other family is skipped with the usual message."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from pipelines.images.infotext import parse_infotext
from pipelines.models.families import flux
from pipelines.request import GenerationRequest
from tests.fixtures import tiny_flow_loras, tiny_flux, tiny_sd3
from tests.fixtures.tiny_flow_loras import FORMATS, XLABS_MODULES
from tests.helpers import pixels

WEIGHT = 0.7
CHECKPOINTS = {"flux": "tiny-flux-dev-diffusers", "sd3": "tiny-sd35-diffusers"}
_KOHYA_ENCODERS = {"flux": {"lora_te1_": "text_encoder"},
                   "sd3": {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One engine with the LoRA extension over the tiny Flux.1 and SD 3.5 models and every LoRA file."""
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from webui.extensions import load_extensions

    root = tmp_path_factory.mktemp("flow-models")
    tokenizer_dir = tiny_flux.write_tiny_flux(root)["t5_tokenizer"]
    tiny_sd3.write_tiny_sd3(root)
    loras = tiny_flow_loras.write_tiny_flow_loras(root / "Lora")
    data = tmp_path_factory.mktemp("flow-lora-data")
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=root, outputs_dir=data / "outputs"),
                                   device="cpu", checkpoint_cache=2))
    extensions = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no_plugins"))
    return engine, extensions, loras, tokenizer_dir


def _request(family: str, prompt: str = "a photo of a cat") -> GenerationRequest:
    fields = {"negative_prompt": "blurry"} if family == "sd3" else {}
    return GenerationRequest(prompt=prompt, checkpoint=CHECKPOINTS[family], seed=5, steps=3, width=64, height=64,
                             save_images=False, **fields)


def _plain_pipeline(family: str, tokenizer_dir):
    pipe = (tiny_flux.tiny_flux_pipeline(True, tokenizer_dir) if family == "flux"
            else tiny_sd3.tiny_sd3_pipeline(True, tokenizer_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(family: str, pipe):
    fields = {"negative_prompt": ["blurry"], "guidance_scale": 4.5} if family == "sd3" else {"guidance_scale": 3.5}
    return pipe(prompt=["a photo of a cat"], num_inference_steps=3, height=64, width=64,
                generator=[torch.Generator("cpu").manual_seed(5)], **fields).images


def _weights_by_lora_name(family: str, pipe, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every name a LoRA file may give a module (kohya, ComfyUI, XLabs, diffusers) -> the weight it adds to: a tensor
    of ``original`` (the transformer in the original layout) or a parameter of the pipeline."""
    names: dict[str, torch.Tensor] = {}
    for key, tensor in original.items():
        stem = key.removesuffix(".weight")
        names["lora_unet_" + stem.replace(".", "_")] = names["diffusion_model." + stem] = tensor
        parts = stem.split(".")
        if parts[0] == "double_blocks":
            for processor, module in XLABS_MODULES.items():
                if ".".join(parts[2:]) == module:
                    names[f"double_blocks.{parts[1]}.processor.{processor}"] = tensor
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            names[f"transformer.{name}"] = module.weight.data
    for prefix, component in _KOHYA_ENCODERS[family].items():
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear):
                published = name if name.startswith("text_model.") else "text_model." + name
                names[prefix + published.replace(".", "_")] = names[f"{component}.{published}"] = module.weight.data
    return names


def _merged_pipeline(family: str, path, tokenizer_dir, weight: float):
    """The plain diffusers pipeline with the LoRA file merged into its weights by hand: in the original layout (then
    converted as the model loaders convert checkpoints) for files naming original modules, in place otherwise."""
    pipe = _plain_pipeline(family, tokenizer_dir)
    to_original = tiny_flux.transformer_to_original if family == "flux" else tiny_sd3.transformer_to_original
    original = {key: value.clone() for key, value in to_original(pipe.transformer).items()}
    targets = _weights_by_lora_name(family, pipe, original)
    state = safetensors.torch.load_file(str(path))
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    touched_original = False
    with torch.no_grad():
        for stem in stems:
            down = next(state[stem + end].float() for end in (".lora_down.weight", ".lora_A.weight", ".down.weight")
                        if stem + end in state)
            up = next(state[stem + end].float() for end in (".lora_up.weight", ".lora_B.weight", ".up.weight")
                      if stem + end in state)
            alpha = float(state[stem + ".alpha"]) if stem + ".alpha" in state else down.shape[0]
            target = targets[stem]  # every module of the file is merged
            target += weight * alpha / down.shape[0] * (up @ down)
            touched_original = touched_original or any(target is tensor for tensor in original.values())
    if touched_original:
        convert = (flux.convert_transformer if family == "flux"
                   else lambda weights: convert_sd3_transformer_checkpoint_to_diffusers(dict(weights)))
        pipe.transformer.load_state_dict(convert(original))
    return pipe


@functools.cache
def _plain_images(family: str, tokenizer_dir) -> list:
    """The plain diffusers pipeline's image (the same in every test)."""
    return _run(family, _plain_pipeline(family, tokenizer_dir))


def _max_diff(ours, theirs) -> int:
    return max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("name", list(FORMATS))
def test_lora_equals_its_weights_merged_into_diffusers(setup, name):
    engine, _, loras, tokenizer_dir = setup
    family, _ = FORMATS[name]
    result = engine.generate(_request(family, f"a photo of a cat <lora:{name}:{WEIGHT}>"))
    assert not result.warnings
    assert name in parse_infotext(result.infotexts[0])["Lora hashes"]
    expected = _run(family, _merged_pipeline(family, loras[name], tokenizer_dir, WEIGHT))
    plain = _plain_images(family, tokenizer_dir)
    assert _max_diff(result.images, expected) <= 1
    assert _max_diff(result.images, plain) > 8  # the LoRA does change the image
    after = engine.generate(_request(family)).images
    assert _max_diff(after, plain) <= 1  # and was there for its job only


def test_library_tells_each_files_family(setup):
    """The Lora tab's cards and ``base_model`` name the family: from kohya's metadata, else from the key names."""
    from extensions.lora.library import LoraFile, LoraLibrary
    from extensions.lora.ui import card_facts, matching

    _, _, loras, _ = setup
    library = LoraLibrary(lambda: (loras["tiny-flux-lora-kohya"].parent,), lambda path: "0" * 64)
    labels = {"flux": "Flux.1", "sd3": "SD 3.5"}
    for name, (family, _) in FORMATS.items():
        file = library.get(name)
        assert file.base_model == labels[family], name
        assert labels[family] in card_facts(file)
        assert LoraFile(name, file.path, file.mtime_ns, {}, file.keys).base_model == labels[family], name
    assert {f.name for f in matching(library.files(), "flux.1")} == {n for n, (f, _) in FORMATS.items() if f == "flux"}


@pytest.mark.parametrize("family, other", [("flux", "tiny-sd35-lora-kohya"), ("flux", "tiny-sd35-lora-peft"),
                                           ("sd3", "tiny-flux-lora-kohya"), ("sd3", "tiny-flux-lora-aitoolkit")])
def test_lora_of_the_other_family_is_skipped(setup, family, other):
    engine, _, _, tokenizer_dir = setup
    result = engine.generate(_request(family, f"a photo of a cat <lora:{other}:1>"))
    (line,) = result.warnings
    assert other in line and "skipped" in line and f"does not fit the {family} model" in line
    assert "Lora hashes" not in parse_infotext(result.infotexts[0])
    assert _max_diff(result.images, _plain_images(family, tokenizer_dir)) <= 1


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_t5_modules_of_a_kohya_lora_are_left_out_with_a_log_line(family, caplog):
    from pipelines.models.families import sd3

    lora_keys = flux.lora_keys if family == "flux" else sd3.lora_keys
    state = tiny_flow_loras.kohya_lora(family, 60)
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # kohya's name of a T5 module (train_t5xxl)
    with_t5 = {**state, f"{t5}.lora_down.weight": torch.ones(4, 32), f"{t5}.lora_up.weight": torch.ones(32, 4),
               f"{t5}.alpha": torch.tensor(2.0)}
    converted = lora_keys(with_t5)
    assert converted.keys() == lora_keys(state).keys() and not any("lora_te3" in key for key in converted)
    assert "left out" in caplog.text and t5 in caplog.text
