"""An evaluation run through the engine: two tiny checkpoints x 3 prompts x 2 seeds, then the report on disk;
re-scoring the folder gives the same numbers; missing weights give the message and the other metrics run."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from pipelines.engine import Engine
from pipelines.evaluation import metrics as m
from pipelines.evaluation.metrics import INCEPTION_WEIGHTS
from pipelines.evaluation.report import CHART, CONTACT_DIR, PER_IMAGE_CSV, RESULTS_CSV, RESULTS_JSON
from pipelines.evaluation.runner import Candidate, EvaluationSpec, run_evaluation, score_run
from pipelines.images.saving import read_infotext
from pipelines.job_control import JobControl
from pipelines.settings import EngineSettings, Paths
from tests.engine.test_evaluation_metrics import shapes
from tests.fixtures.tiny_evaluation import write_random_inception, write_random_lpips, write_tiny_clip
from tests.helpers import SD15, SD21

PROMPTS = ["a red apple", "three cats", "a sign that says OPEN"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    write_random_inception(root / "evaluation")
    write_tiny_clip(root / "CLIP" / "tiny-clip")
    reference = root / "reference"
    reference.mkdir()
    for k, image in enumerate(shapes(7, 3)):
        image.save(reference / f"{k}.png")
    data = root / "data"
    paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs",
                  extra_dirs={"clip": (root / "CLIP",), "evaluation": (root / "evaluation",)})
    engine = Engine(EngineSettings(paths=paths, device="cpu"))
    spec = EvaluationSpec(name="two-checkpoints", candidates=[Candidate(name="sd15", checkpoint=SD15),
                                                              Candidate(name="sd21", checkpoint=SD21)],
                          prompts=PROMPTS, seeds=[1, 2], steps=2, width=64, height=64, sampler_name="Euler",
                          reference_dir=str(reference), metrics=["clip_score", "fid", "kid", "inception_score"])
    control = JobControl()
    seen = []
    control.on_progress = lambda progress: seen.append(progress.textinfo)
    result = run_evaluation(engine, spec, control)
    return engine, spec, result, seen


def test_a_run_writes_images_with_infotext_table_chart_sheets_csv_and_json(setup):
    engine, spec, result, seen = setup
    folder = result.folder
    assert folder == engine.paths.outputs_dir / "evaluations" / "two-checkpoints"
    run = json.loads((folder / "run.json").read_text())
    assert len(run["images"]) == 2 * 3 * 2 and run["complete"]
    for entry in run["images"]:
        infotext = read_infotext(folder / entry["path"])
        assert f"Seed: {entry['seed']}" in infotext and entry["prompt"] in infotext
    # the same seeds for every candidate
    assert {(e["prompt_index"], e["seed"]) for e in run["images"] if e["candidate"] == "sd15"} == \
        {(e["prompt_index"], e["seed"]) for e in run["images"] if e["candidate"] == "sd21"}
    report = result.report
    assert report is not None and report.messages == []
    assert report.metrics == ["clip_score", "fid", "kid", "inception_score"]
    headers, rows = report.table()
    assert headers[0] == "candidate" and [row[0] for row in rows] == ["sd15", "sd21"]
    for name in report.metrics:  # one best per column
        assert sum(report.cells[c][name].best for c in report.candidates) == 1
    clip = report.cells["sd15"]["clip_score"]
    assert clip.n == 6 and clip.low is not None and clip.low <= clip.mean <= clip.high
    assert "[" in rows[0][1]
    saved = json.loads((folder / RESULTS_JSON).read_text())
    assert saved["results"]["sd21"]["fid"]["mean"] == pytest.approx(report.value("sd21", "fid"))
    with (folder / RESULTS_CSV).open() as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 4
    with (folder / PER_IMAGE_CSV).open() as handle:
        assert len(list(csv.DictReader(handle))) == 12
    assert Image.open(folder / CHART).size[0] > 200
    sheets = sorted((folder / CONTACT_DIR).glob("*.png"))
    assert len(sheets) == 3 and Image.open(sheets[0]).width > 2 * 64
    assert any("generating" in text for text in seen) and any("Inception" in text for text in seen)


def test_rescoring_the_folder_gives_the_same_numbers_without_generating(setup, monkeypatch):
    engine, _, result, _ = setup
    monkeypatch.setattr(Engine, "generate", lambda *a, **k: pytest.fail("re-scoring must not generate"))
    again = score_run(result.folder, engine.paths)
    for c in result.report.candidates:
        for name in result.report.metrics:
            assert again.report.value(c, name) == pytest.approx(result.report.value(c, name), rel=1e-9)


def test_missing_weights_give_the_message_and_the_other_metrics_run(setup):
    engine, _, result, _ = setup
    paths = Paths(data_dir=engine.paths.data_dir, models_dir=engine.paths.models_dir,
                  outputs_dir=engine.paths.outputs_dir, extra_dirs={"clip": engine.paths.extra_dirs["clip"]})
    rescored = score_run(result.folder, paths)
    assert any(INCEPTION_WEIGHTS in message and str(paths.model_dirs("evaluation")[0]) in message
               for message in rescored.messages)
    assert rescored.report.metrics == ["clip_score"]
    assert rescored.report.value("sd15", "clip_score") == pytest.approx(result.report.value("sd15", "clip_score"))


def test_a_bad_candidate_setting_names_the_field():
    with pytest.raises(ValueError, match="unknown setting.*sampler.*allowed"):
        Candidate(name="x", settings={"sampler": "Euler"})
    with pytest.raises(ValueError, match="names must differ"):
        EvaluationSpec(candidates=[Candidate(name="a"), Candidate(name="a")])


@pytest.fixture(scope="module")
def fidelity_setup(tiny_models, tmp_path_factory):
    """An engine with LPIPS weights (random) in models/evaluation, and a folder of 2 source images (one with a
    caption)."""
    root = tmp_path_factory.mktemp("fidelity")
    write_random_lpips(root / "evaluation")
    sources = root / "sources"
    sources.mkdir()
    for k, image in enumerate(shapes(11, 2, size=64)):
        image.save(sources / f"source{k}.png")
    (sources / "source0.txt").write_text("a red ball on a green field")
    paths = Paths(data_dir=root / "data", models_dir=tiny_models, outputs_dir=root / "data" / "outputs",
                  extra_dirs={"evaluation": (root / "evaluation",)})
    return Engine(EngineSettings(paths=paths, device="cpu")), sources


def _check_fidelity_figures(engine, result, sources):
    """Each figure of the report is SSIM / PSNR / LPIPS of the saved image against its source."""
    scorer = m.LpipsScorer(*m.find_lpips_weights(engine.paths.model_dirs("evaluation")))
    report = result.report
    for candidate in report.candidates:
        entries = [e for e in report.images if e["candidate"] == candidate]
        expected = {"ssim": [], "psnr": [], "lpips": []}
        for entry in entries:
            image = Image.open(result.folder / entry["path"]).convert("RGB")
            source = Image.open(sources / f"source{entry['prompt_index']}.png").convert("RGB")
            expected["ssim"].append(m.ssim(image, source))
            expected["psnr"].append(m.psnr(image, source))
            expected["lpips"].append(scorer.score(image, source))
        for name, values in expected.items():
            assert report.per_image[candidate][name] == pytest.approx(values, rel=1e-6)


def test_an_img2img_run_scores_each_candidates_settings_against_the_sources(fidelity_setup):
    engine, sources = fidelity_setup
    spec = EvaluationSpec(name="img2img-strength", mode="img2img", source_dir=str(sources), seeds=[3],
                          candidates=[Candidate(name="light", checkpoint=SD15, settings={"denoising_strength": 0.2}),
                                      Candidate(name="strong", checkpoint=SD15,
                                                settings={"denoising_strength": 0.8})],
                          steps=2, sampler_name="Euler")
    assert spec.metrics == ["ssim", "psnr", "lpips"]  # a fidelity run's default metrics
    result = run_evaluation(engine, spec)
    report = result.report
    assert report is not None and report.messages == [] and report.metrics == ["ssim", "psnr", "lpips"]
    run = json.loads((result.folder / "run.json").read_text())
    assert [p["text"] for p in run["prompts"]] == ["a red ball on a green field", ""]
    assert len(run["images"]) == 2 * 2
    first = next(e for e in run["images"] if e["candidate"] == "light" and e["prompt_index"] == 0)
    infotext = read_infotext(result.folder / first["path"])
    assert "Denoising strength: 0.2" in infotext and "a red ball" in infotext
    assert Image.open(result.folder / first["path"]).size == (64, 64)
    _check_fidelity_figures(engine, result, sources)
    assert score_run(result.folder, engine.paths).report.value("strong", "lpips") == \
        pytest.approx(report.value("strong", "lpips"), rel=1e-9)


def test_an_upscale_run_brings_shrunk_sources_back_with_each_upscaler(fidelity_setup):
    engine, sources = fidelity_setup
    spec = EvaluationSpec(name="upscalers", mode="upscale", source_dir=str(sources), upscale_by=2, seeds=[1, 2],
                          candidates=[Candidate(name="lanczos", upscaler="Lanczos"),
                                      Candidate(name="nearest", upscaler="Nearest"),
                                      Candidate(name="esrgan", upscaler="tiny-esrgan-4x")])
    result = run_evaluation(engine, spec)
    report = result.report
    assert report is not None and report.messages == []
    assert len(report.images) == 3 * 2  # an upscaler has no seed: each image once
    entry = next(e for e in report.images if e["candidate"] == "lanczos" and e["prompt_index"] == 1)
    source = Image.open(sources / "source1.png").convert("RGB")
    made = Image.open(result.folder / entry["path"]).convert("RGB")
    expected = source.resize((32, 32), Image.Resampling.BICUBIC).resize((64, 64), Image.Resampling.LANCZOS)
    assert list(made.getdata()) == list(expected.getdata())
    assert "Postprocess upscaler: Lanczos" in read_infotext(result.folder / entry["path"])
    _check_fidelity_figures(engine, result, sources)
    for name in report.metrics:
        assert sum(report.cells[c][name].best for c in report.candidates) == 1


def test_fidelity_runs_name_what_they_lack(fidelity_setup, tmp_path):
    with pytest.raises(ValueError, match=r"candidates\[1\]\.upscaler"):
        EvaluationSpec(mode="upscale", candidates=[Candidate(name="a", upscaler="Lanczos"), Candidate(name="b")])
    spec = EvaluationSpec(mode="img2img", candidates=[Candidate(name="a")], prompts=["a cat"])
    with pytest.raises(ValueError, match="source_dir: mode 'img2img' needs source images"):
        spec.prompt_list()
    source = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(source)
    (tmp_path / "set.csv").write_text("prompt,reference\na red square,a.png\na cat,\n")
    spec = EvaluationSpec(mode="img2img", candidates=[Candidate(name="a")], prompt_set=str(tmp_path / "set.csv"))
    assert [(p.text, p.reference) for p in spec.prompt_list()] == [("a red square", source.resolve())]
    engine, _ = fidelity_setup
    with pytest.raises(ValueError, match=r"candidates\[0\]\.upscaler: no upscaler named 'nope'.*Lanczos"):
        run_evaluation(engine, EvaluationSpec(mode="upscale", source_dir=str(tmp_path),
                                              candidates=[Candidate(name="x", upscaler="nope")]))


def test_a_training_runs_saves_become_candidates_beside_the_base_model(tmp_path):
    from pipelines.evaluation.training import training_evaluation
    from pipelines.training.settings import TrainingSettings

    lora_dir = tmp_path / "Lora"
    saves = [lora_dir / "mine-step00000100.safetensors", lora_dir / "mine.safetensors",
             tmp_path / "Stable-diffusion" / "mine-full.safetensors"]
    settings = TrainingSettings(name="mine", dataset="pictures", checkpoint=SD15, resolution=256, sample_size=128,
                                sample_steps=7, clip_skip=2, sample_prompts=["sks, a dog", "sks, a cat"])
    spec = training_evaluation(settings, [*saves, saves[1]], [lora_dir], dataset=tmp_path / "pictures")
    assert [(c.name, c.checkpoint, c.prompt_suffix) for c in spec.candidates] == [
        ("base", SD15, ""), ("mine-step00000100", SD15, "<lora:mine-step00000100:1>"),
        ("mine", SD15, "<lora:mine:1>"), ("mine-full", "mine-full.safetensors", "")]
    assert all(c.settings == {"clip_skip": 2} for c in spec.candidates)
    assert [p.text for p in spec.prompt_list()] == ["sks, a dog", "sks, a cat"]
    assert (spec.width, spec.height, spec.steps, spec.seeds) == (128, 128, 7, [1, 2])
    assert spec.reference_dir == str(tmp_path / "pictures") and "fid" in spec.metrics
    assert spec.name.startswith("mine-eval-")
    no_reference = training_evaluation(settings.model_copy(update={"sample_prompts": []}), saves[:1], [lora_dir])
    assert no_reference.metrics == ["clip_score", "inception_score"] and no_reference.prompt_set == "built-in"
    with pytest.raises(ValueError, match="id: training run 'mine' has no saved model"):
        training_evaluation(settings, [], [lora_dir])


def test_a_broken_clip_model_is_a_message_and_the_other_metrics_run(fidelity_setup, tmp_path):
    engine, sources = fidelity_setup
    spec = EvaluationSpec(name="broken-clip", mode="upscale", source_dir=str(sources), upscale_by=2,
                          candidates=[Candidate(name="lanczos", upscaler="Lanczos")], metrics=["clip_score", "ssim"])
    result = run_evaluation(engine, spec)
    clip_dir = tmp_path / "CLIP"
    clip_dir.mkdir()
    (clip_dir / "ViT-B-32.safetensors").write_bytes(b"not a safetensors file")
    paths = Paths(data_dir=engine.paths.data_dir, models_dir=engine.paths.models_dir,
                  outputs_dir=engine.paths.outputs_dir, extra_dirs={"clip": (clip_dir,)})
    rescored = score_run(result.folder, paths)
    assert len(rescored.messages) == 1 and "ViT-B-32.safetensors cannot be loaded" in rescored.messages[0]
    assert rescored.report.metrics == ["ssim"]
    assert rescored.report.value("lanczos", "ssim") == pytest.approx(result.report.value("lanczos", "ssim"))
