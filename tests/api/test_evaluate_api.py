"""POST /sdapi/v1/evaluate on the real server with the tiny models: a small run (2 candidates x 2 prompts x 1 seed,
SSIM / PSNR against reference images and CLIP score with a tiny random CLIP) polled with GET until done; bad
fields and folders outside the allowed ones are 422 naming the field; interrupt stops a run."""

from __future__ import annotations

import csv
import threading
import time

import pytest
import requests

from pipelines.engine import Engine
from pipelines.settings import EngineSettings, Paths
from tests.engine.test_evaluation_metrics import shapes
from tests.fixtures.api_helpers import ApiServer, decode_png
from tests.fixtures.tiny_evaluation import write_tiny_clip
from tests.helpers import SD15, SD21

TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("evaluate-api")
    # the CLIP folder in an extra models/CLIP folder of this server only (the shared tiny models stay as they are)
    write_tiny_clip(data / "clip-models" / "tiny-clip-api")
    paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs",
                  extra_dirs={"clip": (data / "clip-models",)})
    engine = Engine(EngineSettings(paths=paths, device="cpu", checkpoint_cache=2))
    prompts = data / "prompts"
    prompts.mkdir()
    with (prompts / "set.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "reference"])
        for k, image in enumerate(shapes(11, 2)):
            image.save(prompts / f"ref{k}.png")
            writer.writerow([f"a picture number {k}", f"ref{k}.png"])
    server = ApiServer(engine, data).start()
    yield server
    server.stop()


def body(**changes) -> dict:
    return {"candidates": [{"name": "sd15", "checkpoint": SD15}, {"name": "sd21", "checkpoint": SD21}],
            "prompt_set": "prompts/set.csv", "seeds": [3], "metrics": ["clip_score", "ssim", "psnr"],
            "clip_model": "tiny-clip-api", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            **changes}


def wait(url: str, job_id: str, images: bool = False) -> dict:
    deadline = time.monotonic() + 300
    phases = set()
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/sdapi/v1/evaluate/{job_id}", params={"include_images": images},
                              timeout=TIMEOUT).json()
        phases.add(status["phase"])
        assert 0.0 <= status["fraction"] <= 1.0
        if status["state"] not in ("queued", "running"):
            status["phases_seen"] = phases
            return status
        time.sleep(0.2)
    raise AssertionError(f"evaluation {job_id} did not finish")


def test_a_small_run_is_queued_polled_and_gives_the_table_chart_and_sheets(server):
    started = time.monotonic()
    response = requests.post(f"{server.url}/sdapi/v1/evaluate", json=body(), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 10  # the id comes back at once, the run goes on in the queue
    job_id = response.json()["id"]
    status = wait(server.url, job_id, images=True)
    assert status["state"] == "done", status
    assert status["phases_seen"] & {"generating", "measuring"}
    results = status["results"]
    assert results["messages"] == []
    table = results["table"]
    assert table["headers"] == ["candidate", "CLIP score", "SSIM", "PSNR (dB)"]
    assert [row[0] for row in table["rows"]] == ["sd15", "sd21"]
    assert all(cell != "–" for row in table["rows"] for cell in row)
    report = results["report"]
    for candidate in ("sd15", "sd21"):
        for metric in ("clip_score", "ssim", "psnr"):
            assert report["results"][candidate][metric]["n"] == 2
        assert -1.0 <= report["results"][candidate]["ssim"]["mean"] <= 1.0
    assert sum(report["results"][c]["ssim"]["best"] for c in ("sd15", "sd21")) == 1
    assert decode_png(results["chart_image"]).width > 200
    assert len(results["contact_sheets"]) == 2 and len(results["contact_sheet_images"]) == 2
    assert decode_png(results["contact_sheet_images"][0]).width > 2 * 64
    assert results["chart"].startswith(str(server.ctx.engine.paths.outputs_dir / "evaluations"))
    # without include_images the answer carries paths only
    plain = requests.get(f"{server.url}/sdapi/v1/evaluate/{job_id}", timeout=TIMEOUT).json()
    assert plain["results"]["chart_image"] is None and plain["results"]["table"] == table


@pytest.mark.parametrize("changes, field", [
    ({"steps": 0}, "steps"),
    ({"metrics": ["clip_score", "sharpness"]}, "metrics"),
    ({"seeds": []}, "seeds"),
    ({"candidates": []}, "candidates"),
    ({"candidates": [{"name": "x", "checkpoint": "no-such-model"}]}, "candidates[0].checkpoint"),
    ({"candidates": [{"name": "x", "settings": {"denoise": 1}}]}, "settings"),
    ({"prompt_set": "prompts/missing.txt"}, "prompt_set"),
    ({"reference_dir": "prompts/set.csv"}, "reference_dir"),
    ({"name": ".."}, "name"),
])
def test_a_bad_field_is_422_naming_it(server, changes, field):
    response = requests.post(f"{server.url}/sdapi/v1/evaluate", json=body(**changes), timeout=TIMEOUT)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in "/".join(map(str, error["loc"])) or error["msg"].startswith(field) for error in detail), \
        detail


