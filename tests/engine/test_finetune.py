"""Full fine-tuning on the tiny models (CPU): the loss falls, the checkpoint is written in the original layout
into models/Stable-diffusion/, shows up in the checkpoint list at once, loads in our engine and generates
something else than the base, the base model is left as it was; SD 2.x v-prediction and SDXL; stop + resume
equals an uninterrupted run; refusals name the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import yaml

from pipelines.job_control import JobControl
from pipelines.training.settings import TrainingSettings
from pipelines.training.trainer import TRAINING_METADATA, checkpoint_path, run_folder, train
from tests.engine.test_training import make_engine, mean, write_dataset
from tests.helpers import SD15, SD15_DIFFUSERS, SD21, SDXL, pixels, txt2img


def own_models_dir(tiny_models: Path, root: Path) -> Path:
    """The tiny models under ``root`` with Stable-diffusion/ and Lora/ folders of their own (training writes
    there), the tiny checkpoints linked in, so trained files never show up in other tests."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in tiny_models.iterdir():
        if folder.name not in ("Lora", "Stable-diffusion"):
            (root / folder.name).symlink_to(folder, target_is_directory=folder.is_dir())
    (root / "Lora").mkdir()
    (root / "Stable-diffusion").mkdir()
    for entry in (tiny_models / "Stable-diffusion").iterdir():
        if entry.is_dir():  # a diffusers folder: a real folder (the catalog does not follow linked ones)
            (root / "Stable-diffusion" / entry.name).mkdir()
            for part in entry.iterdir():
                (root / "Stable-diffusion" / entry.name / part.name).symlink_to(part, part.is_dir())
        else:
            (root / "Stable-diffusion" / entry.name).symlink_to(entry)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ft_dataset"))


@pytest.fixture(scope="module")
def ft_engine(tiny_models, tmp_path_factory):
    models = own_models_dir(tiny_models, tmp_path_factory.mktemp("ft_models") / "models")
    return make_engine(models, tmp_path_factory.mktemp("ft_data"))


def settings(name: str, **kw) -> TrainingSettings:
    base = dict(name=name, dataset="unused", method="fine-tune", checkpoint=SD15, resolution=64, steps=20,
                learning_rate=1e-3, seed=7)
    return TrainingSettings(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def test_fine_tune_learns_and_writes_a_checkpoint_that_loads_and_generates(ft_engine, dataset):
    engine = ft_engine
    before = engine.generate(txt2img(seed=5, steps=3)).images[0]
    flags = [p.requires_grad for p in engine.models.get(SD15).unet.parameters()]
    state = train(engine, settings("ft", save_every=8, sample_every=10, sample_prompts=["sks, red circle"],
                                   sample_steps=2), dataset)
    losses = [loss for _, loss in state.losses]
    assert len(losses) == 20 and state.step == 20 and not state.interrupted
    assert mean(losses[-5:]) < mean(losses[:5]) * 0.8, losses

    target = checkpoint_path(engine, "ft")
    assert state.output == target and target.is_file()
    assert checkpoint_path(engine, "ft", 8) in state.saves and checkpoint_path(engine, "ft", 16).is_file()
    assert not list(target.parent.glob(".checkpoint-*"))
    # In the checkpoint list at once (no refresh by the caller), the intermediate saves too.
    names = {m.name for m in engine.registry.checkpoints}
    assert {"ft.safetensors", "ft-step00000008.safetensors"} <= names
    with safetensors.safe_open(target, "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_steps"] == "20" and metadata["ss_sd_model_name"] == SD15
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_training_method"] == "fine-tune"
    assert json.loads(metadata[TRAINING_METADATA])["learning_rate"] == 1e-3
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in keys)
    assert target.with_suffix(".yaml").read_text() == (engine.registry.find_checkpoint(SD15).path
                                                      .with_suffix(".yaml").read_text())
    assert json.loads(target.with_suffix(".train.json").read_text())["method"] == "fine-tune"
    assert [s.step for s in state.samples] == [10, 20]
    assert "Fine-tune: ft step 10" in state.samples[0].infotext

    # The base model is what it was; the new checkpoint generates something else.
    after = engine.generate(txt2img(seed=5, steps=3)).images[0]
    assert np.array_equal(pixels(before), pixels(after))
    tuned = engine.generate(txt2img(seed=5, steps=3, checkpoint="ft.safetensors")).images[0]
    assert np.abs(pixels(tuned) - pixels(before)).mean() > 1
    # Only the UNet trained: the VAE and text encoder in the file are the base file's, exactly.
    base, new = weights(engine.registry.find_checkpoint(SD15).path), weights(target)
    assert all(torch.equal(base[k], new[k]) for k in base if not k.startswith("model.diffusion_model."))
    assert any(not torch.equal(base[k], new[k]) for k in base if k.startswith("model.diffusion_model."))
    assert all(p.dtype == torch.float32 for p in engine.models.get(SD15).unet.parameters())
    assert [p.requires_grad for p in engine.models.get(SD15).unet.parameters()] == flags


