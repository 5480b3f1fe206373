"""The diffusers -> original single-file writer (pipelines/models/checkpoint_writer.py): a tiny SD 1.x, SD 2.x
(v-prediction) and SDXL model written in the original layout loads back with the same weights and pixels
through our loader AND through diffusers' own ``from_single_file`` (offline, on the shipped configs)."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
import torch
import yaml
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines.models import checkpoints
from pipelines.models.checkpoint_writer import original_entries, unet_to_original, write_checkpoint
from tests.fixtures.tiny_models import TINY_OVERRIDES, tiny_components

ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _same_weights(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b), (what, set(a) ^ set(b))
    different = [key for key in a if not torch.equal(a[key].float(), b[key].float())]
    assert not different, (what, different[:5])


def _image(pipe, family: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = dict(prompt="a red circle", num_inference_steps=2, width=64, height=64, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="np")
    return pipe(**kwargs).images[0]


@pytest.mark.parametrize("family, prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_written_checkpoint_loads_back_in_our_loader_and_in_diffusers(tmp_path, family, prediction):
    components = tiny_components(family)
    path = tmp_path / f"written-{family}.safetensors"
    write_checkpoint(path, original_entries(family, components, prediction_type=prediction),
                     metadata={"note": "test"})
    # Only the tiny sizes go into the sidecar: family and prediction type must come from the file itself.
    path.with_suffix(".yaml").write_text(yaml.safe_dump({"diffusers": TINY_OVERRIDES[family]}))
    assert not list(tmp_path.glob(".checkpoint-*"))
    with safetensors.safe_open(path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata == {"note": "test"}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                             "conditioner.embedders.", "v_pred")) for k in keys)
    assert ("v_pred" in keys) == (prediction == "v_prediction")

    pipe, detected = checkpoints.load_checkpoint(path, torch_dtype=torch.float32, cache_dir=tmp_path / "cache")
    assert (detected.name, detected.prediction_type) == (family, prediction)
    for name in ("unet", "vae", *ENCODERS[family]):
        _same_weights(getattr(pipe, name), components[name], f"our loader: {name}")

    sidecar = checkpoints._read_sidecar(path)
    config = checkpoints._materialize(checkpoints._merged_configs(detected, sidecar), tmp_path / "cfg", family)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    theirs = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32,
                                  **extra)
    for name in ("unet", "vae", *ENCODERS[family]):
        _same_weights(getattr(theirs, name), components[name], f"from_single_file: {name}")
    assert np.array_equal(_image(theirs, family), _image(pipe, family))


def test_block_numbering_follows_the_original_layout():
    """Real SD 1.5 numbering on a 4-level, 2-layer UNet (names only, no model)."""
    names = ["down_blocks.1.resnets.0.conv1.weight", "down_blocks.0.attentions.1.proj_in.weight",
             "down_blocks.2.downsamplers.0.conv.weight", "up_blocks.0.upsamplers.0.conv.bias",
             "up_blocks.1.upsamplers.0.conv.bias", "up_blocks.1.attentions.0.norm.weight",
             "up_blocks.3.attentions.2.proj_out.weight",
             "mid_block.resnets.1.time_emb_proj.weight", "mid_block.attentions.0.norm.weight",
             "down_blocks.1.resnets.0.conv_shortcut.weight", "time_embedding.linear_2.bias"]
    state = {name: torch.zeros(1) for name in names}
    original = [key.removeprefix("model.diffusion_model.") for key in unet_to_original(state, 2)]
    assert original == ["input_blocks.4.0.in_layers.2.weight", "input_blocks.2.1.proj_in.weight",
                        "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.bias",
                        "output_blocks.5.2.conv.bias", "output_blocks.3.1.norm.weight",
                        "output_blocks.11.1.proj_out.weight",
                        "middle_block.2.emb_layers.1.weight", "middle_block.1.norm.weight",
                        "input_blocks.4.0.skip_connection.weight", "time_embed.2.bias"]
