"""The A1111-compatible API on the real server (uvicorn on loopback) with the tiny models.

Clients: ``webuiapi`` from PyPI, as scripts use it, and plain ``requests`` for the rest.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image

from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from pipelines.request import GenerationRequest
from tests.fixtures.api_helpers import ApiServer, b64_image, b64_png, decode_png, server_fixtures
from tests.fixtures.pictures import half_mask, picture
from tests.helpers import SD15, SD15_DIFFUSERS, SD21, payload

DIFFUSERS = SD15_DIFFUSERS
SMALL = payload()
INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version",
}
TIMEOUT = 120


@pytest.fixture(scope="module")
def api_engine(engine_factory):
    return engine_factory(checkpoint_cache=4)


server, url, client = server_fixtures()


def post(url: str, route: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{url}/{route}", json=body, timeout=TIMEOUT, **kw)


def txt2img(url: str, **body) -> dict:
    response = post(url, "txt2img", {**SMALL, "prompt": "a cat", "seed": 7, **body})
    assert response.status_code == 200, response.text
    return response.json()


# --- generation ----------------------------------------------------------------------------------


def test_webuiapi_txt2img_returns_images_with_infotext_and_full_info(client):
    client.set_options({"sd_model_checkpoint": SD15})
    result = client.txt2img(prompt="a photo of a cat", negative_prompt="blurry", seed=1234, batch_size=2,
                            width=64, height=64, cfg_scale=6.5)
    assert len(result.images) == 2
    assert all(image.size == (64, 64) for image in result.images)
    assert np.asarray(result.images[0]).std() > 1
    info = result.info
    assert INFO_KEYS <= set(info)
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["sd_model_name"] == "tiny-sd15" and info["sampler_name"] == "Euler a"
    assert info["steps"] == 4 and info["cfg_scale"] == 6.5 and info["index_of_first_image"] == 0
    for image, seed, infotext in zip(result.images, info["all_seeds"], info["infotexts"]):
        embedded = image.info["parameters"]
        assert embedded == infotext
        parsed = parse_infotext(embedded)
        assert parsed["Seed"] == seed and parsed["Prompt"] == "a photo of a cat"
        assert parsed["Negative prompt"] == "blurry" and parsed["Size-1"] == 64 and parsed["Sampler"] == "Euler a"
    assert result.parameters["prompt"] == "a photo of a cat" and result.parameters["steps"] == 4


def test_api_image_equals_engine_image_for_the_same_request(url, api_engine):
    answer = txt2img(url, sampler_name="DPM++ 2M", override_settings={"sd_model_checkpoint": SD15}, seed=99)
    direct = api_engine.generate(GenerationRequest(prompt="a cat", seed=99, checkpoint=SD15, save_images=False,
                                                   **SMALL))
    returned = decode_png(answer["images"][0])
    assert np.array_equal(np.asarray(returned.convert("RGB")), np.asarray(direct.images[0]))
    assert read_infotext(returned) == direct.infotexts[0]


def test_webuiapi_img2img_inpaint_keeps_the_unmasked_half(client):
    source = picture()
    result = client.img2img(images=[source], mask_image=half_mask(), prompt="a red ball", seed=3,
                            denoising_strength=0.9, inpainting_fill=1, inpaint_full_res=False, mask_blur=0,
                            width=64, height=64, override_settings={"sd_model_checkpoint": SD15})
    assert len(result.images) == 1
    out = np.asarray(result.images[0].convert("RGB"), dtype=np.int16)
    original = np.asarray(source, dtype=np.int16)
    assert np.abs(out[:, 40:] - original[:, 40:]).max() <= 2  # kept (black) half
    assert np.abs(out[:, :24] - original[:, :24]).mean() > 5  # redrawn (white) half
    parsed = parse_infotext(result.images[0].info["parameters"])
    assert parsed["Denoising strength"] == 0.9 and parsed["Mask blur"] == 0 and parsed["Seed"] == 3
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images


@pytest.mark.parametrize("fmt, prefix", [("PNG", True), ("JPEG", False), ("JPEG", True), ("WEBP", False)])
def test_img2img_accepts_png_jpeg_webp_with_or_without_data_prefix(url, fmt, prefix):
    body = {**SMALL, "init_images": [b64_image(picture((96, 80)), fmt, prefix)], "denoising_strength": 0.5,
            "resize_mode": 1, "seed": 11, "include_init_images": True}
    response = post(url, "img2img", body)
    assert response.status_code == 200, response.text
    image = decode_png(response.json()["images"][0])
    assert image.size == (64, 64)
    assert response.json()["parameters"]["init_images"] == body["init_images"]
    assert parse_infotext(read_infotext(image))["Resize mode"] == "Crop and resize"


def test_legacy_fields_nulls_and_unknown_fields_are_accepted(url):
    body = {
        "prompt": None, "negative_prompt": None, "styles": None, "sampler_name": None, "sampler_index": "Euler",
        "scheduler": "karras", "seed": None, "eta": 0.67, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
        "s_min_uncond": 0, "firstphase_width": 0, "firstphase_height": 0, "comments": {}, "refiner_checkpoint": None,
        "refiner_switch_at": None, "restore_faces": False, "denoising_strength": 0.7, "script_args": [],
        "alwayson_scripts": {}, "override_settings_restore_afterwards": True, "hr_upscaler": "Latent",
        "do_not_save_samples": True, "not_a_field_anyone_knows": [1, 2, 3], **SMALL,
    }
    answer = post(url, "txt2img", body)
    assert answer.status_code == 200, answer.text
    parsed = parse_infotext(read_infotext(decode_png(answer.json()["images"][0])))
    assert parsed["Sampler"] == "Euler" and parsed["Schedule type"] == "Karras" and parsed["Prompt"] == ""


def test_old_style_sampler_name_with_schedule(url):
    info = json.loads(txt2img(url, sampler_name="DPM++ 2M Karras")["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"


def test_save_images_writes_outputs_and_send_images_false_returns_none(url, api_engine):
    folder = api_engine.paths.outputs_dir / "txt2img-images"
    before = set(folder.rglob("*.png")) if folder.exists() else set()
    answer = txt2img(url, save_images=True, send_images=False, seed=4242, batch_size=2)
    assert answer["images"] == []
    new = sorted(set(folder.rglob("*.png")) - before)
    assert [p.name.split("-", 1)[1] for p in new] == ["4242.png", "4243.png"]
    assert parse_infotext(read_infotext(new[0]))["Seed"] == 4242
    nothing_saved = txt2img(url, seed=5151)
    assert not list(folder.rglob("*-5151.png")) and len(nothing_saved["images"]) == 1


def test_saved_batch_returns_the_grid_first(url):
    answer = txt2img(url, save_images=True, batch_size=2, seed=6060)
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 3 and info["index_of_first_image"] == 1
    assert decode_png(answer["images"][0]).size == (128, 64)


# --- options, models, override_settings ----------------------------------------------------------


def test_set_model_by_title_file_name_name_and_hash(client, url, api_engine):
    models = client.get_sd_models()
    by_name = {m["model_name"]: m for m in models}
    assert {"tiny-sd15", "tiny-sd21-v", "tiny-sdxl", "tiny-sd15-inpainting", DIFFUSERS} <= set(by_name)
    assert set(models[0]) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    sd21 = by_name["tiny-sd21-v"]
    for query in (sd21["title"], SD21, "tiny-sd21-v", sd21["hash"], sd21["sha256"]):
        client.set_options({"sd_model_checkpoint": SD15})
        client.set_options({"sd_model_checkpoint": query})
        assert client.get_options()["sd_model_checkpoint"] == sd21["title"]
        assert api_engine.models.current.file.title == sd21["title"]  # switched, not only recorded
    assert json.loads(txt2img(url)["info"])["sd_model_name"] == "tiny-sd21-v"
    client.util_set_model("tiny-sd15.safetensors")
    assert client.util_get_current_model() == by_name["tiny-sd15"]["title"]


def test_options_round_trip_and_persist(client, server):
    options = client.get_options()
    assert {"samples_format", "show_progress_every_n_steps", "sd_model_checkpoint", "sd_vae",
            "CLIP_stop_at_last_layers"} <= set(options)
    client.set_options({**options, "samples_format": "webp", "CLIP_stop_at_last_layers": 2, "sd_vae": "tiny-vae"})
    try:
        changed = client.get_options()
        assert changed["samples_format"] == "webp" and changed["CLIP_stop_at_last_layers"] == 2
        assert changed["sd_vae"] == "tiny-vae.safetensors"
        saved = json.loads((server.ctx.options_path).read_text())
        assert saved["samples_format"] == "webp"
    finally:
        client.set_options({"samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"})


@pytest.mark.parametrize("changes, field", [
    ({"sd_model_checkpoint": "missing-model"}, "sd_model_checkpoint"),
    ({"show_progress_every_n_steps": 1000}, "show_progress_every_n_steps"),
    ({"CLIP_stop_at_last_layers": 40}, "CLIP_stop_at_last_layers"),
    ({"sd_vae": "nope.safetensors"}, "sd_vae"),
])
def test_bad_options_are_refused_and_nothing_changes(url, changes, field):
    before = requests.get(f"{url}/options", timeout=TIMEOUT).json()
    response = post(url, "options", {"samples_format": "jpg", **changes})
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])
    assert requests.get(f"{url}/options", timeout=TIMEOUT).json() == before


def test_concurrent_override_settings_stay_with_their_request(url, api_engine, monkeypatch, client):
    client.set_options({"sd_model_checkpoint": SD15})
    running, most = 0, 0
    lock = threading.Lock()
    generate = api_engine.generate

    def counting_generate(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(api_engine, "generate", counting_generate)
    models = [SD15, SD21, DIFFUSERS]

    def one(k: int) -> tuple[int, dict, list[str]]:
        override = {"sd_model_checkpoint": models[k % 3], "CLIP_stop_at_last_layers": 1 + k % 4,
                    "samples_format": "jpg"}
        answer = txt2img(url, seed=100 + k, override_settings=override)
        return k, json.loads(answer["info"]), answer["images"]

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert most == 1
    for k, info, images in results:
        assert info["seed"] == 100 + k and info["clip_skip"] == 1 + k % 4
        assert info["sd_model_name"] == models[k % 3].removesuffix(".safetensors")
        # API images follow the samples_format option, as A1111's: the override makes them JPEGs.
        raw = base64.b64decode(images[0], validate=True)
        assert Image.open(io.BytesIO(raw)).format == "JPEG"
        parsed = parse_infotext(read_infotext(raw))
        assert parsed["Clip skip"] == 1 + k % 4 and parsed["Seed"] == 100 + k
    # Nothing leaked: the selected model and the options are what they were.
    options = requests.get(f"{url}/options", timeout=TIMEOUT).json()
    assert options["sd_model_checkpoint"].startswith(SD15)
    assert options["samples_format"] == "png" and options["CLIP_stop_at_last_layers"] == 1
    plain = json.loads(txt2img(url)["info"])
    assert plain["sd_model_name"] == "tiny-sd15" and plain["clip_skip"] == 1


def test_override_vae_applies_to_one_request(url):
    info = json.loads(txt2img(url, override_settings={"sd_vae": "tiny-vae.safetensors"})["info"])
    assert info["sd_vae_name"] == "tiny-vae" and info["sd_vae_hash"]
    assert json.loads(txt2img(url)["info"])["sd_vae_name"] is None


def test_settings_we_do_not_have_are_ignored_with_a_warning(url):
    answer = txt2img(url, override_settings={"no_such_setting": 31337, "sd_vae_decode_method": "TAESD",
                                             "CLIP_stop_at_last_layers": 2})
    info = json.loads(answer["info"])
    assert info["clip_skip"] == 2 and len(answer["images"]) == 1
    assert any("no_such_setting" in warning and "sd_vae_decode_method" in warning for warning in info["warnings"])


def test_refresh_unload_and_reload_checkpoint(url, api_engine, client):
    client.set_options({"sd_model_checkpoint": SD21})
    assert post(url, "refresh-checkpoints", {}).json() == {}
    assert post(url, "unload-checkpoint", {}).json() == {}
    assert api_engine.models.current is None
    assert json.loads(txt2img(url)["info"])["sd_model_name"] == "tiny-sd21-v"  # the selection loads again
    assert post(url, "reload-checkpoint", {}).json() == {}
    assert api_engine.models.current.file.name == SD21
    client.set_options({"sd_model_checkpoint": SD15})


# --- progress, interrupt, skip -------------------------------------------------------------------


def test_progress_shows_live_preview_and_interrupt_stops_the_job(url, client):
    answers: list[requests.Response] = []
    body = {"prompt": "a cat", "steps": 150, "width": 64, "height": 64, "n_iter": 20, "seed": 1,
            "override_settings": {"show_progress_every_n_steps": 1}}
    worker = threading.Thread(target=lambda: answers.append(post(url, "txt2img", body)))
    worker.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = client.get_progress()
        if progress["current_image"] and progress["state"]["sampling_step"] >= 2:
            seen = progress
            break
        time.sleep(0.02)
    assert seen is not None, "no progress with a preview was reported"
    assert 0 < seen["progress"] < 1 and seen["state"]["job_count"] == 20 and seen["state"]["sampling_steps"] == 150
    assert decode_png(seen["current_image"]).size[0] > 0
    light = requests.get(f"{url}/progress", params={"skip_current_image": "true"}, timeout=TIMEOUT).json()
    assert light["current_image"] is None
    assert requests.post(f"{url}/skip", timeout=TIMEOUT).json() == {}
    assert client.interrupt() == {}
    worker.join(timeout=60)
    assert answers and answers[0].status_code == 200
    info = json.loads(answers[0].json()["info"])
    assert info["interrupted"] and len(info["all_seeds"]) < 20
    idle = client.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


# --- info routes ---------------------------------------------------------------------------------


def test_png_info_reads_back_the_infotext(client, url):
    image = client.txt2img(prompt="a lighthouse", seed=777, width=64, height=64).image
    result = client.png_info(image)
    assert result.info == image.info["parameters"]
    # A1111's parser leaves the values as text
    assert result.parameters["Seed"] == "777" and result.parameters["Prompt"] == "a lighthouse"
    empty = post(url, "png-info", {"image": b64_png(picture())}).json()
    assert empty["info"] == "" and empty["items"] == {}
    assert empty["parameters"]["Prompt"] == "" and empty["parameters"]["Clip skip"] == "1"


def test_unknown_scheduler_runs_the_default_with_a_warning_not_422(url):
    # A1111 runs an unknown schedule name with the sampler's default; typed clients send names we must take.
    response = post(url, "txt2img", {**SMALL, "sampler_name": "DDIM", "scheduler": "Karas"})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["scheduler"] == "Automatic"
    assert any("unknown schedule type 'Karas'" in w for w in info["warnings"])
    named = json.loads(post(url, "txt2img", {**SMALL, "sampler_name": "k_dpm_fast",
                                             "scheduler": "align_your_steps"}).json()["info"])
    assert "Sampler: DPM fast, Schedule type: Align Your Steps" in named["infotexts"][0]


def test_lists(url, api_engine):
    (api_engine.paths.data_dir / "styles.csv").write_text('name,prompt,negative_prompt\nfilm,"{prompt}, grain",ugly\n')
    get = lambda route: requests.get(f"{url}/{route}", timeout=TIMEOUT)  # noqa: E731
    samplers = get("samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert "k_euler_a" in next(s for s in samplers if s["name"] == "Euler a")["aliases"]
    schedulers = get("schedulers").json()
    assert [s["name"] for s in schedulers] == [
        "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
        "align_your_steps", "simple", "normal", "ddim", "beta"]
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
    karras = next(s for s in schedulers if s["name"] == "karras")
    assert karras["label"] == "Karras" and karras["default_rho"] == 7.0
    assert next(s for s in schedulers if s["name"] == "sgm_uniform")["aliases"] == ["SGMUniform"]
    assert {"DPM fast", "DPM adaptive", "Restart", "DDIM CFG++", "DPM++ 2S a", "DPM++ 2M SDE Heun"} <= {
        s["name"] for s in samplers}
    assert next(s for s in samplers if s["name"] == "DPM adaptive")["aliases"] == ["k_dpm_ad"]
    assert "Latent (nearest-exact)" in [m["name"] for m in get("latent-upscale-modes").json()]
    assert get("sd-vae").json()[0]["model_name"] == "tiny-vae"
    assert get("prompt-styles").json() == [{"name": "film", "prompt": "{prompt}, grain", "negative_prompt": "ugly"}]
    assert get("embeddings").json() == {"loaded": {}, "skipped": {}}
    assert set(get("scripts").json()) == {"txt2img", "img2img"}
    for route in ("realesrgan-models", "hypernetworks"):
        assert get(route).json() == []
    # The face restorers are listed with the folder their model goes in, not ready without their files.
    restorers = get("face-restorers").json()
    assert [(r["name"], Path(r["cmd_dir"]).name, r["model_path"], r["ready"]) for r in restorers] == [
        ("CodeFormer", "Codeformer", None, False), ("GFPGAN", "GFPGAN", None, False)]
    memory = get("memory").json()
    assert memory["ram"]["total"] > 0
    assert get("cmd-flags").json()["nowebui"] is True
    info = json.loads(txt2img(url, styles=["film"])["info"])
    assert info["prompt"] == "a cat, grain" and info["styles"] == ["film"]


# --- errors --------------------------------------------------------------------------------------


def test_hires_fix_through_the_api(client):
    result = client.txt2img(prompt="a cat", seed=5, steps=2, width=64, height=64, enable_hr=True, hr_scale=2,
                            hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6,
                            sampler_name="Euler")
    assert result.image.size == (128, 128)
    infotext = result.info["infotexts"][0]
    assert "Hires upscale: 2" in infotext and "Hires upscaler: Latent" in infotext
    assert "Denoising strength: 0.6" in infotext


@pytest.mark.parametrize("route, body, field, words", [
    ("txt2img", {"width": 100000}, "width", "between 64 and 4096"),
    ("txt2img", {"width": 100}, "width", "multiple of 8"),
    ("txt2img", {"steps": 0}, "steps", "between 1 and 150"),
    ("txt2img", {"prompt": "x" * 1_000_000}, "prompt", "at most 20000"),
    ("txt2img", {"sampler_name": "Euler z"}, "sampler_name", "Euler a"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 99}}, "CLIP_stop_at_last_layers", "1 and 12"),
    ("txt2img", {"override_settings": {"samples_format": "bmp"}}, "samples_format", "png"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "Magic"}, "hr_upscaler", "no upscaler named 'Magic'"),
    ("txt2img", {"enable_hr": True, "hr_checkpoint_name": "x"}, "hr_checkpoint_name", "no model matches 'x'"),
    ("txt2img", {"enable_hr": True, "hr_scale": 100}, "hr_scale", "8"),
    ("txt2img", {"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts", "controlnet"),
    ("img2img", {"init_images": ["bm90IGFuIGltYWdl"]}, "init_images", "not an image"),
    ("img2img", {"init_images": ["%%%"]}, "init_images", "base64"),
    ("img2img", {"init_images": []}, "init_images", "at least 1"),
    ("img2img", {"init_images": [b64_png(picture())], "mask": "bm9wZQ=="}, "mask", "not an image"),
    ("png-info", {"image": "bm90IGFuIGltYWdl"}, "image", "not an image"),
    ("txt2img", {"refiner_checkpoint": "sdxl_refiner"}, "refiner_checkpoint", "no model matches 'sdxl_refiner'"),
    ("img2img", {"init_images": [b64_png(picture())], "refiner_checkpoint": "x"}, "refiner_checkpoint",
     "no model matches 'x'"),
    ("txt2img", {"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0}, "refiner_switch_at", "0.01"),
    # what A1111 has and we do not is refused, not silently dropped
    ("txt2img", {"restore_faces": True}, "restore_faces", "put codeformer-v0.1.0.pth (or another CodeFormer"),
    ("extra-single-image", {"image": b64_png(picture()), "gfpgan_visibility": 0.5}, "gfpgan_visibility",
     "put GFPGANv1.4.pth"),
    ("extra-single-image", {"image": b64_png(picture()), "codeformer_visibility": 1}, "codeformer_visibility",
     "in models/Codeformer/"),
])
def test_bad_input_is_422_naming_the_field(url, route, body, field, words):
    response = post(url, route, {**SMALL, **body})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(field in item["loc"] and words in item["msg"] for item in detail), detail
    assert len(response.text) < 5000  # the bad value is not echoed whole


def test_nan_cfg_and_broken_json_are_422(url):
    headers = {"Content-Type": "application/json"}
    nan = requests.post(f"{url}/txt2img", data='{"cfg_scale": NaN, "steps": 4}', headers=headers, timeout=TIMEOUT)
    assert nan.status_code == 422 and "cfg_scale must be a finite number between 1.0 and 30.0" in nan.text
    broken = requests.post(f"{url}/txt2img", data='{"prompt": ', headers=headers, timeout=TIMEOUT)
    assert broken.status_code == 422


def test_wrong_method_is_405(url):
    assert requests.get(f"{url}/txt2img", timeout=TIMEOUT).status_code == 405
    assert requests.get(f"{url}/interrupt", timeout=TIMEOUT).status_code == 405
    assert requests.post(f"{url}/progress", timeout=TIMEOUT).status_code == 405


def test_out_of_memory_is_a_clear_error_and_the_next_request_works(url, api_engine, monkeypatch):
    get = api_engine.models.get
    calls = []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return get(*args, **kwargs)

    monkeypatch.setattr(api_engine.models, "get", out_of_memory_once)
    failed = post(url, "txt2img", {**SMALL, "prompt": "a cat"})
    assert failed.status_code == 500
    assert failed.json()["error"] == "OutOfMemoryError" and "Out of memory" in failed.json()["detail"]
    assert len(txt2img(url)["images"]) == 1


# --- auth ----------------------------------------------------------------------------------------


def test_api_auth_guards_every_route(api_engine, tmp_path):
    server = ApiServer(api_engine, tmp_path, api_auth="alice:s3cret,bob:pa:ss").start()
    try:
        for path in ("/openapi.json", "/docs"):  # the schema and the docs are guarded too
            assert requests.get(server.url + path, timeout=TIMEOUT).status_code == 401, path
        schema = requests.get(f"{server.url}/openapi.json", auth=("alice", "s3cret"), timeout=TIMEOUT).json()
        routes = [(method, path) for path, item in schema["paths"].items() for method in item]
        assert len(routes) >= 30
        for method, path in routes:
            bare = requests.request(method, server.url + path, timeout=TIMEOUT)
            assert bare.status_code == 401, (method, path)
            assert bare.headers["WWW-Authenticate"] == "Basic"
            wrong = requests.request(method, server.url + path, auth=("alice", "s3cre"), timeout=TIMEOUT)
            assert wrong.status_code == 401, (method, path)
        client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="bob", password="pa:ss")
        assert client.get_sd_models()
        flags = requests.get(f"{server.url}/sdapi/v1/cmd-flags", auth=("alice", "s3cret"), timeout=TIMEOUT)
        assert flags.status_code == 200 and flags.json()["api_auth"] == "***" and "s3cret" not in flags.text
    finally:
        server.stop()


def test_openapi_docs_describe_fields_from_the_engine(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()
    body = schema["components"]["schemas"]["StableDiffusionTxt2ImgProcessingAPI"]["properties"]
    steps = body["steps"]
    assert steps["default"] == 50 and steps["description"] == GenerationRequest.model_fields["steps"].description
    assert any(option.get("maximum") == 150 for option in steps.get("anyOf", [steps]))
    # Every route is filed under a heading in /docs.
    untagged = [path for path, item in schema["paths"].items() for operation in item.values() if not operation["tags"]]
    assert not untagged
    docs = requests.get(f"{server.url}/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "cdn" not in docs.text  # works offline: Swagger UI is served from here
    assets = re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', docs.text)
    assert sorted(Path(a).suffix for a in assets) == [".css", ".js", ".png"]
    for asset in assets:
        answer = requests.get(server.url + asset, timeout=TIMEOUT)
        assert answer.status_code == 200 and len(answer.content) > 500, asset
    for outside in ("index.html", "..%2F__init__.py", "swagger-ui-bundle.js.map"):
        assert requests.get(f"{server.url}/docs-assets/{outside}", timeout=TIMEOUT).status_code == 404, outside


# --- extras --------------------------------------------------------------------------------------

ESRGAN = "tiny-esrgan-4x"


def extras(url: str, **body) -> requests.Response:
    return post(url, "extra-single-image", {"image": b64_png(picture((32, 24))), **body})


def test_upscalers_list_has_builtins_and_the_model_files(url, tiny_models):
    upscalers = requests.get(f"{url}/upscalers", timeout=TIMEOUT).json()
    assert [u["name"] for u in upscalers[:3]] == ["None", "Lanczos", "Nearest"]
    assert upscalers[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    model = next(u for u in upscalers if u["name"] == ESRGAN)
    assert model["model_path"] == str(tiny_models / "ESRGAN" / "tiny-esrgan-4x.pth")
    assert model["scale"] == 4 and model["model_name"] == ESRGAN


def test_extra_single_image_scales_by_and_to_size(url):
    source = picture((32, 24))
    scaled = extras(url, upscaler_1=ESRGAN, upscaling_resize=2)
    assert scaled.status_code == 200, scaled.text
    image = decode_png(scaled.json()["image"])
    assert image.size == (64, 48)
    # The x4 model's output brought down to x2 differs from a plain Lanczos resize of the source.
    lanczos = np.asarray(source.resize((64, 48), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(image.convert("RGB"), dtype=np.float32) - lanczos).mean() > 1
    assert "Postprocess upscaler: tiny-esrgan-4x" in scaled.json()["html_info"]
    cropped = extras(url, upscaler_1=ESRGAN, resize_mode=1, upscaling_resize_w=40, upscaling_resize_h=40,
                     upscaling_crop=True)
    assert cropped.status_code == 200, cropped.text
    assert decode_png(cropped.json()["image"]).size == (40, 40)


def test_extra_single_image_blends_upscaler_2(url):
    def run(**body) -> np.ndarray:
        response = extras(url, upscaler_1="Nearest", upscaling_resize=2, **body)
        assert response.status_code == 200, response.text
        return np.asarray(decode_png(response.json()["image"]).convert("RGB"), dtype=np.float32)

    nearest, lanczos = run(), run(upscaler_2="Lanczos", extras_upscaler_2_visibility=1)
    half = run(upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    assert np.abs(nearest - lanczos).mean() > 1
    assert np.abs(half - (nearest + lanczos) / 2).max() <= 1


def test_extra_single_image_keeps_the_source_infotext(url, tmp_path):
    source = txt2img(url, prompt="a lighthouse", seed=321)["images"][0]
    response = post(url, "extra-single-image", {"image": source, "upscaler_1": "Lanczos", "upscaling_resize": 1.5})
    assert response.status_code == 200, response.text
    info = decode_png(response.json()["image"]).info["parameters"]
    assert info.startswith(decode_png(source).info["parameters"])
    parsed = parse_infotext(info)
    assert parsed["Seed"] == 321 and parsed["Prompt"] == "a lighthouse"
    assert parsed["Postprocess upscale by"] == 1.5 and parsed["Postprocess upscaler"] == "Lanczos"


def test_extra_batch_images_are_not_saved(url, server):
    # As in A1111, the API's extras are only in the answer, even with samples_save on (the Extras tab's).
    outputs = server.ctx.engine.paths.outputs_dir / "extras-images"
    before = len(list(outputs.rglob("*.png")))
    server.ctx.update_options({"samples_save": True})
    try:
        body = {"imageList": [{"data": b64_png(picture((16, 16))), "name": "a.png"},
                              {"data": b64_png(picture((20, 12)), prefix=True), "name": "b.png"}],
                "upscaler_1": ESRGAN, "upscaling_resize": 4}
        response = post(url, "extra-batch-images", body)
    finally:
        server.ctx.update_options({"samples_save": False})
    assert response.status_code == 200, response.text
    assert [decode_png(image).size for image in response.json()["images"]] == [(64, 64), (80, 48)]
    assert len(list(outputs.rglob("*.png"))) == before


def test_extras_refuses_unknown_upscalers_and_bad_images(url):
    unknown = extras(url, upscaler_1="SwinIR 4x")
    assert unknown.status_code == 422
    message = unknown.json()["detail"][0]["msg"]
    assert "SwinIR 4x" in message and ESRGAN in message and "Lanczos" in message
    assert unknown.json()["detail"][0]["loc"] == ["body", "upscaler_1"]
    bad = post(url, "extra-single-image", {"image": "bm90IGFuIGltYWdl", "upscaler_1": "Lanczos"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image"]
    assert extras(url, upscaling_resize=0).status_code == 422


# --- upscaler tiling, extras output folder, unreadable upscaler files -----------------------------


def test_extras_use_the_tiling_options_and_never_save(url, server, tmp_path):
    # The output folder option itself is checked on the engine (tests/engine/test_engine_extras.py).
    calls: list[tuple[int, int]] = []
    hook = server.ctx.upscalers.load(ESRGAN).model.register_forward_hook(
        lambda _module, args, _out: calls.append(tuple(args[0].shape[-2:])))
    folder = server.ctx.engine.paths.data_dir / tmp_path.name / "my-extras"  # output folders lie in the data dir
    try:
        whole = extras(url, upscaler_1=ESRGAN, upscaling_resize=2)
        assert whole.status_code == 200, whole.text
        assert calls == [(24, 32)]  # the default 192 px tile holds the 32x24 source
        calls.clear()
        server.ctx.update_options({"upscaler_tile": 16, "upscaler_tile_overlap": 4, "samples_save": True,
                                   "outdir_extras_samples": str(folder)})
        tiled = extras(url, upscaler_1=ESRGAN, upscaling_resize=2)
    finally:
        hook.remove()
        server.ctx.update_options({"upscaler_tile": 192, "upscaler_tile_overlap": 32, "samples_save": False,
                                   "outdir_extras_samples": ""})
    assert tiled.status_code == 200, tiled.text
    assert len(calls) == 6 and set(calls) == {(16, 16)}  # 3 x 2 tiles of 16 px overlapping by at least 4
    image = decode_png(tiled.json()["image"])
    assert image.size == (64, 48)
    assert "Postprocess upscaler: tiny-esrgan-4x" in image.info["parameters"]
    assert not folder.exists() or not list(folder.glob("*.png"))


def test_upscaler_lists_survive_unreadable_model_files(url, tiny_models):
    junk = [tiny_models / "ESRGAN" / "junk.pth", tiny_models / "RealESRGAN" / "RealESRGAN_x4plus.pth"]
    made = not junk[1].parent.exists()
    for path in junk:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"a truncated download")
    try:
        upscalers = requests.get(f"{url}/upscalers", timeout=TIMEOUT)
        realesrgan = requests.get(f"{url}/realesrgan-models", timeout=TIMEOUT)
    finally:
        for path in junk:
            path.unlink()
        if made:
            junk[1].parent.rmdir()
    assert upscalers.status_code == 200, upscalers.text
    scales = {item["name"]: item["scale"] for item in upscalers.json()}
    # As in A1111, every listed upscaler has a scale: the unusable files are left out (and logged).
    assert scales[ESRGAN] == 4 and "junk" not in scales and "R-ESRGAN 4x+" not in scales
    assert realesrgan.status_code == 200, realesrgan.text
    assert realesrgan.json() == [{"name": "R-ESRGAN 4x+", "path": str(junk[1]), "scale": None}]
    assert "junk" not in [item["name"] for item in requests.get(f"{url}/upscalers", timeout=TIMEOUT).json()]


# --- options kept across restarts, skip, CORS, warnings ---------------------------------------------


def test_unknown_options_are_ignored_with_a_warning(url, caplog):
    response = post(url, "options", {"samples_format": "jpg", "no_such_option": 1, "sd_vae_decode_method": "TAESD"})
    try:
        assert response.status_code == 200, response.text
        options = requests.get(f"{url}/options", timeout=TIMEOUT).json()
        assert options["samples_format"] == "jpg" and "no_such_option" not in options
        assert any("no_such_option, sd_vae_decode_method" in record.getMessage() and record.levelname == "WARNING"
                   for record in caplog.records)
    finally:
        post(url, "options", {"samples_format": "png"})


def test_selection_survives_a_restart_and_a_missing_one_falls_back(engine_factory, tiny_models, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from webui.app import create_api_app
    from webui.context import AppContext
    from webui.flags import parse_flags

    first = ApiServer(engine_factory(), tmp_path).start()
    try:
        response = post(first.url + "/sdapi/v1", "options",
                        {"sd_model_checkpoint": SD21, "sd_vae": "tiny-vae", "CLIP_stop_at_last_layers": 3})
        assert response.status_code == 200, response.text
    finally:
        first.stop()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sd_model_checkpoint"].startswith(SD21 + " [") and saved["sd_vae"] == "tiny-vae.safetensors"

    def restart() -> AppContext:
        flags = parse_flags(["--data-dir", str(tmp_path), "--models-dir", str(tiny_models), "--use-cpu", "all",
                             "--nowebui", "--disable-all-extensions"], environ={})
        return AppContext.create(flags)

    ctx = restart()
    assert ctx.engine.models.current is None  # nothing loaded yet; the saved one is what loads first
    assert ctx.engine.models.resolve(None).name == SD21
    with TestClient(create_api_app(ctx)) as client:
        options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == saved["sd_model_checkpoint"]
    assert options["sd_vae"] == "tiny-vae.safetensors" and options["CLIP_stop_at_last_layers"] == 3

    (tmp_path / "config.json").write_text(json.dumps({**saved, "sd_model_checkpoint": "gone.safetensors [0123abcd]",
                                                      "sd_vae": "gone-vae.safetensors"}))
    ctx = restart()
    assert "gone.safetensors" in caplog.text and "gone-vae.safetensors" in caplog.text
    assert ctx.engine.models.resolve(None).title == ctx.engine.registry.checkpoints[0].title
    assert ctx.options.sd_vae == "Automatic" and ctx.options.CLIP_stop_at_last_layers == 3


def test_progress_reports_skipped_until_the_next_batch(url, server):
    from pipelines.job_control import BatchSkipped

    release, seen = threading.Event(), {}

    def job(control) -> None:
        control.start(2, 10)
        release.wait(30)
        try:
            control.check()
        except BatchSkipped:
            seen["raised"] = True
        seen["after_check"] = control.skipped
        control.update(job_no=1, step=0)
        seen["next_batch"] = control.skipped

    holder = threading.Thread(target=server.ctx.queue.run, args=(job,), kwargs={"source": "api"})
    holder.start()
    try:
        while server.ctx.queue.running is None:
            time.sleep(0.01)
        assert requests.get(f"{url}/progress", timeout=TIMEOUT).json()["state"]["skipped"] is False
        assert post(url, "skip", {}).json() == {}
        assert requests.get(f"{url}/progress", timeout=TIMEOUT).json()["state"]["skipped"] is True
    finally:
        release.set()
        holder.join()
    assert seen == {"raised": True, "after_check": True, "next_batch": False}


def test_skip_drops_the_running_batch_and_the_job_goes_on(url, client):
    answers: list[requests.Response] = []
    body = {"prompt": "a cat", "steps": 100, "width": 64, "height": 64, "n_iter": 2, "seed": 50}
    worker = threading.Thread(target=lambda: answers.append(post(url, "txt2img", body)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = client.get_progress()["state"]
        if state["job_no"] == 0 and state["sampling_step"] >= 2:
            break
        time.sleep(0.01)
    assert post(url, "skip", {}).json() == {}
    worker.join(timeout=120)
    assert answers and answers[0].status_code == 200, answers
    info = json.loads(answers[0].json()["info"])
    # The first batch (seed 50) was stopped mid-way and kept (decoded from its latents, as A1111 does); the
    # second one ran to the end.
    assert info["all_seeds"] == [50, 51] and not info["interrupted"] and len(answers[0].json()["images"]) == 2


def test_cfg_nan_as_text_names_the_range_not_a_length(url):
    response = post(url, "txt2img", {**SMALL, "cfg_scale": "NaN"})
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert message == "cfg_scale must be a finite number between 1.0 and 30.0, got 'NaN'", message


def test_cors_allows_only_the_listed_origins(api_engine, tmp_path):
    from fastapi.testclient import TestClient

    from webui.app import create_api_app
    from webui.context import AppContext
    from webui.flags import Flags

    def app(**flags):
        return create_api_app(AppContext(Flags(nowebui=True, **flags), api_engine, tmp_path / "config.json"))

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with TestClient(app(cors_allow_origins="https://allowed.example, https://other.example",
                        cors_allow_origins_regex=r"https://.*\.trusted\.example")) as client:
        for origin, allowed in (("https://allowed.example", True), ("https://other.example", True),
                                ("https://ui.trusted.example", True), ("https://evil.example", False)):
            answer = client.options("/sdapi/v1/txt2img", headers={"Origin": origin, **preflight})
            assert (answer.headers.get("access-control-allow-origin") == origin) is allowed, (origin, answer.headers)
        simple = client.get("/sdapi/v1/samplers", headers={"Origin": "https://allowed.example"})
        assert simple.headers["access-control-allow-origin"] == "https://allowed.example"
    with TestClient(app()) as client:  # without the flag no other site is allowed
        answer = client.options("/sdapi/v1/txt2img", headers={"Origin": "https://allowed.example", **preflight})
        assert "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("flags, api_warning", [
    ({"share": True, "api": True}, True),
    ({"listen": True, "nowebui": True}, True),
    ({"share": True, "api": True, "api_auth": "a:b", "gradio_auth": "a:b"}, False),
])
def test_exposure_warnings_for_listen_and_share(caplog, flags, api_warning):
    from webui.app import _warn_about_exposure
    from webui.flags import Flags

    with caplog.at_level("WARNING", logger="webui"):
        _warn_about_exposure(Flags(**flags))
    assert ("the API is open to the network" in caplog.text) is api_warning
    assert ("has NO LOGIN" in caplog.text) is not bool(flags.get("gradio_auth"))


def test_hires_checkpoint_over_the_api(url):
    body = {**SMALL, "steps": 2, "enable_hr": True, "hr_second_pass_steps": 2, "hr_checkpoint_name": SD21,
            "hr_sampler_name": "Euler a", "hr_prompt": "a sharp cat"}
    response = post(url, "txt2img", body)
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Hires checkpoint: tiny-sd21-v" in infotext and "Hires sampler: Euler a" in infotext
    assert decode_png(response.json()["images"][0]).size == (128, 128)
    same = post(url, "txt2img", {**body, "hr_checkpoint_name": "Use same checkpoint"})
    assert same.status_code == 200 and "Hires checkpoint" not in json.loads(same.json()["info"])["infotexts"][0]
