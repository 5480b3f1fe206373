"""Safe when exposed: folders and fetches, tried as an attacker would, against a running server on loopback.

One test per class: writes outside the allowed folders, an unwritable folder, reads outside them (Extras'
"Batch from Directory"), and fetches of a URL a request chose (the default-model download and its network
check). The server is the real one (UI + ``--api``) on the tiny models, called with raw HTTP: the A1111 API
with ``requests``, the UI's event handlers through Gradio's queue routes, as a browser would call them.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.helpers import payload
from tests.ui.helpers import start_ui_server

TIMEOUT = 120
OPTION = "outdir_txt2img_samples"


# --- the server and how to call it -------------------------------------------------------------


class Site:
    """A running server and the folders around it."""

    def __init__(self, running, allowed: Path, outside: Path):
        self.running, self.allowed, self.outside = running, allowed, outside
        self.url = running.url.rstrip("/")
        self.api = self.url + "/sdapi/v1"
        self.data = running.data_dir
        self.ctx = running.ctx

    def ui_call(self, elem_id: str | None = None, *, api_name: str | None = None, data: list | None = None,
                session: str | None = None) -> dict:
        """Run a UI event handler through Gradio's queue, as the page does; its ``process_completed`` message.
        The handler is the one named ``api_name``, or the ``select`` of the tab whose elem_id is given."""
        config = requests.get(self.url + "/config", timeout=TIMEOUT).json()
        if api_name is not None:
            dependency = next(d for d in config["dependencies"] if d.get("api_name") == api_name)
        else:
            target = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == elem_id)
            dependency = next(d for d in config["dependencies"] if [target, "select"] in d["targets"])
        session = session or uuid.uuid4().hex
        joined = requests.post(self.url + "/gradio_api/queue/join", timeout=TIMEOUT, json={
            "data": data or [], "fn_index": dependency["id"], "session_hash": session,
            "event_data": None, "trigger_id": None})
        assert joined.status_code == 200, joined.text
        event = joined.json()["event_id"]
        with requests.get(self.url + "/gradio_api/queue/data", params={"session_hash": session}, stream=True,
                          timeout=TIMEOUT) as stream:
            for line in stream.iter_lines():
                if line.startswith(b"data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed" and message.get("event_id") == event:
                        return message
        raise AssertionError("the UI event never completed")


@pytest.fixture(scope="module")
def site(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("security-paths")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    running = start_ui_server(tiny_models, root / "data", "--api", "--allowed-dir", str(allowed))
    yield Site(running, allowed, outside)
    running.server.close()


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def refused_option(answer: requests.Response, option: str) -> str:
    """The message of a 422 that names ``option`` in its loc and its text."""
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    item = next((d for d in detail if option in d["loc"]), None)
    assert item is not None and option in item["msg"], detail
    return item["msg"]


# --- 1. writes stay inside the allowed folders -------------------------------------------------


def test_output_folders_outside_the_allowed_folders_are_refused(site):
    outside_absolute = str(site.outside / "abs")
    link = site.data / "link-out"  # inside the data dir, but leading outside it
    link.symlink_to(site.outside, target_is_directory=True)
    for bad in (outside_absolute, "../escape", "~/escape", "link-out/shots", "/tmp"):
        generated = requests.post(f"{site.api}/txt2img", timeout=TIMEOUT, json=payload(
            save_images=True, override_settings={OPTION: bad}))
        message = refused_option(generated, OPTION)
        assert "outside" in message or "'~' is not expanded" in message
        # the persistent way is refused alike, and the option keeps its value
        posted = requests.post(f"{site.api}/options", json={OPTION: bad}, timeout=TIMEOUT)
        refused_option(posted, OPTION)
        assert requests.get(f"{site.api}/options", timeout=TIMEOUT).json()[OPTION] == ""
    assert pngs(site.outside) == [] and not (site.data.parent / "escape").exists()
    assert not Path("~/escape").expanduser().exists() and not (site.data / "~").exists()

    # Allowed: a folder given with --allowed-dir, and a relative one, which lands inside the data dir.
    allowed = site.allowed / "shots"
    answer = requests.post(f"{site.api}/txt2img", timeout=TIMEOUT, json=payload(
        save_images=True, override_settings={OPTION: str(allowed)}))
    assert answer.status_code == 200, answer.text
    assert len(pngs(allowed)) == 1
    try:
        posted = requests.post(f"{site.api}/options", json={OPTION: "relative/shots"}, timeout=TIMEOUT)
        assert posted.status_code == 200, posted.text
        answer = requests.post(f"{site.api}/txt2img", timeout=TIMEOUT, json=payload(save_images=True))
        assert answer.status_code == 200, answer.text
        assert len(pngs(site.data / "relative" / "shots")) == 1
    finally:
        requests.post(f"{site.api}/options", json={OPTION: ""}, timeout=TIMEOUT)


def test_an_unwritable_output_folder_is_refused_before_the_job(site):
    blocker = site.data / "a-file"
    blocker.write_text("a file where a folder would be")
    jobs = site.ctx.queue.finished_jobs
    before = pngs(site.data)
    for option, body in ((OPTION, payload(save_images=True)),
                         ("outdir_txt2img_grids", payload(save_images=True, batch_size=2))):
        generated = requests.post(f"{site.api}/txt2img", timeout=TIMEOUT, json={
            **body, "override_settings": {option: "a-file/images"}})
        assert "is a file, not a folder" in refused_option(generated, option)
        refused_option(requests.post(f"{site.api}/options", json={option: "a-file/images"}, timeout=TIMEOUT),
                       option)
    assert site.ctx.queue.finished_jobs == jobs, "no job may run for a request refused for its folder"
    assert pngs(site.data) == before
    if os.geteuid() != 0:  # root writes into any folder, whatever its mode
        locked = site.data / "locked"
        locked.mkdir(mode=0o555)
        generated = requests.post(f"{site.api}/txt2img", timeout=TIMEOUT, json=payload(
            save_images=True, override_settings={OPTION: "locked/images"}))
        assert "not writable" in refused_option(generated, OPTION)


# --- 2. reads stay inside the allowed folders --------------------------------------------------


def test_extras_batch_from_directory_reads_only_inside_the_allowed_folders(site):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(site.outside / "secret.png")
    inside = site.allowed / "in"
    inside.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(inside / "mine.png")
    (inside / "leak.png").symlink_to(site.outside / "secret.png")  # a file link leading outside
    (site.data / "dir-link").symlink_to(site.outside, target_is_directory=True)
    session = uuid.uuid4().hex
    site.ui_call("extras_batch_directory_tab", session=session)  # the tab sets the source to "folder"

    def process(folder: str) -> dict:
        # Extras' inputs: ..., upscaler 2 visibility, GFPGAN visibility, CodeFormer visibility, CodeFormer weight.
        data = [None, None, None, folder, None, 2, 64, 64, True, "Lanczos", "None", 0, 0, 0, 0.5]
        return site.ui_call(api_name="process", data=data, session=session)

    for bad in (str(site.outside), "../" + site.outside.name, "~", "dir-link"):
        answer = process(bad)
        assert answer["success"] is False, answer
        assert "Input directory" in answer["output"]["error"] and "outside" in answer["output"]["error"] \
            or "'~' is not expanded" in answer["output"]["error"], answer
    done = process(str(inside))
    assert done["success"] is True, done
    gallery, info = done["output"]["data"]
    assert len(gallery) == 1 and "1 image(s), 16x16" in info  # mine.png only: the link was left out

    # The API reads and writes no folder on the server at all.
    body = {"imageList": [{"data": "", "name": "x"}], "upscaler_1": "Lanczos"}
    for field in ("input_dir", "output_dir"):
        answer = requests.post(f"{site.api}/extra-batch-images", json={**body, field: str(site.outside)},
                               timeout=TIMEOUT)
        assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", field], answer.text


# --- 3. no fetch of a URL that a request chose -------------------------------------------------


class Listener:
    """A TCP listener on a free loopback port that counts the connections it gets."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_the_download_url_cannot_be_chosen_and_nothing_is_fetched_with_a_checkpoint(site, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # so a probe of the network would really connect
    listener = Listener()
    try:
        chosen = f"http://127.0.0.1:{listener.port}/model.safetensors"
        refused_option(requests.post(f"{site.api}/options", json={"default_model_url": chosen}, timeout=TIMEOUT),
                       "default_model_url")
        refused_option(requests.post(f"{site.api}/txt2img", timeout=TIMEOUT, json=payload(
            override_settings={"default_model_url": chosen})), "default_model_url")
        current = requests.get(f"{site.api}/options", timeout=TIMEOUT).json()
        assert current["default_model_url"] != chosen
        # Clients post the whole dict back: the unchanged value is accepted.
        assert requests.post(f"{site.api}/options", json={"default_model_url": current["default_model_url"]},
                             timeout=TIMEOUT).status_code == 200
        # The Download button with a checkpoint there: refused before any network check.
        answer = site.ui_call(api_name="download", data=[None])
        assert answer["success"] is True, answer
        assert "already there" in answer["output"]["data"][0]
    finally:
        listener.close()
    assert listener.connections == 0


class Redirector(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_download_follows_no_redirect_to_another_host(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    other = Listener()  # the host a redirect points to: it must see nothing
    Redirector.target = f"http://localhost:{other.port}/model.safetensors"
    origin = http.server.HTTPServer(("127.0.0.1", 0), Redirector)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    models = tmp_path / "models"  # no checkpoint: the download is offered
    running = start_ui_server(models, tmp_path / "data", "--default-model-url",
                              f"http://127.0.0.1:{origin.server_port}/model.safetensors")
    try:
        site = Site(running, tmp_path, tmp_path)
        answer = site.ui_call(api_name="download", data=[None])
        assert answer["success"] is True, answer
        status = answer["output"]["data"][0]
        assert "Download failed" in status and "another host" in status, status
        assert list((models / "Stable-diffusion").glob("model.safetensors*")) == []
    finally:
        running.server.close()
        origin.shutdown()
        other.close()
    assert other.connections == 0
