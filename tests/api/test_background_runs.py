"""Training runs in their threads: the queue line names them, they hold the engine's device lock so that no
generation runs beside them, and a shutdown (``AppContext.close``) stops them and waits for their threads."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.engine.test_training import settings, write_dataset
from tests.helpers import txt2img
from tests.ui.helpers import free_port
from webui.api.routes_train import training_runs
from webui.context import AppContext
from webui.flags import Flags
from webui.job_queue import JobQueue
from webui.ui.jobs import queue_status_html


@pytest.fixture()
def ctx(tiny_models, tmp_path):
    from tests.engine.test_finetune import own_models_dir
    from tests.engine.test_training import make_engine

    data = tmp_path / "data"
    engine = make_engine(own_models_dir(tiny_models, tmp_path / "models"), data)
    write_dataset(data / "pictures")
    return AppContext(Flags(nowebui=True, data_dir=str(data)), engine, data / "config.json")


ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(("source", "line"), [("train", "A training run is running"),
                                              ("evaluation", "An evaluation run is running"),
                                              ("api", "An API job is running"), ("ui", "Another job is running")])
def test_the_queue_line_names_the_running_job(source, line):
    queue, started, release = JobQueue(), threading.Event(), threading.Event()

    def job(control):
        control.start(job_count=1, sampling_steps=8)
        control.update(step=3)
        started.set()
        release.wait(10)

    worker = threading.Thread(target=queue.run, args=(job,), kwargs={"source": source})
    worker.start()
    try:
        assert started.wait(10)
        html = queue_status_html(SimpleNamespace(queue=queue), [])
        assert f"{line}: step 3/8" in html, html
    finally:
        release.set()
        worker.join(10)


def test_shutdown_stops_the_runs_and_a_generation_waits_for_the_device(ctx):
    runs = training_runs(ctx)
    folder = ctx.engine.paths.data_dir / "pictures"
    first = runs.start(settings("shutdown-running", steps=100_000), folder)
    waiting = runs.start(settings("shutdown-waiting", steps=2), folder)
    wait_until(lambda: first.state is not None and first.state.step >= 1)
    assert first.status == "running" and waiting.status == "queued"
    assert "A training run is running: step" in queue_status_html(ctx, [])

    # The run holds the device: a generation sent past the queue waits until the run has ended.
    lock = ctx.engine.device_lock
    assert not lock.acquire(blocking=False)
    generated = []
    generation = threading.Thread(target=lambda: generated.append(ctx.engine.generate(txt2img(steps=2))))
    generation.start()
    generation.join(2)
    assert not generated

    ctx.close(timeout=120)
    assert not first.thread.is_alive() and not waiting.thread.is_alive()
    # The running run stopped through its interrupt path: its state at the step reached is saved.
    assert first.status == "stopped" and first.state.interrupted and first.error is None
    assert first.state.output is not None and first.state.output.is_file()
    # The run waiting for its turn ended without training (nothing loaded, nothing saved).
    assert waiting.status == "stopped" and waiting.state is None and waiting.error is None
    generation.join(120)
    assert generated and generated[0].images
    assert lock.acquire(blocking=False)
    lock.release()


def test_ctrl_c_during_a_training_run_stops_it_and_the_process_exits_cleanly(tiny_models, tmp_path):
    """The real ``launch.py``: a run started through the API, then Ctrl-C. The run stops at its next step with
    its resumable save, and the process exits with 0 (a run still on the device at exit would abort it)."""
    from tests.engine.test_finetune import own_models_dir

    models, data, log, port = own_models_dir(tiny_models, tmp_path / "models"), tmp_path / "data", \
        tmp_path / "server.log", free_port()
    write_dataset(data / "pictures")
    command = [sys.executable, str(ROOT / "launch.py"), "--skip-install", "--nowebui", "--use-cpu", "all",
               "--models-dir", str(models), "--data-dir", str(data), "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is None and "ready in" in log.read_text(errors="replace"), 240)
        url = f"http://127.0.0.1:{port}/sdapi/v1/train"
        with httpx.Client(trust_env=False, timeout=60) as client:
            body = settings("ctrl-c", dataset="pictures", steps=100_000).model_dump(mode="json")
            run = client.post(url, json=body).json()["id"]
            wait_until(lambda: client.get(f"{url}/{run}").json()["step"] >= 1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text(errors="replace")
    assert "terminate called" not in text and "did not stop" not in text, text
    assert (models / "Lora" / "ctrl-c.safetensors").is_file()
