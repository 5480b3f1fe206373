"""Issue 15, items 4-9, as an attacker would try them against a real server on loopback (one test per class).

Bounded requests (body size before auth and before parsing, decompression bombs, output pixels, deep
prompts, huge integers), errors that are JSON (a bad TAESD file), a responsive queue with a length limit,
browser-side checks (cross-site simple POSTs, Host headers, failed-login limits), one login for UI and API,
and a login page that shows nothing of the models.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from pipelines.engine import Engine
from pipelines.settings import EngineSettings, Paths
from tests.fixtures.api_helpers import ApiServer, b64_png
from tests.helpers import CHECKPOINTS, SD15, payload

TIMEOUT = 120
SMALL = payload()


@pytest.fixture(scope="module")
def limits_engine(engine_factory):
    return engine_factory()


@pytest.fixture()
def keep_pillow_limit(monkeypatch):
    """The servers set Pillow's process-wide pixel limit from their flag; put it back after the test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def _raw_request(port: int, head: str, body: bytes = b"", wait: float = 10.0) -> tuple[int, dict, bytes, float]:
    """Send ``head`` and ``body`` on a plain socket and read the answer: (status, headers, body, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header_text, _, rest = data.partition(b"\r\n\r\n")
        lines = header_text.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, rest, time.monotonic() - started


def _bomb_png(width: int, height: int) -> str:
    """A tiny PNG (a few dozen bytes) whose header declares ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def _detail(response: requests.Response) -> str:
    return json.dumps(response.json())


def test_bounded_requests(limits_engine, tmp_path, keep_pillow_limit):
    """Body limit before auth and parsing, pixel limits on decoded and produced images, deep prompts and
    huge integers: each answers 401/413/422 in JSON, never a 500, and never waits for a body it refuses."""
    server = ApiServer(limits_engine, tmp_path, api_auth="u:p", max_body_size=1,
                       max_image_pixels=1_000_000).start()
    auth = "Authorization: Basic " + base64.b64encode(b"u:p").decode() + "\r\n"
    url = server.url + "/sdapi/v1"
    try:
        # A huge declared body and only a few bytes: answered at once, without waiting for the rest.
        head = ("POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000000000\r\n{}\r\n")
        status, _, body, seconds = _raw_request(server.port, head.format(""), b'{"prompt": "')
        assert status == 401 and seconds < 5, (status, body)
        status, _, body, seconds = _raw_request(server.port, head.format(auth.rstrip("\r\n") + "\r\n"),
                                                b'{"prompt": "')
        assert status == 413 and seconds < 5 and b"max-body-size" in body, (status, body)
        # A body sent in chunks (no Content-Length) that grows past the limit: 413 too.
        chunks = (b" " * 65536 for _ in range(40))  # 2.5 MiB of JSON white space
        grown = requests.post(f"{url}/txt2img", data=chunks, auth=("u", "p"),
                              headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        assert grown.status_code == 413 and "max-body-size" in grown.text, grown.text

        # A decompression bomb: a few bytes declaring 2000 x 2000 pixels (limit 1,000,000).
        bomb = requests.post(f"{url}/img2img", json={**SMALL, "init_images": [_bomb_png(2000, 2000)]},
                             auth=("u", "p"), timeout=TIMEOUT)
        assert bomb.status_code == 422 and "init_images" in _detail(bomb) and "1000000" in _detail(bomb), bomb.text
        extras = requests.post(f"{url}/extra-single-image", auth=("u", "p"), timeout=TIMEOUT,
                               json={"image": _bomb_png(5000, 5000), "upscaling_resize": 2})
        assert extras.status_code == 422 and "image" in _detail(extras), extras.text
        # Outputs bounded before work starts: extras 512x512 x4 and hires 512x512 x4 are 4 M pixels.
        source = b64_png(Image.new("RGB", (512, 512), "gray"))
        extras = requests.post(f"{url}/extra-single-image", auth=("u", "p"), timeout=TIMEOUT,
                               json={"image": source, "upscaling_resize": 4})
        assert extras.status_code == 422 and "upscaling_resize" in _detail(extras), extras.text
        hires = requests.post(f"{url}/txt2img", auth=("u", "p"), timeout=TIMEOUT,
                              json={**SMALL, "width": 512, "height": 512, "enable_hr": True, "hr_scale": 4})
        assert hires.status_code == 422 and "hr_scale" in _detail(hires), hires.text

        # 500 nested brackets: 422 naming the prompt, not a RecursionError.
        for field in ("prompt", "negative_prompt"):
            deep = requests.post(f"{url}/txt2img", auth=("u", "p"), timeout=TIMEOUT,
                                 json={**SMALL, field: "(" * 500 + "cat" + ")" * 500})
            assert deep.status_code == 422 and field in _detail(deep), deep.text

        # Integers beyond 64 bits: refused with 422, or kept without crashing the JSON answer.
        huge = 2 ** 70
        seed = requests.post(f"{url}/txt2img", auth=("u", "p"), timeout=TIMEOUT, json={**SMALL, "seed": huge})
        assert seed.status_code == 422 and "seed" in _detail(seed), seed.text
        for body in ({"override_settings": {"CLIP_stop_at_last_layers": huge}},
                     {"override_settings": {"eta_noise_seed_delta": huge}},
                     {"script_name": "x/y/z plot", "script_args": [huge, [huge], huge]},
                     {"alwayson_scripts": {"controlnet": {"args": [{"weight": huge}]}}}):
            answer = requests.post(f"{url}/txt2img", auth=("u", "p"), timeout=TIMEOUT, json={**SMALL, **body})
            assert answer.status_code in (200, 422), (body, answer.status_code, answer.text)
            answer.json()
        options = requests.post(f"{url}/options", auth=("u", "p"), timeout=TIMEOUT,
                                json={"CLIP_stop_at_last_layers": huge})
        assert options.status_code in (200, 422), options.text
    finally:
        server.stop()


def _models_with_bad_taesd(tiny_models: Path, root: Path) -> Path:
    """A models folder like the tiny one whose VAE-taesd holds a file that is not a TAESD decoder."""
    models = root / "models"
    models.mkdir()
    for entry in tiny_models.iterdir():
        if entry.name != "VAE-taesd":
            (models / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (models / "VAE-taesd").mkdir()
    (models / "VAE-taesd" / "taesd_decoder.safetensors").write_bytes(b"not a safetensors file at all")
    return models


def test_bad_taesd_file_falls_back_to_cheap_previews_with_a_warning(tiny_models, tmp_path):
    """A broken TAESD file chosen for previews: the job succeeds with cheap previews and says why."""
    models = _models_with_bad_taesd(tiny_models, tmp_path)
    data = tmp_path / "data"
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=models, outputs_dir=data / "outputs"),
                                   device="cpu"))
    server = ApiServer(engine, data).start()
    try:
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
            **SMALL, "override_settings": {"show_progress_type": "TAESD", "show_progress_every_n_steps": 1}})
        assert answer.status_code == 200, answer.text
        warnings = json.loads(answer.json()["info"])["warnings"]
        assert any("TAESD" in warning and "taesd_decoder.safetensors" in warning for warning in warnings), warnings
    finally:
        server.stop()


