"""The training routes: start a LoRA or fine-tune run through the queue, watch its progress, losses and samples;
refusals."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from tests.engine.test_training import write_dataset
from tests.helpers import SD15
from webui.app import create_api_app
from webui.context import AppContext
from webui.flags import Flags


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    from tests.engine.test_finetune import own_models_dir
    from tests.engine.test_training import make_engine

    root = own_models_dir(tiny_models, tmp_path_factory.mktemp("train_api_models") / "models")
    data = tmp_path_factory.mktemp("train_api_data")
    engine = make_engine(root, data)
    write_dataset(data / "pictures")
    ctx = AppContext(Flags(nowebui=True, data_dir=str(data)), engine, data / "config.json")
    with TestClient(create_api_app(ctx)) as test_client:
        yield test_client


def body(**overrides) -> dict:
    return {"name": "api-run", "dataset": "pictures", "checkpoint": SD15, "resolution": 64, "steps": 3,
            "learning_rate": 0.01, "rank": 4, "alpha": 4, "sample_every": 2, "sample_prompts": ["sks, red circle"],
            "sample_steps": 2, **overrides}


def finished(client, answer) -> dict:
    assert answer.status_code == 200, answer.text
    run_id = answer.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        state = client.get(f"/sdapi/v1/train/{run_id}").json()
        if state["status"] in ("done", "failed", "stopped") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def test_a_run_reports_progress_losses_and_samples(client):
    state = finished(client, client.post("/sdapi/v1/train", json=body()))
    assert state["status"] == "done", state["error"]
    assert state["step"] == 3 == state["total_steps"] and state["losses"]["step"] == [1, 2, 3]
    assert {s["step"] for s in state["samples"]} == {2, 3} and state["samples"][0]["image"]
    assert "LoRA training: api-run step 2" in state["samples"][0]["infotext"]
    assert state["output"].endswith("api-run.safetensors")
    assert client.get("/sdapi/v1/loras").status_code in (200, 404)


def test_a_fine_tune_run_writes_a_checkpoint_the_model_list_shows(client):
    state = finished(client, client.post("/sdapi/v1/train", json=body(
        name="api-ft", method="fine-tune", steps=2, sample_every=0, learning_rate=0.001)))
    assert state["status"] == "done", state["error"]
    assert state["settings"]["method"] == "fine-tune" and state["losses"]["step"] == [1, 2]
    assert state["output"].endswith("Stable-diffusion/api-ft.safetensors")
    assert {"sks, red circle"} == {s["prompt"] for s in state["samples"]}  # the end-of-run sample
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert "api-ft" in models and models["api-ft"]["filename"] == state["output"]
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "sks", "steps": 2, "width": 64, "height": 64,
                                                    "override_settings": {"sd_model_checkpoint": "api-ft"}})
    assert answer.status_code == 200, answer.text
    assert "Model: api-ft" in answer.json()["info"]


def test_refusals_name_the_field(client):
    for overrides, field in [({"dataset": "../.."}, "dataset"), ({"dataset": "nope"}, "dataset"),
                             ({"checkpoint": "missing.safetensors"}, "checkpoint"), ({"rank": 0}, "rank"),
                             ({"name": "a/b"}, "name"), ({"lr_scheduler": "bogus"}, "lr_scheduler"),
                             ({"method": "dreambooth"}, "method"),
                             ({"method": "fine-tune", "name": "tiny-sd15"}, "name")]:
        answer = client.post("/sdapi/v1/train", json=body(**overrides))
        assert answer.status_code == 422, (overrides, answer.text)
        assert answer.json()["detail"][0]["loc"][-1] == field, answer.text
    answer = client.post("/sdapi/v1/train/embedding", json={})
    assert answer.status_code == 422 and "textual inversion" in answer.text
    assert client.get("/sdapi/v1/train/train-999").status_code == 404
