""""Evaluate this run": POST /sdapi/v1/train/{id}/evaluate queues an evaluation of a finished training run's saves
(an intermediate and the final LoRA) against its base model on its sample prompts, with the training images as
the FID / KID reference; a run that saved nothing is 409, an unknown run 404."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from pipelines.images.saving import read_infotext
from tests.engine.test_training import make_engine, write_dataset
from tests.fixtures.tiny_evaluation import write_random_inception, write_tiny_clip
from tests.helpers import SD15
from webui.app import create_api_app
from webui.context import AppContext
from webui.flags import Flags


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eval_models")
    for folder in tiny_models.iterdir():
        if folder.name not in ("Lora", "CLIP", "evaluation"):
            (root / folder.name).symlink_to(folder, target_is_directory=folder.is_dir())
    (root / "Lora").mkdir()
    write_tiny_clip(root / "CLIP" / "tiny-clip")
    write_random_inception(root / "evaluation")
    data = tmp_path_factory.mktemp("train_eval_data")
    engine = make_engine(root, data)
    write_dataset(data / "pictures")
    (data / "empty").mkdir()
    ctx = AppContext(Flags(nowebui=True, data_dir=str(data)), engine, data / "config.json")
    with TestClient(create_api_app(ctx)) as test_client:
        yield test_client


def finished(client: TestClient, run_id: str) -> dict:
    deadline = time.monotonic() + 300
    while True:
        state = client.get(f"/sdapi/v1/train/{run_id}", params={"images": False}).json()
        if state["status"] in ("done", "failed", "stopped"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.3)


def test_evaluate_this_run_compares_the_saves_with_the_base_model(client):
    body = {"name": "eval-me", "dataset": "pictures", "checkpoint": SD15, "resolution": 64, "steps": 2,
            "save_every": 1, "learning_rate": 0.01, "rank": 4, "alpha": 4, "sample_prompts": ["sks, red circle"],
            "sample_steps": 2}
    run_id = client.post("/sdapi/v1/train", json=body).json()["id"]
    assert finished(client, run_id)["status"] == "done"
    answer = client.post(f"/sdapi/v1/train/{run_id}/evaluate")
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 600
    while (status := client.get(f"/sdapi/v1/evaluate/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert status["state"] == "done", status
    results = status["results"]
    report = results["report"]
    assert report["candidates"] == ["base", "eval-me-step00000001", "eval-me"]
    assert report["prompts"] == ["sks, red circle"]
    assert report["metrics"] == ["clip_score", "fid", "kid", "inception_score"] and results["messages"] == []
    for candidate in report["candidates"]:
        assert report["results"][candidate]["clip_score"]["n"] == 2  # one prompt x seeds 1 and 2
    folder = status["folder"]
    for entry in report["images"]:
        infotext = read_infotext(f"{folder}/{entry['path']}")
        lora = {"base": None, "eval-me-step00000001": "<lora:eval-me-step00000001:1>",
                "eval-me": "<lora:eval-me:1>"}[entry["candidate"]]
        assert (lora in infotext) if lora else ("<lora:" not in infotext)
        assert "Size: 64x64" in infotext and "Steps: 2" in infotext


def test_a_run_without_saves_is_409_and_an_unknown_run_404(client):
    body = {"name": "nothing", "dataset": "empty", "checkpoint": SD15, "resolution": 64, "steps": 1}
    answer = client.post("/sdapi/v1/train", json=body)  # the empty folder fails when the run starts training
    assert answer.status_code == 200, answer.text
    run_id = answer.json()["id"]
    assert finished(client, run_id)["status"] == "failed"
    refused = client.post(f"/sdapi/v1/train/{run_id}/evaluate")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "RunNotFinished"
    assert "is failed and has saved nothing" in refused.json()["detail"]
    assert client.post("/sdapi/v1/train/train-999/evaluate").status_code == 404
