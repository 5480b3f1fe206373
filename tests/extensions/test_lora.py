"""The built-in LoRA extension on the tiny models: weights, formats, SDXL, no leaks, hashes, aliases, API, paste.

Images are compared with those of a second engine that never loaded an extension ("fresh"): a job without
LoRA must give exactly its pixels, whatever jobs ran before on the LoRA engine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from extensions.lora.library import LoraLibrary, read_header
from extensions.lora.network import LoraNetwork, parse_tag
from extensions.lora.ui import build_panel, card_facts, matching, toggle_tag
from pipelines.images.infotext import parse_infotext
from pipelines.job_control import JobControl, Progress
from pipelines.prompts.parser import ExtraNetworkTag
from pipelines.request import GenerationRequest
from tests.fixtures.tiny_loras import ALIASES, write_tiny_loras
from tests.helpers import SD15, SD21, SDXL, txt2img
from webui.app import create_api_app
from webui.context import AppContext
from webui.extension_api import TabUi
from webui.extensions import load_extensions
from webui.flags import Flags

KOHYA, PEFT = "tiny-sd15-lora-kohya", "tiny-sd15-lora-peft"
XL_KOHYA, XL_PEFT = "tiny-sdxl-lora-kohya", "tiny-sdxl-lora-peft"
PROMPT = "a photo of a cat"


@pytest.fixture(scope="session")
def lora_files(tiny_models) -> dict[str, Path]:
    folder = tiny_models / "Lora"
    return {name: path for family in ("sd1", "sd2", "sdxl") for name, path in write_tiny_loras(folder, family).items()}


@pytest.fixture(scope="module")
def loaded(engine_factory, lora_files, tmp_path_factory):
    engine = engine_factory()
    extensions = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("no_plugins"))
    record = next(r for r in extensions.records if r.name == "lora")
    assert record.loaded, record.error
    return engine, extensions


@pytest.fixture(scope="module")
def lora_engine(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def fresh(engine_factory):
    """An engine with no extension: the reference images."""
    return engine_factory()


def request(prompt: str = PROMPT, checkpoint: str = SD15, **kw) -> GenerationRequest:
    return txt2img(**{"prompt": prompt, "checkpoint": checkpoint, "steps": 2, **kw})


def image(engine, prompt: str = PROMPT, **kw) -> np.ndarray:
    result = engine.generate(request(prompt, **kw))
    return np.asarray(result.images[0], dtype=np.int16)


_made: dict[tuple, np.ndarray] = {}


def lora_image(engine, prompt: str, checkpoint: str = SD15) -> np.ndarray:
    """The image of a job with LoRA tags, made once per module (jobs are deterministic; tests check that)."""
    key = (id(engine), prompt, checkpoint)
    if key not in _made:
        _made[key] = image(engine, prompt, checkpoint=checkpoint)
    return _made[key]


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def base(fresh) -> np.ndarray:
    return image(fresh)


def addnet_hash(path: Path) -> str:
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header:]).hexdigest()[:12]


# --- weights ---------------------------------------------------------------------------------------


def test_weight_zero_is_no_lora(lora_engine, base):
    assert np.array_equal(image(lora_engine, f"{PROMPT} <lora:{KOHYA}:0>"), base)


def test_larger_weight_changes_more_and_negative_works(lora_engine, base):
    half = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:0.5>")
    full = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1>")
    negative = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:-1>")
    assert 1 < diff(half, base) < diff(full, base)
    assert diff(negative, base) > 1 and diff(negative, full) > 1


def test_two_loras_combine(lora_engine, base):
    kohya = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1>")
    peft = lora_image(lora_engine, f"{PROMPT} <lora:{PEFT}:1>")
    both = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1> <lora:{PEFT}:1>")
    assert diff(kohya, base) > 1 and diff(peft, base) > 1  # both formats load and act
    assert diff(both, kohya) > 1 and diff(both, peft) > 1
    # The order of the tags does not matter.
    assert np.array_equal(image(lora_engine, f"<lora:{PEFT}:1> {PROMPT} <lora:{KOHYA}:1>"), both)


def test_text_encoder_and_unet_weights_apart(lora_engine, base):
    full = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1>")
    te_only = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1:0>")
    unet_only = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:0:1>")
    for partial in (te_only, unet_only):
        assert diff(partial, base) > 1 and diff(partial, full) > 1
    assert diff(te_only, unet_only) > 1


def test_tag_parsing():
    def parse(*args: str):
        return parse_tag(ExtraNetworkTag("lora", args))

    assert parse("x") == ("x", 1.0, 1.0)
    assert parse("x", "0.7") == ("x", 0.7, 0.7)
    assert parse("x", "0.2", "-1.5") == ("x", 0.2, -1.5)
    assert parse("x", "unet=0.3") == ("x", 1.0, 0.3)
    with pytest.raises(ValueError, match="'heavy' is not a number"):
        parse("x", "heavy")
    with pytest.raises(ValueError, match="expected <lora:name:weight>"):
        parse("x", "1", "2", "3")


def test_sdxl_lora_on_the_sdxl_model(lora_engine, fresh):
    xl_base = image(fresh, checkpoint=SDXL)
    kohya = lora_image(lora_engine, f"{PROMPT} <lora:{XL_KOHYA}:1>", checkpoint=SDXL)
    peft = lora_image(lora_engine, f"{PROMPT} <lora:{XL_PEFT}:0.8>", checkpoint=SDXL)
    te_only = lora_image(lora_engine, f"{PROMPT} <lora:{XL_KOHYA}:1:0>", checkpoint=SDXL)
    assert diff(kohya, xl_base) > 1 and diff(peft, xl_base) > 1 and diff(te_only, kohya) > 1
    assert diff(te_only, xl_base) > 1  # both text encoders take it
    assert np.array_equal(image(lora_engine, checkpoint=SDXL), xl_base)


def test_sd2_lora_on_the_sd2_model(lora_engine, fresh):
    sd2_base = image(fresh, checkpoint=SD21)
    kohya = lora_image(lora_engine, f"{PROMPT} <lora:tiny-sd21-lora-kohya:1>", checkpoint=SD21)
    peft = lora_image(lora_engine, f"{PROMPT} <lora:tiny-sd21-lora-peft:1>", checkpoint=SD21)
    assert diff(kohya, sd2_base) > 1 and diff(peft, sd2_base) > 1
    assert np.array_equal(image(lora_engine, checkpoint=SD21), sd2_base)


def test_lora_for_another_base_model_is_skipped_with_one_warning(lora_engine, base):
    """As A1111: the job goes on without it, and one line (the LoRA and the model family) says so."""
    result = lora_engine.generate(request(f"{PROMPT} <lora:{XL_KOHYA}:1>"))
    lines = [w for w in result.warnings if XL_KOHYA in w]
    assert len(lines) == 1 and "skipped" in lines[0] and "does not fit the sd1 model" in lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 200
    assert np.array_equal(np.asarray(result.images[0], dtype=np.int16), base)
    # With a LoRA that fits beside it, that one still applies.
    mixed = lora_engine.generate(request(f"{PROMPT} <lora:{XL_KOHYA}:1> <lora:{KOHYA}:1>"))
    assert any(XL_KOHYA in w for w in mixed.warnings)
    alone = lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1>")
    assert np.array_equal(np.asarray(mixed.images[0], dtype=np.int16), alone)
    assert np.array_equal(image(lora_engine), base)


# --- no leaks --------------------------------------------------------------------------------------


def test_no_leak_after_a_job_with_lora(lora_engine, base):
    lora_engine.generate(request(f"{PROMPT} <lora:{KOHYA}:1> <lora:{PEFT}:-0.5>"))
    assert np.array_equal(image(lora_engine), base)
    model = lora_engine.models.get(SD15)
    assert model.pipe.get_list_adapters() == {}
    assert not any("lora" in key for key in model.unet.state_dict())
    assert not any("lora" in key for key in model.pipe.text_encoder.state_dict())


def test_loading_a_lora_draws_no_progress_bar_and_leaves_bars_on(lora_engine, capfd):
    from transformers.utils import logging as transformers_logging

    lora_engine.models.get(SD15)  # loaded beforehand: loading a checkpoint may report its progress
    capfd.readouterr()
    lora_engine.generate(request(f"{PROMPT} <lora:{KOHYA}:1>"))
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()


def test_no_leak_after_an_interrupted_job(lora_engine, base):
    def stop_at_step_two(progress: Progress) -> None:
        if progress.sampling_step >= 2:
            control.interrupt()

    control = JobControl(on_progress=stop_at_step_two)
    result = lora_engine.generate(request(f"{PROMPT} <lora:{KOHYA}:1>", steps=6), control=control)
    assert result.interrupted
    assert np.array_equal(image(lora_engine), base)


def test_unknown_lora_fails_before_sampling_and_leaks_nothing(lora_engine, base):
    steps: list[int] = []
    control = JobControl(on_progress=lambda progress: steps.append(progress.sampling_step))
    with pytest.raises(LookupError) as caught:
        lora_engine.generate(request(f"{PROMPT} <lora:{KOHYA}:1> <lora:no_such_lora:1>"), control=control)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "no LoRA called 'no_such_lora'" in message and KOHYA in message and PEFT in message
    assert steps == []
    assert np.array_equal(image(lora_engine), base)


def test_the_same_lora_is_read_from_disk_once(lora_engine, lora_files):
    library = LoraLibrary(lambda: (lora_files["sd15-kohya"].parent,), lambda p: addnet_hash(p))
    handler = LoraNetwork(library)
    model = lora_engine.models.get(SD15)
    conv = model.unet.down_blocks[0].resnets[0].conv1
    for _ in range(2):
        handler.activate(model, [ExtraNetworkTag("lora", (KOHYA, "1"))])
        # The LoCon part reached the ResNet convolution.
        assert model.unet.down_blocks[0].resnets[0].conv1 is not conv
        handler.deactivate(model)
        assert model.unet.down_blocks[0].resnets[0].conv1 is conv
    assert library.disk_reads == 1


def test_a_half_loaded_lora_is_removed(lora_engine, lora_files, tmp_path):
    weights = safetensors.torch.load_file(str(lora_files["sd15-kohya"]))
    # The UNet part loads, then the text encoder part does not fit (wrong input width).
    key = next(k for k in weights if k.startswith("lora_te_") and k.endswith("lora_down.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 3, dtype=torch.float16)
    safetensors.torch.save_file(weights, str(tmp_path / "broken.safetensors"))
    handler = LoraNetwork(LoraLibrary(lambda: (tmp_path,), addnet_hash))
    model = lora_engine.models.get(SD15)
    handler.activate(model, [ExtraNetworkTag("lora", ("broken", "1"))])
    (line,) = handler.warnings(model)
    assert "broken.safetensors does not fit the sd1 model" in line and "skipped" in line
    handler.deactivate(model)
    assert model.pipe.get_list_adapters() == {}
    for net in (model.unet, model.pipe.text_encoder):
        assert all(type(m).__module__.startswith(("torch", "diffusers", "transformers")) for m in net.modules())


def test_pt_files_are_listed_and_read_without_code(lora_files, tmp_path):
    weights = safetensors.torch.load_file(str(lora_files["sd15-kohya"]))
    torch.save(weights, tmp_path / "old-style.pt")
    library = LoraLibrary(lambda: (tmp_path,), addnet_hash)
    (file,) = library.files()
    assert (file.name, file.alias, file.metadata) == ("old-style", "old-style", {})
    loaded = library.weights(file)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


# --- infotext, aliases, pasting --------------------------------------------------------------------


def test_hashes_in_the_infotext(lora_engine, lora_files):
    result = lora_engine.generate(request(f"{PROMPT} <lora:{KOHYA}:0.6> <lora:{PEFT}:0>"))
    text = result.infotexts[0]
    kohya_hash, peft_hash = addnet_hash(lora_files["sd15-kohya"]), addnet_hash(lora_files["sd15-peft"])
    assert f'Lora hashes: "{KOHYA}: {kohya_hash}, {PEFT}: {peft_hash}"' in text
    parsed = parse_infotext(text)
    assert parsed["Lora hashes"] == f"{KOHYA}: {kohya_hash}, {PEFT}: {peft_hash}"
    assert f"<lora:{KOHYA}:0.6>" in parsed["Prompt"]
    assert "Lora hashes" not in parse_infotext(lora_engine.generate(request()).infotexts[0])


def test_alias_from_ss_output_name(lora_engine, lora_files):
    alias = ALIASES["sd1"]
    assert read_header(lora_files["sd15-kohya"])[0]["ss_output_name"] == alias
    by_alias = lora_engine.generate(request(f"{PROMPT} <lora:{alias}:1>"))
    assert np.array_equal(np.asarray(by_alias.images[0], dtype=np.int16),
                          lora_image(lora_engine, f"{PROMPT} <lora:{KOHYA}:1>"))
    assert f"Lora hashes: \"{alias}: {addnet_hash(lora_files['sd15-kohya'])}\"" in by_alias.infotexts[0]


def test_paste_resolves_a_renamed_lora_by_hash(loaded, lora_files):
    _, extensions = loaded
    kohya_hash = addnet_hash(lora_files["sd15-kohya"])
    params = {"Prompt": f"{PROMPT} <lora:their_name:0.8> <lora:{PEFT}:0.5> <lora:gone:1>",
              "Negative prompt": "<lora:their_name:-1>",
              "Lora hashes": f"their_name: {kohya_hash}, {PEFT}: 000000000000, gone: 111111111111"}
    pasted = extensions.apply_paste_hooks(params)
    assert pasted["Prompt"] == f"{PROMPT} <lora:{KOHYA}:0.8> <lora:{PEFT}:0.5> <lora:gone:1>"
    assert pasted["Negative prompt"] == f"<lora:{KOHYA}:-1>"
    assert extensions.apply_paste_hooks({"Prompt": "<lora:their_name:1>"})["Prompt"] == "<lora:their_name:1>"


def test_browser_panel_builds_cards(lora_files):
    import gradio as gr

    library = LoraLibrary(lambda: (lora_files["sd15-kohya"].parent,), addnet_hash)
    with gr.Blocks():
        prompt, negative = gr.Textbox(), gr.Textbox()
        build_panel(library, TabUi("txt2img", prompt, negative))
    kohya = library.get(KOHYA)
    assert card_facts(kohya) == [f"alias {ALIASES['sd1']}", "SD 1.x", "512 px"]
    assert card_facts(library.get(XL_PEFT)) == ["SDXL"]  # told by its keys (text_encoder_2.*)
    assert [f.name for f in matching(library.files(), "xl PEFT")] == [XL_PEFT]
    assert library.get(ALIASES["sd1"]) == kohya


def test_browser_card_click_toggles_the_tag():
    assert toggle_tag("", "film") == "<lora:film:1>"
    assert toggle_tag("a cat, ", "film") == "a cat, <lora:film:1>"
    assert toggle_tag("a cat <lora:film:0.4> outdoors", "film") == "a cat outdoors"


# --- API -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(loaded):
    engine, extensions = loaded
    ctx = AppContext(Flags(nowebui=True, data_dir=str(engine.paths.data_dir)), engine,
                     engine.paths.data_dir / "config.json", extensions)
    with TestClient(create_api_app(ctx)) as test_client:
        yield test_client


def test_api_lists_and_refreshes_loras(client, lora_files, tmp_path):
    listed = {item["name"]: item for item in client.get("/sdapi/v1/loras").json()}
    kohya = listed[KOHYA]
    assert kohya["alias"] == ALIASES["sd1"] and Path(kohya["path"]) == lora_files["sd15-kohya"]
    assert kohya["metadata"]["ss_base_model_version"] == "sd_v1"
    assert kohya["metadata"]["ss_tag_frequency"] == {"img": {"tiny": 4, "detail": 2}}  # JSON values decoded
    assert listed[PEFT]["alias"] == PEFT

    copy = lora_files["sd15-peft"].with_name("tiny-copied-lora.safetensors")
    shutil.copyfile(lora_files["sd15-peft"], copy)
    try:
        assert "tiny-copied-lora" not in {item["name"] for item in client.get("/sdapi/v1/loras").json()}
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert "tiny-copied-lora" in {item["name"] for item in client.get("/sdapi/v1/loras").json()}
    finally:
        copy.unlink()
        client.post("/sdapi/v1/refresh-loras")


def test_api_generates_with_lora_and_names_an_unknown_one(client):
    body = {"steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": SD15}}
    ok = client.post("/sdapi/v1/txt2img", json={**body, "prompt": f"a cat <lora:{KOHYA}:0.7>"})
    assert ok.status_code == 200, ok.text
    assert "Lora hashes" in json.loads(ok.json()["info"])["infotexts"][0]
    bad = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:missing_one:1>"})
    assert bad.status_code == 422
    assert "no LoRA called 'missing_one'" in bad.text and KOHYA in bad.text
    answer = client.post("/sdapi/v1/txt2img", json={**body, "prompt": f"a cat <lora:{KOHYA}:heavy>"})
    assert answer.status_code == 422 and "weight 'heavy' is not a number" in answer.text, answer.text
    # A LoRA for another base model is skipped (as A1111 does): an image, and one warning line naming both.
    other = client.post("/sdapi/v1/txt2img", json={**body, "prompt": f"a cat <lora:{XL_KOHYA}:1>"})
    assert other.status_code == 200 and len(other.json()["images"]) == 1, other.text
    info = json.loads(other.json()["info"])
    assert [w for w in info["warnings"] if XL_KOHYA in w and "does not fit the sd1 model" in w]
    assert "Lora hashes" not in info["infotexts"][0]


def test_pipe_modules_are_plain_after_jobs(lora_engine):
    model = lora_engine.models.get(SD15)
    for net in (model.unet, model.pipe.text_encoder):
        assert all(type(m).__module__.startswith(("torch", "diffusers", "transformers")) for m in net.modules())
