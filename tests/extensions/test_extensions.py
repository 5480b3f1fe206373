"""Extensions without a browser: loading (isolation, .disabled, built-in names), the API, one-job model changes.

The example extension (``extensions/example.disabled``) is copied into a temporary extensions folder
without its suffix, next to broken extensions written by the tests.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.images.infotext import parse_infotext
from pipelines.job_control import JobControl
from pipelines.plugins.scripts import AlwaysOnScript
from pipelines.request import GenerationRequest
from tests.helpers import SD15, payload
from webui.app import create_api_app
from webui.context import AppContext
from webui.extensions import ROOT, LoadedExtensions, load_extensions
from webui.flags import Flags

EXAMPLE = ROOT / "extensions" / "example.disabled"
SMALL = payload(steps=3, seed=5, sampler_name="Euler", prompt="a cat")
FAKE_BUILTIN = "fake_builtin"

BROKEN = {
    # A syntax error: the import fails.
    "syntax_error": "def setup(api:\n",
    # setup registers something, then raises: none of it may stay.
    "setup_raises": """
        from webui.extension_api import AlwaysOnScript

        class Half(AlwaysOnScript):
            name, title = "half_registered", "Half registered"

        def setup(api):
            api.add_script(Half())
            api.add_extra_network("halfnet", object())
            raise RuntimeError("boom in setup")
    """,
    # A plug-in taking a built-in's name: refused, together with everything else it registered.
    "takes_builtin": f"""
        from webui.extension_api import AlwaysOnScript

        class Impostor(AlwaysOnScript):
            name, title = "{FAKE_BUILTIN}", "Impostor"

        def setup(api):
            router = api.new_router()

            @router.get("/takes-builtin/ping")
            def ping() -> dict:
                return {{"pong": True}}

            api.add_api_routes(router)
            api.add_extra_network("impostornet", object())
            api.add_script(Impostor())
    """,
    # A disabled folder: never imported (its setup would fail the test by registering "skipped").
    "skipped.disabled": """
        from webui.extension_api import AlwaysOnScript

        class Skipped(AlwaysOnScript):
            name, title = "skipped", "Skipped"

        def setup(api):
            api.add_script(Skipped())
    """,
}

# Changes the UNet for one job and undoes it with job.defer(); args [mode] pick how the job ends.
MODEL_CHANGE = """
    import torch

    from webui.extension_api import AlwaysOnScript

    class DoubleConvIn(AlwaysOnScript):
        name, title = "double_conv_in", "Double conv_in"
        control = None  # set by the test: the running job's JobControl, to interrupt from a step
        seen = []

        def parse_args(self, args):
            return args[0] if args else None

        def before_job(self, job):
            weight = job.model.unet.conv_in.weight
            with torch.no_grad():
                weight.mul_(2.0)

            def restore():
                with torch.no_grad():
                    weight.mul_(0.5)

            job.defer(restore)

        def on_step(self, job, step, latents):
            self.seen.append(float(job.model.unet.conv_in.weight.abs().sum()))
            if job.args == "interrupt" and step == 1:
                self.control.interrupt()

        def after_batch(self, job, images):
            if job.args == "fail":
                raise RuntimeError("after_batch failed on purpose")

    def setup(api):
        api.add_script(DoubleConvIn())