@pytest.mark.parametrize("checkpoint, family, prediction", [(SD21, "sd2", "v_prediction"),
                                                             (SDXL, "sdxl", "epsilon")])
def test_sd2_v_prediction_and_sdxl_fine_tune_into_loadable_checkpoints(ft_engine, dataset, checkpoint, family,
                                                                       prediction):
    engine = ft_engine
    name = f"ft-{family}"
    state = train(engine, settings(name, checkpoint=checkpoint, steps=2, train_text_encoder=True), dataset)
    assert state.step == 2 and all(np.isfinite(loss) for _, loss in state.losses)
    loaded = engine.models.get(f"{name}.safetensors")
    assert (loaded.family.name, loaded.family.prediction_type) == (family, prediction)
    with safetensors.safe_open(state.output, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_v_parameterization"] == str(prediction == "v_prediction")
    image = engine.generate(txt2img(checkpoint=f"{name}.safetensors", steps=2)).images[0]
    assert pixels(image).std() > 0


def test_a_diffusers_folder_base_gets_a_sidecar_with_its_sizes(ft_engine, dataset):
    """A folder's configs are not the shipped ones (here: the tiny sizes): the single file needs a sidecar."""
    engine = ft_engine
    state = train(engine, settings("ft-folder", checkpoint=SD15_DIFFUSERS, steps=1), dataset)
    sidecar = yaml.safe_load(state.output.with_suffix(".yaml").read_text())
    assert sidecar["diffusers"]["unet"]["block_out_channels"] == [32, 64]
    assert sidecar["diffusers"]["text_encoder"]["hidden_size"] == 32
    loaded = engine.models.get("ft-folder.safetensors")
    assert loaded.family.name == "sd1" and list(loaded.unet.config.block_out_channels) == [32, 64]
    assert pixels(engine.generate(txt2img(checkpoint="ft-folder.safetensors", steps=2)).images[0]).std() > 0


def test_resume_after_a_stop_equals_an_uninterrupted_run(ft_engine, dataset):
    engine = ft_engine
    common = dict(steps=6, flip=True, shuffle_captions=True, train_text_encoder=True, ema_decay=0.9,
                  save_precision="fp32")
    whole = train(engine, settings("ft-whole", **common), dataset)
    control = JobControl()

    def stop_at_3(state):
        if state.step == 3:
            control.interrupt()

    first = train(engine, settings("ft-parts", **common), dataset, control=control, on_step=stop_at_3)
    assert first.interrupted and first.step == 3
    saved = torch.load(run_folder(engine, "ft-parts") / "train-state.pt", weights_only=True)
    assert saved["step"] == 3 and any(k.startswith("unet.") for k in saved["weights"]) and saved["ema"]["updates"] == 3
    rest = train(engine, settings("ft-parts", **common, resume=True), dataset)
    assert rest.step == 6 and [s for s, _ in rest.losses] == list(range(1, 7))
    a, b = weights(whole.output), weights(rest.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [round(x, 5) for _, x in whole.losses] == [round(x, 5) for _, x in rest.losses]
    # EMA on: the stopped run's file holds the average at step 3, not the last weights (kept for resume).
    file_at_3 = weights(first.output)
    raw = saved["weights"]["unet.conv_in.weight"]
    averaged = file_at_3["model.diffusion_model.input_blocks.0.0.weight"]
    base = weights(engine.registry.find_checkpoint(SD15).path)["model.diffusion_model.input_blocks.0.0.weight"]
    assert not torch.equal(averaged, raw) and not torch.equal(averaged, base.float())
    with pytest.raises(ValueError, match="resume: method"):
        train(engine, settings("ft-parts", steps=7, method="lora", resume=True), dataset)
    with pytest.raises(ValueError, match="resume: ema_decay"):
        train(engine, settings("ft-parts", **{**common, "ema_decay": 0.5}, resume=True), dataset)


def test_refusals_name_the_field(ft_engine, dataset):
    engine = ft_engine
    with pytest.raises(ValueError, match="name: 'tiny-sd15' would overwrite the base checkpoint"):
        train(engine, settings("tiny-sd15", steps=1), dataset)
    foreign = checkpoint_path(engine, "foreign")
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="name: .*foreign.safetensors exists and was not written by a training run"):
        train(engine, settings("foreign", steps=1), dataset)
    assert TrainingSettings(name="x", dataset="d", method="fine-tune").learning_rate == 1e-5
    assert TrainingSettings(name="x", dataset="d").learning_rate == 1e-4
    with pytest.raises(ValueError, match="method"):
        TrainingSettings(name="x", dataset="d", method="dreambooth")