def test_queue_stays_responsive_and_refuses_more_than_its_size(limits_engine, tmp_path):
    """40 API jobs wait behind a running one: progress, interrupt and skip answer within a second; one more
    job than --queue-size gets 503 with Retry-After."""
    server = ApiServer(limits_engine, tmp_path, queue_size=40).start()
    queue = server.ctx.queue
    release = threading.Event()
    blocker = threading.Thread(target=queue.run, args=(lambda control: release.wait(120),),
                               kwargs={"source": "test"}, daemon=True)
    blocker.start()
    url = server.url + "/sdapi/v1"
    pool = ThreadPoolExecutor(41)
    try:
        while queue.running is None:
            time.sleep(0.01)
        waiting = [pool.submit(requests.post, f"{url}/txt2img", json=SMALL, timeout=TIMEOUT) for _ in range(40)]
        deadline = time.monotonic() + 60
        while queue.waiting < 40:
            assert time.monotonic() < deadline, f"only {queue.waiting} jobs queued"
            time.sleep(0.05)
        for method, route in (("get", "progress"), ("post", "interrupt"), ("post", "skip"), ("get", "progress")):
            started = time.monotonic()
            answer = requests.request(method, f"{url}/{route}", timeout=10)
            assert answer.status_code == 200 and time.monotonic() - started < 1.0, (route, answer.text)
        full = requests.post(f"{url}/txt2img", json=SMALL, timeout=TIMEOUT)
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1, full.text
        assert "queue-size" in full.text
        # Clean up: the waiting jobs are cancelled (409), the running one ends.
        for ticket in list(queue._waiting):
            queue.cancel(ticket)
        assert {future.result().status_code for future in waiting} == {409}
    finally:
        release.set()
        blocker.join(30)
        pool.shutdown(wait=False)
        server.stop()


