"""Issue 16 (parts): API answers shaped as A1111 1.10 and sd-webui-controlnet answer them.

The response models below are written from A1111's own (UpscalerItem, ScriptInfo/ScriptArg, ProgressResponse,
the /internal/progress answer); every answer is validated against them with ``extra="forbid"`` off, as a
typed client would read it. Clients: webuiapi and raw requests, on the real server with the tiny models.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import pytest
import requests
import webuiapi
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, TypeAdapter

from tests.fixtures.api_helpers import ApiServer, b64_png, decode_png
from tests.fixtures.pictures import picture
from tests.fixtures.tiny_controlnets import write_tiny_controlnets

TIMEOUT = 120
ESRGAN = "tiny-esrgan-4x"
SMALL = {"steps": 4, "width": 64, "height": 64, "prompt": "a cat", "seed": 3}


# --- A1111's response models ------------------------------------------------------------------------


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float  # A1111's UpscalerData: always a number (4 unless the model says otherwise)


class ScriptArg(BaseModel):
    label: str | None = None
    value: Any | None = None
    minimum: Any | None = None
    maximum: Any | None = None
    step: Any | None = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class InternalProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: float | None = None
    eta: float | None = None
    live_preview: str | None = None
    id_live_preview: int | None = None
    textinfo: str | None = None


# --- the server, with the built-in extensions ------------------------------------------------------


@pytest.fixture(scope="module")
def compat_engine(tiny_models, engine_factory, tmp_path_factory):
    from webui.extensions import load_extensions

    write_tiny_controlnets(tiny_models / "ControlNet")
    engine = engine_factory(checkpoint_cache=2)
    engine.loaded_extensions = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("plugins"))
    return engine


@pytest.fixture(scope="module")
def served(compat_engine):
    """(port, AppContext) of the API server."""
    site = ApiServer(compat_engine, compat_engine.paths.data_dir, compat_engine.loaded_extensions).start()
    yield site.port, site.ctx
    site.stop()


@pytest.fixture()
def base(served):
    return f"http://127.0.0.1:{served[0]}"


@pytest.fixture()
def ctx(served):
    return served[1]


@pytest.fixture()
def client(served):
    return webuiapi.WebUIApi(host="127.0.0.1", port=served[0], sampler="Euler a", steps=4)


def get(base: str, path: str, **kw) -> requests.Response:
    return requests.get(base + path, timeout=TIMEOUT, **kw)


def post(base: str, path: str, body: dict) -> requests.Response:
    return requests.post(base + path, json=body, timeout=TIMEOUT)


# --- item 3: /sdapi/v1/upscalers -------------------------------------------------------------------------


def test_upscalers_all_have_a_scale_and_unusable_files_are_left_out(base, client, ctx, tiny_models, caplog):
    from webui.ui.extras import upscaler_choices

    junk = tiny_models / "ESRGAN" / "compat-junk.pth"
    junk.write_bytes(b"a truncated download")
    try:
        answer = get(base, "/sdapi/v1/upscalers")
        typed = client.get_upscalers()
        labels = {value: label for label, value in upscaler_choices(ctx)}  # the Extras tab's list
    finally:
        junk.unlink()
    assert answer.status_code == 200, answer.text
    items = TypeAdapter(list[UpscalerItem]).validate_python(answer.json())
    scales = {item.name: item.scale for item in items}
    assert scales["None"] == scales["Lanczos"] == scales["Nearest"] == 4 and scales[ESRGAN] == 4
    assert "compat-junk" not in scales and "compat-junk" not in [u["name"] for u in typed]
    assert any("compat-junk" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # The UI still lists the file, its label giving the reason.
    assert "compat-junk" in labels and "cannot be used" in labels["compat-junk"]
    assert labels[ESRGAN] == ESRGAN


# --- item 5: routes A1111 has ------------------------------------------------------------------------------


def test_ping_and_interrogate(base, client):
    assert get(base, "/internal/ping").json() == {}
    answer = post(base, "/sdapi/v1/interrogate", {"image": b64_png(picture()), "model": "clip"})
    assert answer.status_code == 422
    message = answer.json()["detail"][0]["msg"]
    assert "interrogat" in message and "CLIP" in message and "models" in message
    with pytest.raises(RuntimeError):  # webuiapi raises on a non-200 answer
        client.interrogate(picture(), model="clip")


def test_script_info_lists_every_script_with_its_args(base):
    answer = get(base, "/sdapi/v1/script-info")
    assert answer.status_code == 200, answer.text
    infos = TypeAdapter(list[ScriptInfo]).validate_python(answer.json())
    by_key = {(info.name, info.is_img2img): info for info in infos}
    for tab in (False, True):
        for name in ("x/y/z plot", "prompt matrix", "prompts from file or textbox"):
            assert by_key[(name, tab)].is_alwayson is False and by_key[(name, tab)].args, name
        assert by_key[("controlnet", tab)].is_alwayson is True
    matrix = by_key[("prompt matrix", False)].args
    assert [arg.label for arg in matrix][:2] == ["Put variable parts at start of prompt",
                                                 "Use different seed for each picture"]
    assert matrix[0].value is False and matrix[2].choices == ["positive", "negative"]
    margin = matrix[4]
    assert (margin.minimum, margin.maximum, margin.step, margin.value) == (0, 500, 2, 0)
    weights = [arg for arg in by_key[("controlnet", False)].args if arg.label == "Control Weight"]
    assert len(weights) == 3 and weights[0].value == 1.0  # one per unit


def test_scripts_list_controlnet_m2m_and_webuiapi_sees_controlnet(base, client):
    scripts = get(base, "/sdapi/v1/scripts").json()
    assert "controlnet m2m" in scripts["txt2img"] and "controlnet m2m" in scripts["img2img"]
    client.check_extensions()
    assert client.has_controlnet
    # With has_controlnet webuiapi sends alwayson_scripts {"ControlNet": {"args": []}} with every job.
    result = client.txt2img(prompt="a cat", seed=3, width=64, height=64, alwayson_scripts={})
    assert result.image.size == (64, 64)


def test_controlnet_control_types_and_settings(base):
    types = get(base, "/controlnet/control_types").json()["control_types"]
    modules = get(base, "/controlnet/module_list").json()["module_list"]
    models = get(base, "/controlnet/model_list").json()["model_list"]
    assert types["All"] == {"module_list": modules, "model_list": ["None", *models], "default_option": "none",
                            "default_model": "None"}
    canny = types["Canny"]
    assert canny["module_list"][:2] == ["none", "canny"] and canny["default_option"] == "canny"
    assert canny["model_list"][0] == "None" and canny["default_model"] in canny["model_list"]
    for entry in types.values():
        assert set(entry) == {"module_list", "model_list", "default_option", "default_model"}
        assert set(entry["module_list"]) <= set(modules)
    assert get(base, "/controlnet/settings").json() == {"control_net_unit_count": 3}


# --- item 6: ControlNet details ------------------------------------------------------------------------------


def test_controlnet_resolution_slider_default_resolution_and_no_image(base):
    detail = get(base, "/controlnet/module_list").json()["module_detail"]
    assert detail["canny"]["sliders"][0] == {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    assert detail["none"]["sliders"] == []
    source = picture((40, 20))
    by_default = post(base, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images":
                                                   [b64_png(source)], "controlnet_processor_res": -1})
    assert by_default.status_code == 200, by_default.text
    assert min(decode_png(by_default.json()["images"][0]).size) == 512  # -1: the module's default
    empty = post(base, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": []})
    assert empty.status_code == 422 and empty.json()["detail"] == "No image selected"
    assert post(base, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images":
                                             [b64_png(source)], "controlnet_processor_res": 10}).status_code == 422


# --- item 11: png-info, progress current_task, extras not saved ------------------------------------------


def test_png_info_parameters_are_those_of_a1111s_parser(base, client):
    info = ("a cat, \"quoted\"\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Schedule type: Karras, "
            "CFG scale: 7.5, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, "
            "Lora hashes: \"a: 0123, b: 4567\", Version: v1.10.1")
    image = Image.new("RGB", (8, 8))
    meta = PngInfo()
    meta.add_text("parameters", info)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=meta)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    answer = post(base, "/sdapi/v1/png-info", {"image": encoded}).json()
    params = answer["parameters"]
    assert answer["info"] == info
    assert params["Prompt"] == 'a cat, "quoted"' and params["Negative prompt"] == "blurry"
    assert params["Steps"] == "20" and params["CFG scale"] == "7.5" and params["Seed"] == "965400086"
    assert params["Size-1"] == "512" and params["Size-2"] == "768" and "Size" not in params
    assert params["Lora hashes"] == "a: 0123, b: 4567" and params["Schedule type"] == "Karras"
    # A1111's defaults for what the infotext leaves out, with A1111's types
    assert params["Clip skip"] == "1" and params["Hires resize-1"] == 0 and params["Hires resize-2"] == 0
    assert params["Hires sampler"] == "Use same sampler" and params["RNG"] == "GPU"
    assert params["Masked area padding"] == 32 and params["Schedule rho"] == 0
    assert client.png_info(image.copy()).parameters["Prompt"] == ""  # no infotext: still A1111's defaults


def test_old_hires_first_pass_size_becomes_the_size():
    from webui.api.infotext_compat import a1111_parameters

    params = a1111_parameters("x\nSteps: 20, Size: 1024x1024, First pass size: 0x0, Seed: 1")
    assert (params["Size-1"], params["Size-2"], params["Hires resize-1"], params["Hires resize-2"]) == (
        512, 512, 1024, 1024)


def internal_progress(base: str, task: str) -> dict:
    return post(base, "/internal/progress", {"id_task": task}).json()


def test_progress_current_task_and_internal_progress(base, client):
    idle = get(base, "/sdapi/v1/progress")
    assert ProgressResponse.model_validate(idle.json()).current_task is None
    unknown = InternalProgressResponse.model_validate(internal_progress(base, "task(none)"))
    assert (unknown.active, unknown.queued, unknown.completed, unknown.id_live_preview) == (False, False, False, -1)

    answers: list[requests.Response] = []
    body = {**SMALL, "steps": 60, "batch_size": 1, "n_iter": 3, "force_task_id": "task(compat1)"}
    worker = threading.Thread(target=lambda: answers.append(post(base, "/sdapi/v1/txt2img", body)))
    worker.start()
    seen_progress = seen_internal = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (seen_progress is None or seen_internal is None):
        progress = ProgressResponse.model_validate(get(base, "/sdapi/v1/progress").json())
        if progress.current_task == "task(compat1)" and progress.state["sampling_step"] >= 1:
            seen_progress = progress
        internal = InternalProgressResponse.model_validate(
            post(base, "/internal/progress", {"id_task": "task(compat1)", "id_live_preview": -1,
                                              "live_preview": True}).json())
        if internal.active and internal.progress:
            seen_internal = internal
        time.sleep(0.02)
    client.interrupt()
    worker.join(timeout=120)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert seen_progress is not None and seen_internal is not None
    assert 0 < seen_internal.progress <= 1 and not seen_internal.queued and not seen_internal.completed
    if seen_internal.live_preview is not None:
        assert seen_internal.live_preview.startswith("data:image/png;base64,")
        assert seen_internal.id_live_preview != -1
    done = InternalProgressResponse.model_validate(internal_progress(base, "task(compat1)"))
    assert done.completed and not done.active
    assert get(base, "/sdapi/v1/progress").json()["current_task"] is None


def test_api_extras_are_not_saved(base, ctx, client):
    outputs = ctx.engine.paths.outputs_dir
    before = sorted(outputs.rglob("*.png")) if outputs.exists() else []
    ctx.update_options({"samples_save": True})
    try:
        single = client.extra_single_image(picture((16, 16)), upscaler_1="Lanczos", upscaling_resize=2)
        batch = post(base, "/sdapi/v1/extra-batch-images", {
            "imageList": [{"data": b64_png(picture((16, 16))), "name": "a.png"}], "upscaler_1": "Nearest",
            "upscaling_resize": 2})
    finally:
        ctx.update_options({"samples_save": False})
    assert single.image.size == (32, 32)
    assert batch.status_code == 200 and len(batch.json()["images"]) == 1
    after = sorted(outputs.rglob("*.png")) if outputs.exists() else []
    assert after == before
    json.dumps(batch.json())  # plain JSON
