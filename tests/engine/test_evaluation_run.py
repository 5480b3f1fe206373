"""An evaluation run through the engine: two tiny checkpoints x 3 prompts x 2 seeds, then the report on disk;
re-scoring the folder gives the same numbers; missing weights give the message and the other metrics run."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from pipelines.engine import Engine
from pipelines.evaluation.metrics import INCEPTION_WEIGHTS
from pipelines.evaluation.report import CHART, CONTACT_DIR, PER_IMAGE_CSV, RESULTS_CSV, RESULTS_JSON
from pipelines.evaluation.runner import Candidate, EvaluationSpec, run_evaluation, score_run
from pipelines.images.saving import read_infotext
from pipelines.job_control import JobControl
from pipelines.settings import EngineSettings, Paths
from tests.engine.test_evaluation_metrics import shapes
from tests.fixtures.tiny_evaluation import write_random_inception, write_tiny_clip
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