@pytest.mark.parametrize("changes, field", [
    ({"prompt_set": "/etc/passwd"}, "prompt_set"),
    ({"prompt_set": "../../outside.txt"}, "prompt_set"),
    ({"reference_dir": "/etc"}, "reference_dir"),
])
def test_a_path_outside_the_allowed_folders_is_422(server, changes, field):
    response = requests.post(f"{server.url}/sdapi/v1/evaluate", json=body(**changes), timeout=TIMEOUT)
    assert response.status_code == 422, response.text
    error, = response.json()["detail"]
    assert error["loc"] == ["body", field] and "outside the folders" in error["msg"]


def test_a_reference_image_outside_the_allowed_folders_is_422(server):
    csv_file = server.ctx.engine.paths.data_dir / "prompts" / "escape.csv"
    csv_file.write_text("prompt,reference\na cat,/etc/hostname\n")
    response = requests.post(f"{server.url}/sdapi/v1/evaluate", json=body(prompt_set=str(csv_file)),
                             timeout=TIMEOUT)
    assert response.status_code == 422, response.text
    assert "outside the folders" in response.json()["detail"][0]["msg"]


def test_an_unknown_id_is_404(server):
    assert requests.get(f"{server.url}/sdapi/v1/evaluate/eval-999", timeout=TIMEOUT).status_code == 404


@pytest.mark.parametrize("route", ["evaluate/{id}/interrupt", "interrupt"])
def test_interrupt_stops_a_run(server, route):
    many = body(prompt_set="built-in", seeds=[1, 2, 3], metrics=["clip_score"])
    job_id = requests.post(f"{server.url}/sdapi/v1/evaluate", json=many, timeout=TIMEOUT).json()["id"]
    deadline = time.monotonic() + 120
    while requests.get(f"{server.url}/sdapi/v1/evaluate/{job_id}", timeout=TIMEOUT).json()["state"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = requests.post(f"{server.url}/sdapi/v1/{route.format(id=job_id)}", timeout=TIMEOUT)
    assert response.status_code == 200
    status = wait(server.url, job_id)
    assert status["state"] == "interrupted" and status["results"] is None
    # the queue is free again: another job runs
    follow = requests.post(f"{server.url}/sdapi/v1/evaluate", json=body(metrics=["ssim"]), timeout=TIMEOUT)
    assert wait(server.url, follow.json()["id"])["state"] == "done"


def test_the_measuring_holds_the_device_and_the_queue_line_names_the_run(server, monkeypatch):
    from pipelines.evaluation import runner
    from webui.ui.jobs import queue_status_html

    lock, seen = server.ctx.engine.device_lock, {}

    def free_for_others() -> None:
        seen["free"] = lock.acquire(blocking=False)
        if seen["free"]:
            lock.release()

    def score_run(*args, **kwargs):
        probe = threading.Thread(target=free_for_others)
        probe.start()
        probe.join()
        seen["line"] = queue_status_html(server.ctx, [])
        return original(*args, **kwargs)

    original = runner.score_run
    monkeypatch.setattr(runner, "score_run", score_run)
    job_id = requests.post(f"{server.url}/sdapi/v1/evaluate", json=body(metrics=["ssim"]), timeout=TIMEOUT).json()["id"]
    assert wait(server.url, job_id)["state"] == "done"
    assert seen["free"] is False  # a generation from another thread would have waited
    assert "An evaluation run is running" in seen["line"], seen["line"]


def test_a_shutdown_interrupts_a_running_evaluation_and_waits_for_it(server):
    from webui.evaluation_jobs import evaluation_jobs

    many = body(prompt_set="built-in", seeds=[1, 2, 3], metrics=["clip_score"])
    job_id = requests.post(f"{server.url}/sdapi/v1/evaluate", json=many, timeout=TIMEOUT).json()["id"]
    job = evaluation_jobs(server.ctx).get(job_id)
    deadline = time.monotonic() + 120
    while job.state == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.ctx.close(timeout=120)
    assert job.finished.is_set() and job.state == "interrupted"
