"""LoRA training on the tiny models (CPU): datasets and their report, the loss falls, the LoRA file loads in
our engine and in diffusers with equal pixels, resume equals an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from pipelines.job_control import JobControl
from pipelines.training.dataset import (
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
    plain_caption,
    process_caption,
    resolve_dataset_folder,
    scan_dataset,
)
from pipelines.training.settings import TrainingSettings
from pipelines.training.trainer import lora_path, run_folder, train
from tests.fixtures.pictures import picture
from tests.helpers import SD15, SD21, SDXL, pixels, txt2img


def shape(color, size=(64, 64), kind="circle") -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 230))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=color)
    return image


def write_dataset(folder: Path) -> Path:
    """Four captioned pictures (two in a kohya '2_things' folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape((200, 30, 30)).save(folder / "red_circle.png")
    (folder / "red_circle.txt").write_text("sks, red circle")
    picture().save(folder / "picture.png")
    (folder / "picture.txt").write_text("sks, (gradient:1.3), [bar] <lora:x:1>")
    sub = folder / "2_things"
    sub.mkdir(exist_ok=True)
    shape((30, 30, 200), kind="square").save(sub / "blue_square.jpg")
    (sub / "blue_square.txt").write_text("sks, blue square")
    shape((30, 160, 30)).save(sub / "green.png")
    (sub / "green.txt").write_text("sks, green circle")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset"))


# --- datasets -----------------------------------------------------------------------------------------


def test_buckets_are_kohya_style():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1200, 800), buckets) == (640, 384) or nearest_bucket((1200, 800), buckets)[0] > 512
    assert nearest_bucket((800, 800), buckets) == (512, 512)
    with pytest.raises(ValueError, match="resolution"):
        make_buckets(500)


def test_fit_to_bucket_scales_then_crops_only_the_excess():
    image = shape((255, 0, 0), size=(300, 200))
    fitted, (top, left) = fit_to_bucket(image, (192, 128))
    assert fitted.size == (192, 128) and (top, left) == (0, 0)  # same ratio: no crop at all
    fitted, (top, left) = fit_to_bucket(image, (128, 128))
    assert fitted.size == (128, 128) and top == 0 and left == (192 - 128) // 2


def test_captions_plain_text_shuffle_and_dropout():
    import random

    assert plain_caption("a (cat:1.3), [dog] BREAK <lora:x:1> house") == "a cat, dog, house"
    rng = random.Random(1)
    shuffled = {process_caption("sks, a, b, c, d", rng, shuffle=True, keep_tokens=1) for _ in range(20)}
    assert all(s.startswith("sks, ") for s in shuffled) and len(shuffled) > 1
    assert process_caption("x", random.Random(0), dropout=1.0) == ""
    assert process_caption("x, y", random.Random(0)) == "x, y"


def test_dataset_report_kohya_layout_and_bad_files(tmp_path):
    folder = write_dataset(tmp_path / "data")
    (folder / "broken.png").write_bytes(b"not a png")
    shape((1, 2, 3), size=(64, 128)).save(folder / "no_caption.png")
    (folder / "notes").mkdir()
    report = scan_dataset(folder, resolution=128)
    problems = {p.file: p.problem for p in report.problems}
    assert "cannot be read" in problems["broken.png"]
    assert "no caption" in problems["no_caption.png"]
    assert "N_name" in problems["notes/"]
    by_name = {item.path.name: item for item in report.items}
    assert set(by_name) == {"red_circle.png", "picture.png", "blue_square.jpg", "green.png"}
    assert by_name["green.png"].repeats == 2 and by_name["red_circle.png"].repeats == 1
    assert by_name["picture.png"].caption == "sks, gradient, bar"
    assert report.images_per_epoch == 6 and by_name["green.png"].bucket == (128, 128)
    assert "broken.png" in report.summary()
    # With captions from file names, the uncaptioned image is used, in a tall bucket.
    report = scan_dataset(folder, resolution=128, missing_captions="file name")
    item = next(i for i in report.items if i.path.name == "no_caption.png")
    assert item.caption == "no caption" and item.caption_from == "file name" and item.bucket[1] > item.bucket[0]
    assert json.dumps(report.as_dict())


