"""Issue 15, item 5: an unsafe or broken model file chosen in a request is a JSON 422 naming the file and why.

A server's model folders hold, next to the tiny models, for each kind a request can choose (checkpoint, VAE,
upscaler, LoRA, ControlNet model, TAESD preview): a malicious pickle whose unpickling would create a marker
file (it must never run), a truncated ``.safetensors`` and a file of random bytes. Each is requested through
the API; the answer is a 422 whose ``loc`` names the request field and whose message names the file and the
reason, the marker never appears, and a good request right after answers 200.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from pipelines.engine import Engine
from pipelines.settings import EngineSettings, Paths
from tests.fixtures.api_helpers import ApiServer, b64_png
from tests.fixtures.pictures import picture
from tests.fixtures.tiny_models import write_malicious_ckpt
from tests.helpers import SD15, payload

TIMEOUT = 120
SMALL = payload()
#: Per model folder: the kind's name in the file names and its pickle suffix.
KINDS = {"Stable-diffusion": ("ckpt", ".ckpt"), "VAE": ("vae", ".pt"), "ESRGAN": ("upscaler", ".pth"),
         "Lora": ("lora", ".pt"), "ControlNet": ("cn", ".pth")}
GOOD = {"Stable-diffusion": SD15, "VAE": "tiny-vae.safetensors", "ESRGAN": "tiny-esrgan-4x.pth",
        "Lora": "tiny-sd15-lora-kohya.safetensors", "ControlNet": "tiny-controlnet-sd15.safetensors"}
BROKEN = ("evil", "truncated", "random")
#: Words of the reason each broken file is refused for (one of them). Random bytes in a pickled file are
#: refused by the weights-only unpickler like any pickle it does not accept.
REASONS = {"evil": ("wanted to import",), "truncated": ("not a readable",),
           "random": ("not a readable", "pickle features beyond plain tensors")}


def _file_name(kind: str, broken: str) -> str:
    stem, suffix = KINDS[kind]
    return f"{broken}-{stem}{'.safetensors' if broken == 'truncated' else suffix}"


def _write_bad_files(folder: Path, kind: str, safetensors_file: Path, marker: Path) -> None:
    write_malicious_ckpt(folder / _file_name(kind, "evil"), marker)
    data = safetensors_file.read_bytes()
    (folder / _file_name(kind, "truncated")).write_bytes(data[: len(data) // 2])
    (folder / _file_name(kind, "random")).write_bytes(os.urandom(4096))


def _models_with_bad_files(tiny_models: Path, root: Path, marker: Path) -> Path:
    """The tiny models (linked, file by file) plus the bad files in each kind's folder."""
    models = root / "models"
    for entry in tiny_models.iterdir():
        if entry.name not in KINDS:
            (models / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (models / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
            continue
        (models / entry.name).mkdir(parents=True)
        for item in entry.iterdir():
            (models / entry.name / item.name).symlink_to(item, target_is_directory=item.is_dir())
    for kind in KINDS:
        # The tiny upscaler is a .pth: a LoRA's safetensors, cut in half, stands in for a broken one.
        source = tiny_models / ("Lora" if kind == "ESRGAN" else kind) / GOOD["Lora" if kind == "ESRGAN" else kind]
        _write_bad_files(models / kind, kind, source, marker)
    return models


@pytest.fixture(scope="module")
def bad_models(tiny_models, tmp_path_factory):
    """(server, marker): an API server with the built-in extensions on the models with bad files."""
    from webui.extensions import load_extensions

    root = tmp_path_factory.mktemp("bad-models")
    marker = root / "pickle-ran.txt"
    models = _models_with_bad_files(tiny_models, root, marker)
    data = root / "data"
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=models, outputs_dir=data / "outputs"),
                                   device="cpu", checkpoint_cache=2))
    engine.loaded_extensions = load_extensions(engine, plugin_dir=root / "plugins")
    server = ApiServer(engine, data, engine.loaded_extensions).start()
    # The first checkpoint in the list is a broken one: select a good one for requests that name none.
    selected = requests.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": SD15}, timeout=TIMEOUT)
    assert selected.status_code == 200, selected.text
    yield server, marker
    server.stop()