def test_cross_site_simple_posts_and_foreign_hosts_are_refused(limits_engine, tmp_path):
    """A form or bodyless POST from another site: 403 (unless --cors-allow-origins allows it); with --listen
    a Host header that is not a name of this machine: 400 (DNS rebinding); --allowed-hosts adds names."""
    server = ApiServer(limits_engine, tmp_path, listen=True, cors_allow_origins="https://friend.example",
                       allowed_hosts="sd.example,*.lan.example").start()
    url = server.url + "/sdapi/v1"
    try:
        for headers in ({"Origin": "https://evil.example"},
                        {"Origin": "https://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
                        {"Referer": "https://evil.example/page", "Content-Type": "text/plain"},
                        {"Origin": "null", "Content-Type": "multipart/form-data; boundary=x"}):
            refused = requests.post(f"{url}/interrupt", headers=headers, data=b"", timeout=TIMEOUT)
            assert refused.status_code == 403 and "cross-site" in refused.json()["detail"], (headers, refused.text)
        for headers in ({}, {"Origin": server.url}, {"Origin": "https://friend.example"}):
            assert requests.post(f"{url}/interrupt", headers=headers, timeout=TIMEOUT).status_code == 200, headers
        for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example"):
            answer = requests.get(f"{url}/samplers", headers={"Host": host}, timeout=TIMEOUT)
            assert answer.status_code == 400 and "allowed-hosts" in answer.json()["detail"], (host, answer.text)
        for host in (f"127.0.0.1:{server.port}", "localhost", "sd.example:7860", "pc.lan.example",
                     socket.gethostname()):
            assert requests.get(f"{url}/samplers", headers={"Host": host}, timeout=TIMEOUT).status_code == 200, host
    finally:
        server.stop()


def test_failed_api_logins_are_rate_limited(limits_engine, tmp_path):
    """Ten wrong passwords in a minute: 401 each, then 429 with Retry-After, even for the right one."""
    server = ApiServer(limits_engine, tmp_path, api_auth="u:p").start()
    url = server.url + "/sdapi/v1/samplers"
    try:
        assert requests.get(url, auth=("u", "p"), timeout=TIMEOUT).status_code == 200
        for guess in range(10):
            assert requests.get(url, auth=("u", f"guess{guess}"), timeout=TIMEOUT).status_code == 401
        for auth in (("u", "guess99"), ("u", "p")):
            limited = requests.get(url, auth=auth, timeout=TIMEOUT)
            assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60, limited.text
    finally:
        server.stop()


def test_gradio_auth_is_the_api_login_and_the_login_page_shows_no_model(tiny_models, tmp_path, caplog):
    """--gradio-auth with --api and no --api-auth: the API wants the UI's login (HTTP Basic or the UI's
    session cookie), start-up says so; before login no page carries a model name; failed UI logins are
    rate-limited."""
    from tests.ui.helpers import start_ui_server

    with caplog.at_level("INFO", logger="webui"):
        running = start_ui_server(tiny_models, tmp_path / "data", "--api", "--gradio-auth", "ann:pw1")
    assert "uses the UI's logins" in caplog.text
    names = [name.rsplit(".", 1)[0] for name in CHECKPOINTS] + ["4x-tiny", "tiny-vae"]
    try:
        with requests.Session() as browser:
            api = running.url + "sdapi/v1/sd-models"
            assert browser.get(api, timeout=TIMEOUT).status_code == 401
            assert browser.get(running.url + "docs", timeout=TIMEOUT).status_code == 401
            assert browser.get(api, auth=("ann", "pw1"), timeout=TIMEOUT).status_code == 200
            # Before login: nothing of the models anywhere.
            for path in ("", "config", "gradio_api/info", "gradio_api/runs", "info", "gradio_api/app_id",
                         "theme.css", "login_check", "gradio_api/startup-events"):
                page = browser.get(running.url + path, timeout=TIMEOUT)
                leaked = [name for name in names if name in page.text]
                assert not leaked, (path, page.status_code, leaked)
            assert browser.post(running.url + "login", data={"username": "ann", "password": "pw1"},
                                timeout=TIMEOUT).status_code == 200
            assert SD15.rsplit(".", 1)[0] in browser.get(running.url + "config", timeout=TIMEOUT).text
            assert browser.get(api, timeout=TIMEOUT).status_code == 200  # the UI's session cookie
        with requests.Session() as guesser:
            for guess in range(10):
                failed = guesser.post(running.url + "login", data={"username": "ann", "password": f"g{guess}"},
                                      timeout=TIMEOUT)
                assert failed.status_code == 400, failed.text
            limited = guesser.post(running.url + "login", data={"username": "ann", "password": "pw1"},
                                   timeout=TIMEOUT)
            assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1, limited.text
    finally:
        running.server.close()


def test_uploads_to_the_ui_are_bounded(tiny_models, tmp_path):
    """The UI's upload route refuses a file larger than --max-body-size, before reading it."""
    from tests.ui.helpers import start_ui_server

    running = start_ui_server(tiny_models, tmp_path / "data", "--max-body-size", "1")
    try:
        big = io.BytesIO(b"\0" * (2 * 1024 * 1024))
        answer = requests.post(running.url + "gradio_api/upload", files={"files": ("big.png", big, "image/png")},
                               timeout=TIMEOUT)
        assert answer.status_code == 413, answer.text
        small = requests.post(running.url + "gradio_api/upload",
                              files={"files": ("small.png", io.BytesIO(b"\0" * 1000), "image/png")}, timeout=TIMEOUT)
        assert small.status_code == 200, small.text
    finally:
        running.server.close()