def test_dataset_report_metadata_files(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    shape((200, 0, 0)).save(folder / "a.png")
    shape((0, 200, 0)).save(folder / "b.png")
    rows = [{"file_name": "a.png", "text": "a red (circle:1.2)"}, {"file_name": "b.png"},
            {"file_name": "missing.png", "text": "x"}, {"text": "no file"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    report = scan_dataset(folder, resolution=64)
    assert [i.caption for i in report.items] == ["a red circle"]
    problems = {p.file: p.problem for p in report.problems}
    assert "no caption" in problems["b.png"] and "not found" in problems["missing.png"]
    assert "file_name" in problems["metadata.jsonl:4"] and "JSON" in problems["metadata.jsonl:5"]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,caption\na.png,red\nb.png,green\n")
    report = scan_dataset(folder, resolution=64)
    assert [(i.path.name, i.caption) for i in report.items] == [("a.png", "red"), ("b.png", "green")]


def test_dataset_folder_must_be_inside_the_allowed_folders(tmp_path):
    (tmp_path / "data" / "set").mkdir(parents=True)
    assert resolve_dataset_folder("set", [tmp_path / "data"]) == (tmp_path / "data" / "set").resolve()
    for bad in ("../", str(tmp_path), "missing", ""):
        with pytest.raises(ValueError, match="dataset"):
            resolve_dataset_folder(bad, [tmp_path / "data"])


def test_settings_name_the_field():
    with pytest.raises(ValueError, match="name"):
        TrainingSettings(name="../evil", dataset="x")
    with pytest.raises(ValueError, match="resolution"):
        TrainingSettings(name="ok", dataset="x", resolution=100)


# --- training -----------------------------------------------------------------------------------------


def settings(name: str, **kw) -> TrainingSettings:
    base = dict(name=name, dataset="unused", checkpoint=SD15, resolution=64, steps=30, learning_rate=1e-2,
                rank=4, alpha=4, seed=7)
    return TrainingSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def models_dir(tiny_models, tmp_path_factory) -> Path:
    """The tiny models with an empty Lora/ of our own, so trained LoRAs never show up in other tests."""
    root = tmp_path_factory.mktemp("train_models")
    for folder in tiny_models.iterdir():
        if folder.name != "Lora":
            (root / folder.name).symlink_to(folder, target_is_directory=folder.is_dir())
    (root / "Lora").mkdir()
    return root


def make_engine(models_dir: Path, data: Path):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    return Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=models_dir, outputs_dir=data / "outputs"),
                                 device="cpu"))


@pytest.fixture(scope="module")
def trainer_engine(models_dir, tmp_path_factory):
    return make_engine(models_dir, tmp_path_factory.mktemp("train_data"))


def mean(values) -> float:
    return float(np.mean(values))


def test_the_loss_falls(trainer_engine, dataset):
    state = train(trainer_engine, settings("falls", steps=20, learning_rate=2e-2), dataset)
    losses = [loss for _, loss in state.losses]
    assert len(losses) == 20 and state.step == 20 and not state.interrupted
    assert mean(losses[-5:]) < mean(losses[:5]) * 0.8, losses


