"""Start-up: one server of ours (UI + API), ready only when it answers, on a busy machine behind a proxy variable.

Gradio's ``launch()`` probed its own URL with a short timeout and failed the start when the machine was busy
or a proxy variable was set; the server is now ours (uvicorn), and nothing at start-up can fail that way.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.ui.helpers import free_port, start_ui_server

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
TRIES = 5
BUSY_LOOPS = 2
#: How long one start may take at most on a very busy CI machine (it takes about 10 s on an idle 2-core one).
START_LIMIT_S = 240


def _direct() -> httpx.Client:
    """An HTTP client that ignores the proxy variables, as a browser on this machine would for loopback."""
    return httpx.Client(trust_env=False, timeout=30)


def _behind_unreachable_proxy() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key.upper() not in ("NO_PROXY", *PROXY_VARIABLES)}
    return {**env, **dict.fromkeys(PROXY_VARIABLES, UNREACHABLE_PROXY), "PYTHONUNBUFFERED": "1"}


def _busy_loop(seconds: float) -> subprocess.Popen:
    """A process that keeps one core busy for ``seconds`` at most."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_launch_starts_every_time_on_a_busy_machine_behind_an_unreachable_proxy(tiny_models, tmp_path):
    """Five starts of the real ``launch.py`` at once, beside two busy loops, with every proxy variable pointing
    at a port where nothing listens and no NO_PROXY: each prints its ready line, and at that moment already
    answers ``/`` (the UI) and ``/sdapi/v1/sd-models`` (the API) on the same port; Ctrl-C stops it cleanly.

    The starts run at the same time so that the machine is even busier than with the busy loops alone
    (about seven runnable processes per two cores) while the test stays within a minute or two.
    """
    busy = [_busy_loop(START_LIMIT_S + 60) for _ in range(BUSY_LOOPS)]
    servers: list[tuple[subprocess.Popen, int, Path]] = []
    try:
        for number in range(TRIES):
            port, data, log = free_port(), tmp_path / f"data{number}", tmp_path / f"server{number}.log"
            data.mkdir()
            command = [sys.executable, str(ROOT / "launch.py"), "--skip-install", "--api", "--use-cpu", "all",
                       "--models-dir", str(tiny_models), "--data-dir", str(data), "--port", str(port)]
            with log.open("wb") as out:
                process = subprocess.Popen(command, cwd=ROOT, env=_behind_unreachable_proxy(), stdout=out,
                                           stderr=subprocess.STDOUT)
            servers.append((process, port, log))
        deadline = time.monotonic() + START_LIMIT_S
        waiting = list(servers)
        with _direct() as client:
            while waiting:
                for process, port, log in list(waiting):
                    text = log.read_text(errors="replace")
                    assert process.poll() is None, f"the server on port {port} stopped:\n{text}"
                    if "ready in" not in text:
                        continue
                    waiting.remove((process, port, log))
                    # No retry: the ready line comes only once the server answers.
                    page = client.get(f"http://127.0.0.1:{port}/")
                    assert page.status_code == 200 and "<html" in page.text.lower(), text
                    models = client.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models")
                    assert models.status_code == 200, text
                    assert any(item["model_name"] == "tiny-sd15" for item in models.json())
                assert time.monotonic() < deadline, f"not ready after {START_LIMIT_S} s: ports " + ", ".join(
                    str(port) for _, port, _ in waiting)
                time.sleep(0.2)
        for process, _, _ in servers:
            process.send_signal(signal.SIGINT)  # Ctrl-C
        for process, _, log in servers:
            assert process.wait(timeout=60) == 0, log.read_text(errors="replace")
    finally:
        for process in [process for process, _, _ in servers] + busy:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_gradio_auth_guards_the_ui_and_api_auth_the_api_on_the_one_server(tmp_path):
    running = start_ui_server(tmp_path / "models", tmp_path / "data", "--api", "--gradio-auth", "ann:pw1",
                              "--api-auth", "bob:pw2")
    try:
        with _direct() as client:
            assert client.get(running.url + "config").status_code == 401
            assert client.post(running.url + "login", data={"username": "ann", "password": "no"}).status_code == 400
            assert client.post(running.url + "login", data={"username": "ann", "password": "pw1"}).status_code == 200
            assert client.get(running.url + "config").status_code == 200  # the login cookie
            api = running.url + "sdapi/v1/sd-models"
            assert client.get(api).status_code == 401 and client.get(running.url + "docs").status_code == 401
            assert client.get(api, auth=("bob", "pw2")).json() == []
    finally:
        running.server.close()


def test_share_without_network_says_so_and_keeps_serving(tmp_path, monkeypatch, caplog):
    """``--share`` where the share server cannot be reached (here: every request goes to a dead proxy, so the
    test stays off the network): a clear message, and the local server goes on answering."""
    for key in PROXY_VARIABLES:
        monkeypatch.setenv(key, UNREACHABLE_PROXY)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    running = start_ui_server(tmp_path / "models", tmp_path / "data", "--share", "--gradio-auth", "ann:pw1")
    try:
        with caplog.at_level(logging.ERROR, logger="webui"):
            assert running.server.open_share_link() is None
        assert "could not open a Gradio share link" in caplog.text and running.url in caplog.text
        assert running.server.share_url is None
        # Loopback stays off the proxies for this process and everything it runs.
        assert "127.0.0.1" in os.environ["NO_PROXY"].split(",")
        assert httpx.get(running.url, timeout=30).status_code == 200
    finally:
        running.server.close()