def _request(kind: str, name: str) -> tuple[str, dict, str]:
    """(route, body, the request field that names the file) choosing ``name`` of ``kind``."""
    stem = Path(name).stem
    if kind == "Stable-diffusion":
        return "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": name}}, "sd_model_checkpoint"
    if kind == "VAE":
        return "txt2img", {**SMALL, "override_settings": {"sd_vae": name}}, "sd_vae"
    if kind == "ESRGAN":
        return "txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": stem, "hr_scale": 1.5,
                           "denoising_strength": 0.5, "hr_second_pass_steps": 1}, "hr_upscaler"
    if kind == "Lora":
        return "txt2img", {**SMALL, "prompt": f"a cat <lora:{stem}:0.8>"}, "prompt"
    unit = {"enabled": True, "module": "none", "model": stem, "image": b64_png(picture())}
    return "txt2img", {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}, "alwayson_scripts"


def _assert_refused(answer: requests.Response, field: str, name: str, reasons: tuple[str, ...]) -> None:
    assert answer.status_code == 422, f"{name}: {answer.status_code} {answer.text[:2000]}"
    detail = answer.json()["detail"]
    assert any(field in item["loc"] and name in item["msg"] and any(reason in item["msg"] for reason in reasons)
               for item in detail), detail


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_model_file_in_a_request_is_422_naming_the_file(bad_models, kind, broken):
    server, marker = bad_models
    name = _file_name(kind, broken)
    route, body, field = _request(kind, name)
    answer = requests.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=TIMEOUT)
    _assert_refused(answer, field, name, REASONS[broken])
    assert not marker.exists(), "the malicious pickle ran"
    route, body, _ = _request(kind, GOOD[kind])
    good = requests.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=TIMEOUT)
    assert good.status_code == 200, good.text[:2000]


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("field", ["upscaler_1", "upscaler_2"])
def test_bad_upscaler_file_in_extras_is_422_naming_the_file(bad_models, field, broken):
    server, marker = bad_models
    name = _file_name("ESRGAN", broken)
    body = {"image": b64_png(picture((32, 24))), "upscaling_resize": 2, "upscaler_1": "Nearest",
            field: Path(name).stem, **({"extras_upscaler_2_visibility": 0.5} if field == "upscaler_2" else {})}
    answer = requests.post(f"{server.url}/sdapi/v1/extra-single-image", json=body, timeout=TIMEOUT)
    _assert_refused(answer, field, name, REASONS[broken])
    assert not marker.exists(), "the malicious pickle ran"


@pytest.mark.parametrize("broken", BROKEN)
def test_bad_checkpoint_or_vae_in_options_is_422_and_the_model_stays(bad_models, broken):
    server, marker = bad_models
    for kind, option in (("Stable-diffusion", "sd_model_checkpoint"), ("VAE", "sd_vae")):
        name = _file_name(kind, broken)
        answer = requests.post(f"{server.url}/sdapi/v1/options", json={option: name}, timeout=TIMEOUT)
        _assert_refused(answer, option, name, REASONS[broken])
    assert not marker.exists(), "the malicious pickle ran"
    good = requests.post(f"{server.url}/sdapi/v1/txt2img", json=SMALL, timeout=TIMEOUT)
    assert good.status_code == 200, good.text[:2000]


@pytest.mark.parametrize("broken", ["evil", "random"])
def test_bad_taesd_pickle_falls_back_to_cheap_previews(tiny_models, tmp_path, broken):
    """A TAESD decoder that is a malicious or random pickle: the job succeeds with cheap previews, says why,
    and the pickle never ran."""
    marker = tmp_path / "pickle-ran.txt"
    models = tmp_path / "models"
    models.mkdir()
    for entry in tiny_models.iterdir():
        if entry.name != "VAE-taesd":
            (models / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    decoder = models / "VAE-taesd" / "taesd_decoder.pth"
    if broken == "evil":
        write_malicious_ckpt(decoder, marker)
    else:
        decoder.parent.mkdir()
        decoder.write_bytes(os.urandom(4096))
    data = tmp_path / "data"
    engine = Engine(EngineSettings(paths=Paths(data_dir=data, models_dir=models, outputs_dir=data / "outputs"),
                                   device="cpu"))
    server = ApiServer(engine, data).start()
    try:
        answer = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=TIMEOUT, json={
            **SMALL, "override_settings": {"show_progress_type": "TAESD", "show_progress_every_n_steps": 1}})
        assert answer.status_code == 200, answer.text
        warnings = json.loads(answer.json()["info"])["warnings"]
        assert any("TAESD" in warning and "taesd_decoder.pth" in warning for warning in warnings), warnings
        assert not marker.exists(), "the malicious pickle ran"
    finally:
        server.stop()