@pytest.mark.parametrize("checkpoint, version", [(SD21, "sd_v2"), (SDXL, "sdxl_base_v1-0")])
def test_sd2_v_prediction_and_sdxl_train_and_the_model_is_left_as_it_was(trainer_engine, dataset, checkpoint,
                                                                         version):
    before = trainer_engine.generate(txt2img(checkpoint=checkpoint, steps=2)).images[0]
    state = train(trainer_engine, settings(f"family-{version}", checkpoint=checkpoint, steps=2), dataset)
    assert state.step == 2 and all(np.isfinite(loss) for _, loss in state.losses)
    with safetensors.safe_open(state.output, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v_parameterization"] == str(checkpoint == SD21)
    after = trainer_engine.generate(txt2img(checkpoint=checkpoint, steps=2)).images[0]
    assert np.array_equal(pixels(before), pixels(after))  # the adapter is gone again
    unet = trainer_engine.models.get(checkpoint).unet
    assert all(type(m).__module__.startswith(("torch", "diffusers")) for m in unet.modules())


def test_lora_file_layout_and_metadata(trainer_engine, dataset):
    state = train(trainer_engine, settings("layout", steps=3, targets="attention+ff+conv",
                                           train_text_encoder=True, save_every=2), dataset)
    path = state.output
    with safetensors.safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") and k.endswith(".lora_up.weight") for k in keys)
    assert any("_resnets_" in k and "conv1.lora_down" in k for k in keys)  # LoCon
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_output_name"] == "layout" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"])["2_things"]["sks"] == 2
    assert len(meta["sshs_model_hash"]) == 64 and meta["ss_sd_model_hash"] and meta["ss_training_started_at"]
    assert lora_path(trainer_engine, "layout", 2) in state.saves and lora_path(trainer_engine, "layout", 2).is_file()
    assert json.loads(path.with_suffix(".train.json").read_text())["rank"] == 4
    log = (run_folder(trainer_engine, "layout") / "loss.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,time" and len(log) == 4
    assert not list(path.parent.glob(".tmp-*"))


def test_resume_after_a_stop_equals_an_uninterrupted_run(trainer_engine, dataset):
    whole = train(trainer_engine, settings("whole", steps=6, flip=True, shuffle_captions=True), dataset)
    control = JobControl()

    def stop_at_5(state):
        if state.step == 3:
            control.interrupt()

    first = train(trainer_engine, settings("parts", steps=6, flip=True, shuffle_captions=True), dataset,
                  control=control, on_step=stop_at_5)
    assert first.interrupted and first.step == 3
    state = torch.load(run_folder(trainer_engine, "parts") / "train-state.pt", weights_only=True)
    assert state["step"] == 3
    rest = train(trainer_engine, settings("parts", steps=6, flip=True, shuffle_captions=True, resume=True), dataset)
    assert rest.step == 6 and [s for s, _ in rest.losses] == list(range(1, 7))
    a = safetensors.torch.load_file(whole.output)
    b = safetensors.torch.load_file(rest.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [round(x, 5) for _, x in whole.losses] == [round(x, 5) for _, x in rest.losses]
    with pytest.raises(ValueError, match="resume: rank"):
        train(trainer_engine, settings("parts", steps=7, rank=8, resume=True), dataset)


def test_a_dataset_without_usable_images_fails_with_the_report(trainer_engine, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="dataset: no usable image(.|\n)*bad.png"):
        train(trainer_engine, settings("none"), tmp_path)


def test_trained_lora_works_through_the_tag_and_equals_diffusers(trainer_engine, models_dir, tmp_path, dataset):
    """The saved LoRA changes txt2img through <lora:name:1> (built-in LoRA extension), and a plain diffusers
    pipeline with diffusers' own load_lora_weights gives the same pixels."""
    from diffusers import StableDiffusionPipeline

    from pipelines.sampling.samplers import build_scheduler
    from webui.extensions import load_extensions

    state = train(trainer_engine, settings("tagged", steps=3, learning_rate=5e-2, train_text_encoder=True),
                  dataset)
    engine = make_engine(models_dir, tmp_path)
    load_extensions(engine, names=["lora"])
    plain = engine.generate(txt2img(seed=5, steps=3)).images[0]
    tagged = engine.generate(txt2img(prompt="a photo of a cat <lora:tagged:1>", seed=5, steps=3)).images[0]
    assert np.abs(pixels(tagged) - pixels(plain)).mean() > 1
    model = engine.models.get(SD15)
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "safety_checker": None})
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("Euler", "Automatic", model.scheduler_config)
    pipe.load_lora_weights(str(state.output.parent), weight_name=state.output.name, adapter_name="outside")
    try:
        theirs = pipe(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=3, width=64,
                      height=64, guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    finally:
        pipe.unload_lora_weights()
    assert int(np.abs(pixels(theirs) - pixels(tagged)).max()) <= 1