"""


class FakeBuiltin(AlwaysOnScript):
    name, title = FAKE_BUILTIN, "Fake built-in"


def write_extension(folder: Path, source: str) -> None:
    folder.mkdir(parents=True)
    (folder / "extension.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("extensions")
    shutil.copytree(EXAMPLE, folder / "example")
    for name, source in BROKEN.items():
        write_extension(folder / name, source)
    write_extension(folder / "model_change", MODEL_CHANGE)
    return folder


@pytest.fixture(scope="module")
def loaded(engine_factory, plugin_dir):
    """A fresh engine with a fake built-in script, and the extensions of ``plugin_dir`` loaded into it."""
    engine = engine_factory(checkpoint_cache=1)
    engine.scripts.register(FakeBuiltin(), builtin=True)
    with _capture_errors() as records:
        extensions = load_extensions(engine, plugin_dir)
    return engine, extensions, records


class _capture_errors:  # noqa: N801 - used like a function: `with _capture_errors() as records`
    """Collect the ERROR records of the extension loader (caplog is function-scoped; the fixture is not)."""

    def __enter__(self) -> list[logging.LogRecord]:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler(logging.ERROR)
        self.handler.emit = self.records.append
        logging.getLogger("webui.extensions").addHandler(self.handler)
        return self.records

    def __exit__(self, *exc) -> None:
        logging.getLogger("webui.extensions").removeHandler(self.handler)


@pytest.fixture(scope="module")
def client(loaded):
    engine, extensions, _ = loaded
    ctx = AppContext(Flags(nowebui=True, data_dir=str(engine.paths.data_dir)), engine,
                     engine.paths.data_dir / "config.json", extensions)
    with TestClient(create_api_app(ctx)) as test_client:
        yield test_client


def txt2img(client: TestClient, **body) -> dict:
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, **body,
                                                      "override_settings": {"sd_model_checkpoint": SD15}})
    assert response.status_code == 200, response.text
    return response.json()


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


# --- loading ---------------------------------------------------------------------------------------


def test_broken_extensions_are_logged_listed_and_leave_nothing_behind(loaded, client):
    engine, extensions, records = loaded
    errors = {r.name: r.error for r in extensions.records}
    assert errors["example"] is None and errors["model_change"] is None
    assert "SyntaxError" in errors["syntax_error"]
    assert errors["setup_raises"] == "RuntimeError: boom in setup"
    assert f"{FAKE_BUILTIN!r} is built in" in errors["takes_builtin"]
    logged = "\n".join(record.getMessage() for record in records)
    for name in ("syntax_error", "setup_raises", "takes_builtin"):
        assert f"extension {name} failed to load" in logged
    assert "boom in setup" in logged

    # Nothing of a failed extension was registered: scripts, extra networks, routes.
    assert engine.scripts.get("half_registered") is None
    assert type(engine.scripts.get(FAKE_BUILTIN)) is FakeBuiltin
    assert "halfnet" not in engine.extra_networks.names()
    assert "impostornet" not in engine.extra_networks.names()
    assert client.get("/takes-builtin/ping").status_code == 404
    shown = [name for name, _ in extensions.scripts_for("txt2img")]
    assert "example" in shown and "double_conv_in" in shown
    assert "half_registered" not in shown and FAKE_BUILTIN not in shown

    listed = {item["name"]: item for item in client.get("/sdapi/v1/extensions").json()}
    assert "SyntaxError" in listed["syntax_error"]["error"]
    assert listed["setup_raises"]["error"] == "RuntimeError: boom in setup"
    assert listed["example"]["error"] is None and listed["example"]["enabled"] is True


def test_disabled_folder_is_listed_but_never_loaded(loaded, client):
    engine, extensions, _ = loaded
    record = next(r for r in extensions.records if r.name == "skipped")
    assert not record.enabled and record.error is None
    assert engine.scripts.get("skipped") is None
    assert "skipped" not in str(client.get("/sdapi/v1/scripts").json())


def test_scripts_route_lists_the_example(client):
    listed = client.get("/sdapi/v1/scripts").json()
    assert "example" in listed["txt2img"] and "example" in listed["img2img"]


# --- the example's argument through the API ----------------------------------------------------------


def test_example_argument_reaches_the_job(client):
    plain = txt2img(client)
    faded = txt2img(client, alwayson_scripts={"example": {"args": [True, 0.5]}})
    grey = txt2img(client, alwayson_scripts={"example": {"args": [True, 1.0]}})
    off = txt2img(client, alwayson_scripts={"example": {"args": [False, 1.0]}})

    infotext = json.loads(faded["info"])["infotexts"][0]
    assert parse_infotext(infotext)["Example strength"] == 0.5
    assert "Example strength" not in json.loads(off["info"])["infotexts"][0]
    # after_batch blended the images towards grey: half-way at 0.5, flat grey at 1.
    original = decode(plain["images"][0])
    assert np.abs(decode(faded["images"][0]) - (original + 128) / 2).max() <= 1
    assert (decode(grey["images"][0]) == 128).all()
    assert (decode(off["images"][0]) == original).all()


def test_bad_example_argument_is_422_naming_it(client):
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"example": {"args": [True, 2]}}})
    assert response.status_code == 422
    assert "alwayson_scripts.example: strength: must be between 0 and 1, got 2.0" in response.text


# --- one-job model changes ---------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["finish", "fail", "interrupt"])
def test_deferred_model_change_is_undone_however_the_job_ends(loaded, ending):
    engine, _, _ = loaded
    script = engine.scripts.get("double_conv_in")
    request = GenerationRequest(**SMALL, checkpoint=SD15, save_images=False,
                                alwayson_scripts={"double_conv_in": [ending]})
    weight = engine.models.get(SD15).unet.conv_in.weight
    before = weight.detach().clone()
    script.control = JobControl()
    script.seen.clear()
    if ending == "fail":
        with pytest.raises(RuntimeError, match="after_batch failed on purpose"):
            engine.generate(request, control=script.control)
    else:
        result = engine.generate(request, control=script.control)
        assert result.interrupted == (ending == "interrupt")
    # The change was in effect during the job, and is gone after it.
    assert script.seen and script.seen[0] == pytest.approx(2 * float(before.abs().sum()), rel=1e-5)
    assert torch.equal(weight, before)


# --- the UI glue, without a browser --------------------------------------------------------------------


def test_ui_values_become_request_fields_and_infotext_fills_controls():
    import gradio as gr

    from webui.extension_api import ScriptControls
    from webui.ui.extension_ui import ExtensionControls, _Built
    from webui.ui.paste import script_updates

    enabled, strength, units = gr.Checkbox(), gr.Slider(0, 1), gr.Textbox()
    controls = ExtensionControls("txt2img", script=gr.Dropdown(["None", "Replace"]))
    controls.alwayson.append(_Built("example", ScriptControls([enabled, strength], paste=[
        (enabled, lambda params: "Example strength" in params), (strength, "Example strength")])))
    controls.selectable.append(_Built("Replace", ScriptControls([units], to_args=lambda values: [values[0].upper()])))

    assert controls.inputs == [controls.script, enabled, strength, units]
    assert controls.request_fields(["None", True, 0.25, "x"]) == ({"example": [True, 0.25]}, None, [])
    assert controls.request_fields(["Replace", False, 0.5, "x"]) == ({"example": [False, 0.5]}, "Replace", ["X"])

    def broken(params):
        raise KeyError("no such key")

    pasted = script_updates({"Example strength": "0.25"}, [*controls.paste_fields, (units, broken)])
    assert pasted[enabled]["value"] is True and pasted[strength]["value"] == 0.25
    assert units not in pasted  # the failing paste function is skipped, the others still apply
    assert script_updates({}, controls.paste_fields) == {enabled: {"__type__": "update", "value": False}}

    # Paste hooks run in order; a failing one is skipped.
    hooks = LoadedExtensions(paste_hooks=[broken, lambda params: {**params, "Example strength": 1}])
    assert hooks.apply_paste_hooks({"Prompt": "a"}) == {"Prompt": "a", "Example strength": 1}


# --- extensions from plain Python (the README's "Use the engine from Python") ---------------------------

PLAIN_PYTHON_FLOW = """
import json, sys
from PIL import Image, ImageDraw

