"""Offline loading of A1111-style checkpoints through ``pipelines.models.checkpoints`` with tiny models."""

from __future__ import annotations

import json
import os
import pickletools
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.models.checkpoints import (
    CONFIGS_DIR,
    TOKENIZER_FILES_DIR,
    ModelFamily,
    UnsafeCheckpointError,
    detect_family,
    load_checkpoint,
    load_vae,
    read_state_dict,
)
from tests.fixtures import tiny_models as tiny

REPO = Path(__file__).resolve().parents[2]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"
#: kind -> (family name, inpainting, prediction type, pipeline class)
EXPECTED = {
    "sd15": ("sd1", False, "epsilon", StableDiffusionPipeline),
    "sd21-v": ("sd2", False, "v_prediction", StableDiffusionPipeline),
    "sdxl": ("sdxl", False, "epsilon", StableDiffusionXLPipeline),
    "sd15-inpainting": ("sd1", True, "epsilon", StableDiffusionPipeline),
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: loading must never touch the network."""

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tree(tiny_models) -> dict[str, Path]:
    """Paths of the tiny models in the session's model tree (``tiny_models`` comes from conftest)."""
    checkpoints = tiny_models / "Stable-diffusion"
    paths = {kind: checkpoints / f"tiny-{kind}.safetensors" for kind in tiny.KINDS}
    paths["sd15-diffusers"] = checkpoints / "tiny-sd15-diffusers"
    paths["vae"] = tiny_models / "VAE" / "tiny-vae.safetensors"
    return paths


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def loaded(tree, cache_dir) -> dict[str, tuple]:
    return {kind: load_checkpoint(tree[kind], torch_dtype=torch.float32, cache_dir=cache_dir) for kind in EXPECTED}


def assert_same_weights(loaded_model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = loaded_model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    different = [key for key in want if not torch.equal(got[key], want[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_single_file_loads_family_and_exact_weights(kind, loaded):
    pipe, family = loaded[kind]
    name, inpainting, prediction_type, pipeline_class = EXPECTED[kind]
    assert type(pipe) is pipeline_class
    assert (family.name, family.inpainting, family.prediction_type) == (name, inpainting, prediction_type)
    assert family.config_dir == tiny.CONFIGS_DIR / tiny.FAMILY_DIRS[name]
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.unet.config.in_channels == (9 if inpainting else 4)
    assert getattr(pipe, "safety_checker", None) is None and getattr(pipe, "feature_extractor", None) is None
    reference = tiny.tiny_components(name, inpainting=inpainting)
    for component, model in reference.items():
        assert_same_weights(getattr(pipe, component), model)


def test_loaded_pipelines_have_real_tokenizers(loaded):
    pads = {"sd15": "<|endoftext|>", "sd21-v": "!", "sdxl": "<|endoftext|>"}
    for kind, pad in pads.items():
        tokenizer = loaded[kind][0].tokenizer
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert tokenizer.pad_token == pad and tokenizer.model_max_length == 77
    tokenizer_2 = loaded["sdxl"][0].tokenizer_2
    assert tokenizer_2("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0


def test_shipped_tokenizer_files_encode_reference_prompt():
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_FILES_DIR, model_max_length=77, local_files_only=True)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_loaded_model_runs(loaded):
    pipe, _ = loaded["sd15"]
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and 0.0 <= image.min() <= image.max() <= 1.0
    assert image.std() > 0.01  # random weights still give a varied image, not a constant fill


def test_diffusers_folder(tree, cache_dir):
    folder = tree["sd15-diffusers"]
    pipe, family = load_checkpoint(folder, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert type(pipe) is StableDiffusionPipeline
    assert family == ModelFamily("sd1", False, "epsilon", folder)
    for component, model in tiny.tiny_components("sd1").items():
        assert_same_weights(getattr(pipe, component), model)
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_offline_with_empty_hf_cache(tree, tmp_path):
    script = """
import json, socket, sys, torch
from pathlib import Path
def refuse(self, address):
    raise SystemExit(f"network access attempted: {address}")
socket.socket.connect = refuse
from pipelines.models.checkpoints import load_checkpoint, load_vae
out = {}
for arg in sys.argv[2:]:
    pipe, family = load_checkpoint(Path(arg), torch_dtype=torch.float32, cache_dir=Path(sys.argv[1]))
    out[Path(arg).name] = [type(pipe).__name__, family.name, family.inpainting, family.prediction_type]
vae = load_vae(Path(arg).parent.parent / "VAE" / "tiny-vae.safetensors", family, torch_dtype=torch.float32,
               cache_dir=Path(sys.argv[1]))
out["vae"] = type(vae).__name__
print(json.dumps(out))
"""
    hf_home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    paths = [str(tree[kind]) for kind in ("sd15", "sd21-v", "sdxl", "sd15-inpainting", "sd15-diffusers")]
    command = [sys.executable, "-c", script, str(tmp_path / "cache"), *paths]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {
        "tiny-sd15.safetensors": ["StableDiffusionPipeline", "sd1", False, "epsilon"],
        "tiny-sd21-v.safetensors": ["StableDiffusionPipeline", "sd2", False, "v_prediction"],
        "tiny-sdxl.safetensors": ["StableDiffusionXLPipeline", "sdxl", False, "epsilon"],
        "tiny-sd15-inpainting.safetensors": ["StableDiffusionPipeline", "sd1", True, "epsilon"],
        "tiny-sd15-diffusers": ["StableDiffusionPipeline", "sd1", False, "epsilon"],
        "vae": "AutoencoderKL",
    }
    downloaded = [path for path in hf_home.rglob("*") if path.is_file()] if hf_home.exists() else []
    assert downloaded == []


def test_config_cache_is_reused(tree, tmp_path):
    load_checkpoint(tree["sd15"], torch_dtype=torch.float32, cache_dir=tmp_path)
    first = sorted((tmp_path / "diffusers-configs").iterdir())
    load_checkpoint(tree["sd15"], torch_dtype=torch.float32, cache_dir=tmp_path)
    assert sorted((tmp_path / "diffusers-configs").iterdir()) == first and len(first) == 1
    folder = first[0]
    assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64]
    assert (folder / "tokenizer" / "vocab.json").read_bytes() == (TOKENIZER_FILES_DIR / "vocab.json").read_bytes()


@pytest.mark.parametrize(("bias", "expected"), [(-2.0, "v_prediction"), (0.0, "epsilon")])
def test_sd2_prediction_type_detected_from_unet_without_ldm_sidecar(tmp_path, cache_dir, bias, expected):
    # The sidecar holds only the tiny sizes, so the UNet itself must tell eps from v: with its last
    # convolution zeroed, it answers `bias` everywhere and mean(output - 0.5) is bias - 0.5.
    path = tiny.write_tiny_checkpoint(tmp_path / "tiny-sd2.safetensors", "sd21-v", ldm_sidecar=False,
                                             unet_output_bias=bias)
    assert detect_family(read_state_dict(path), path).prediction_type == expected
    pipe, family = load_checkpoint(path, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert family.prediction_type == pipe.scheduler.config.prediction_type == expected


def test_ldm_sidecar_overrides_detection(tmp_path, cache_dir):
    # A v-like UNet, but the sidecar says eps (LDM configs without "parameterization" are eps).
    path = tiny.write_tiny_checkpoint(tmp_path / "tiny-sd2.safetensors", "sd21-v", unet_output_bias=-2.0)
    sidecar = yaml.safe_load(path.with_suffix(".yaml").read_text())
    del sidecar["model"]["params"]["parameterization"]
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sidecar))
    assert detect_family(read_state_dict(path), path).prediction_type == "epsilon"
    sidecar["diffusers"]["scheduler"] = {"prediction_type": "v_prediction"}
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sidecar))
    pipe, family = load_checkpoint(path, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert family.prediction_type == pipe.scheduler.config.prediction_type == "v_prediction"


def test_sidecar_contradicting_weights_is_an_error(tree, tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(tree["sd15"].read_bytes())
    sidecar = yaml.safe_load(tree["sd15"].with_suffix(".yaml").read_text())
    sidecar["model"] = tiny.LDM_SIDECARS["sd21-v"]
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sidecar))
    with pytest.raises(ValueError, match=r"describes a sd2 model.*holds sd1 weights"):
        detect_family(read_state_dict(path), path)


def test_safe_ckpt_loads(tree, tmp_path, cache_dir):
    path = tiny.write_tiny_ckpt(tmp_path / "tiny-sd15.ckpt")
    state = read_state_dict(path)
    expected = read_state_dict(tree["sd15"])
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    pipe, family = load_checkpoint(path, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert family.name == "sd1"
    assert_same_weights(pipe.unet, tiny.tiny_components("sd1")["unet"])


def test_malicious_pickle_is_refused_without_running(tmp_path, cache_dir):
    marker = tmp_path / "pwned"
    path = tiny.write_malicious_ckpt(tmp_path / "evil.ckpt", marker)
    # The file really carries the payload: a reference to os.system (posix/nt) and a call of it.
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    globals_ = [arg for opcode, arg, _ in pickletools.genops(pickled) if opcode.name == "GLOBAL"]
    assert {"posix system", "nt system"} & set(globals_)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*import (posix|nt)\.system.*safetensors") as error:
        read_state_dict(path)
    assert isinstance(error.value, ValueError)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert not marker.exists()


def test_unknown_and_missing_files(tmp_path, cache_dir):
    other = tmp_path / "not-a-model.safetensors"
    safetensors.torch.save_file({"backbone.layer1.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"not-a-model\.safetensors.*no UNet weights.*backbone\.layer1"):
        load_checkpoint(other, torch_dtype=torch.float32, cache_dir=cache_dir)
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_checkpoint(missing, torch_dtype=torch.float32, cache_dir=cache_dir)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="garbage.ckpt") as error:
        read_state_dict(garbage)
    assert not isinstance(error.value, UnsafeCheckpointError)
    text = tmp_path / "model.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match=r"model\.txt: unsupported checkpoint type"):
        read_state_dict(text)


def test_load_vae_layouts(tree, tmp_path, cache_dir, loaded):
    family = loaded["sd15"][1]
    reference = tiny.tiny_standalone_vae()
    vae = load_vae(tree["vae"], family, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert_same_weights(vae, reference)
    # The same VAE with the checkpoint prefix, and in diffusers layout, each with the same sidecar.
    layouts = {
        "prefixed": tiny.vae_to_original(reference, prefix="first_stage_model."),
        "diffusers": reference.state_dict(),
    }
    for name, state in layouts.items():
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({key: value.contiguous() for key, value in state.items()}, str(path))
        path.with_suffix(".yaml").write_text(tree["vae"].with_suffix(".yaml").read_text())
        assert_same_weights(load_vae(path, family, torch_dtype=torch.float32, cache_dir=cache_dir), reference)
    bogus = tmp_path / "bogus.safetensors"
    safetensors.torch.save_file({"unet.weight": torch.zeros(1)}, str(bogus))
    with pytest.raises(ValueError, match=r"bogus\.safetensors is not a VAE"):
        load_vae(bogus, family, torch_dtype=torch.float32, cache_dir=cache_dir)


def test_shipped_configs_describe_the_real_models():
    """Real-size models built (without memory) from the shipped configs have the published sizes."""

    def count(model: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in model.parameters())

    def config(family: str, relative: str) -> dict:
        return json.loads((CONFIGS_DIR / family / relative).read_text())

    with init_empty_weights():
        unets = {
            family: count(UNet2DConditionModel.from_config(config(family, "unet/config.json")))
            for family in ("sd15", "sd2", "sdxl")
        }
        vae = count(AutoencoderKL.from_config(config("sd15", "vae/config.json")))
        clip_l = count(CLIPTextModel(CLIPTextConfig(**config("sd15", "text_encoder/config.json"))))
        clip_h = count(CLIPTextModel(CLIPTextConfig(**config("sd2", "text_encoder/config.json"))))
        clip_g = count(CLIPTextModelWithProjection(CLIPTextConfig(**config("sdxl", "text_encoder_2/config.json"))))
    assert unets == {"sd15": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
    assert (vae, clip_l, clip_h, clip_g) == (83_653_863, 123_060_480, 340_387_840, 694_659_840)
    assert config("sd2", "scheduler/scheduler_config.json")["prediction_type"] == "v_prediction"
    assert config("sdxl", "vae/config.json")["scaling_factor"] == 0.13025
    for family, folder in (("sd15", "tokenizer"), ("sd2", "tokenizer"), ("sdxl", "tokenizer"), ("sdxl", "tokenizer_2")):
        pad = config(family, f"{folder}/tokenizer_config.json")["pad_token"]
        assert pad == ("!" if (family, folder) in {("sd2", "tokenizer"), ("sdxl", "tokenizer_2")} else "<|endoftext|>")


def test_v_pred_marker_key(tmp_path):
    path = tiny.write_tiny_checkpoint(tmp_path / "tiny-sd15.safetensors", "sd15", ldm_sidecar=False)
    state = read_state_dict(path)
    assert detect_family(state, path).prediction_type == "epsilon"
    safetensors.torch.save_file({**state, "v_pred": torch.tensor([])}, str(path))
    assert detect_family(read_state_dict(path), path).prediction_type == "v_prediction"


def test_sd1_text_encoder_without_text_model_level(tree, tmp_path, cache_dir):
    # Early SD 1.x files name CLIP weights "cond_stage_model.transformer.encoder..." (no "text_model.").
    prefix = "cond_stage_model.transformer."
    state = {key.replace(prefix + "text_model.", prefix): value for key, value in read_state_dict(tree["sd15"]).items()}
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(state, str(path))
    path.with_suffix(".yaml").write_text(tree["sd15"].with_suffix(".yaml").read_text())
    pipe, _ = load_checkpoint(path, torch_dtype=torch.float32, cache_dir=cache_dir)
    assert_same_weights(pipe.text_encoder, tiny.tiny_components("sd1")["text_encoder"])


def test_shipped_tokenizer_needs_no_model():
    from pipelines.models.checkpoints import shipped_tokenizer

    assert shipped_tokenizer("sd1")("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert shipped_tokenizer("sd2").pad_token == "!"
    assert shipped_tokenizer("sdxl", "tokenizer_2").pad_token == "!"