from pipelines.engine import Engine
from pipelines.request import GenerationRequest
from pipelines.settings import EngineSettings, Paths
from webui.extensions import load_extensions

engine = Engine(EngineSettings(paths=Paths.under(sys.argv[1], models_dir=sys.argv[2]), device="cpu"))
load_extensions(engine, names=["lora", "controlnet"])
edges = Image.new("RGB", (64, 64))
ImageDraw.Draw(edges).rectangle((16, 16, 47, 47), outline=(255, 255, 255), width=3)
common = dict(seed=1, steps=3, width=64, height=64, sampler_name="Euler", save_images=False)
unit = {"module": "none", "model": "tiny-controlnet-sd15", "image": edges}
runs = {
    "plain": GenerationRequest(prompt="a photo of a cat", **common),
    "lora": GenerationRequest(prompt="a photo of a cat <lora:tiny-sd15-lora-kohya:0.8>", **common),
    "both": GenerationRequest(prompt="a photo of a cat <lora:tiny-sd15-lora-kohya:0.8>",
                              alwayson_scripts={"controlnet": [unit]}, **common),
}
out = {}
for key, request in runs.items():
    result = engine.generate(request)
    out[key] = {"pixels": list(result.images[0].convert("RGB").tobytes()), "infotext": result.infotexts[0],
                "warnings": result.warnings}
out["gradio_imported"] = "gradio" in sys.modules
json.dump(out, sys.stdout)
"""


def test_lora_and_controlnet_from_plain_python(tiny_models, tmp_path):
    """``load_extensions(engine, names=[...])`` in a plain Python process (no server, no Gradio) turns on
    LoRA tags and ControlNet units, as the README shows."""
    import subprocess
    import sys

    from tests.fixtures.tiny_controlnets import write_tiny_controlnets
    from tests.fixtures.tiny_loras import write_tiny_loras

    write_tiny_loras(tiny_models / "Lora", "sd1")
    write_tiny_controlnets(tiny_models / "ControlNet")
    done = subprocess.run([sys.executable, "-c", PLAIN_PYTHON_FLOW, str(tmp_path), str(tiny_models)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)
    assert out["gradio_imported"] is False
    plain, lora, both = (np.array(out[key]["pixels"], dtype=np.int16) for key in ("plain", "lora", "both"))
    assert np.abs(lora - plain).mean() > 0.5, "the LoRA changed the image"
    assert np.abs(both - lora).mean() > 0.5, "the ControlNet unit changed the image"
    lora_params, both_params = parse_infotext(out["lora"]["infotext"]), parse_infotext(out["both"]["infotext"])
    assert "tiny-sd15-lora-kohya" in lora_params["Lora hashes"] and "ControlNet 0" not in lora_params
    assert both_params["ControlNet 0"].startswith("Module: none, Model: tiny-controlnet-sd15 [")
    assert "Lora hashes" in both_params
    assert not out["both"]["warnings"], out["both"]["warnings"]


def test_load_extensions_names_filter(engine_factory, tmp_path):
    engine = engine_factory()
    loaded = load_extensions(engine, tmp_path, names=["lora"])
    assert [r.name for r in loaded.records if r.loaded] == ["lora"]
    assert engine.extra_networks.is_builtin("lora") and engine.scripts.get("controlnet") is None
    with pytest.raises(LookupError, match="no extension called nope; found: lora, controlnet"):
        load_extensions(engine_factory(), tmp_path, names=["nope"])
