"""A1111 behaviours of the API that scripts rely on (issue 16 items 4, 7-10): interrupt and skip keep their
images, the ``infotext`` request field, override_settings as A1111 applies them, the options A1111 scripts
read and write with their effects, and API images encoded per ``samples_format`` with their infotext.

Clients: ``webuiapi`` from PyPI and raw A1111 payloads through ``requests``.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time

import pytest
import requests

from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from tests.fixtures.api_helpers import server_fixtures
from tests.helpers import SD15, payload

TIMEOUT = 120


@pytest.fixture(scope="module")
def api_engine(engine_factory):
    return engine_factory()


server, url, client = server_fixtures()


def post(url: str, route: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/{route}", json=body, timeout=TIMEOUT)


def txt2img(url: str, **body) -> tuple[dict, dict]:
    response = post(url, "txt2img", {**payload(), "prompt": "a cat", "seed": 7, **body})
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer, json.loads(answer["info"])


def options(url: str) -> dict:
    return requests.get(f"{url}/options", timeout=TIMEOUT).json()


def set_options(url: str, changes: dict) -> None:
    assert requests.post(f"{url}/options", json=changes, timeout=TIMEOUT).status_code == 200


def run_and_stop(url: str, body: dict, route: str) -> dict:
    """Start ``body`` in a thread, call ``route`` (interrupt or skip) once sampling reached step 1; the answer."""
    answers: list[requests.Response] = []
    worker = threading.Thread(target=lambda: answers.append(post(url, "txt2img", body)))
    worker.start()
    deadline = time.monotonic() + 300  # the first job loads the model
    while time.monotonic() < deadline:
        state = requests.get(f"{url}/progress", params={"skip_current_image": "true"}, timeout=TIMEOUT).json()
        if state["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the job never reached step 1")
    assert requests.post(f"{url}/{route}", timeout=TIMEOUT).json() == {}
    worker.join(timeout=120)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    return answers[0].json()


def b64_infotext(data: str) -> str | None:
    return read_infotext(base64.b64decode(data))


# --- item 4: interrupt and skip keep their images --------------------------------------------------


def test_interrupted_job_returns_the_partial_images_with_consistent_info(url):
    answer = run_and_stop(url, {**payload(steps=150), "prompt": "a cat", "seed": 10, "batch_size": 2, "n_iter": 3},
                          "interrupt")
    info = json.loads(answer["info"])
    assert info["interrupted"]
    # The batch being sampled is decoded from its latents; later batches never ran.
    assert info["all_seeds"] == [10, 11]
    assert len(answer["images"]) == len(info["infotexts"]) == len(info["all_prompts"]) == len(info["all_subseeds"]) == 2
    for data, text, seed in zip(answer["images"], info["infotexts"], info["all_seeds"]):
        assert b64_infotext(data) == text and parse_infotext(text)["Seed"] == seed


def test_skip_keeps_the_skipped_batch_and_all_seeds_keeps_its_length(url):
    answer = run_and_stop(url, {**payload(steps=60), "prompt": "a cat", "seed": 20, "n_iter": 3}, "skip")
    info = json.loads(answer["info"])
    assert not info["interrupted"]
    assert info["all_seeds"] == [20, 21, 22] and len(answer["images"]) == len(info["infotexts"]) == 3


# --- item 7: the infotext field --------------------------------------------------------------------


PASTED = ("a dog in the snow\nNegative prompt: ugly\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
          "CFG scale: 4.5, Seed: 99, Size: 64x64, Clip skip: 2")


def test_infotext_fills_unset_fields_and_explicit_fields_win(url):
    response = post(url, "txt2img", {"infotext": PASTED, "seed": 5})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["prompt"] == "a dog in the snow" and info["negative_prompt"] == "ugly"
    assert info["steps"] == 3 and info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert info["cfg_scale"] == 4.5 and info["clip_skip"] == 2 and info["width"] == 64
    assert info["seed"] == 5  # set in the request: it wins over the pasted 99
    written = parse_infotext(info["infotexts"][0])
    assert written["Steps"] == 3 and written["Seed"] == 5


def test_infotext_without_parameters_is_a_prompt(url):
    # As A1111 reads it: a last line that is no parameter line belongs to the prompt.
    response = post(url, "txt2img", {**payload(), "infotext": "a lighthouse\nat night"})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["prompt"] == "a lighthouse\nat night" and info["steps"] == 4


# --- item 8: override_settings as A1111 -----------------------------------------------------------


def test_override_settings_restore_afterwards_false_keeps_the_overrides(url):
    before = options(url)
    txt2img(url, override_settings={"jpeg_quality": 61, "CLIP_stop_at_last_layers": 3})
    assert options(url)["jpeg_quality"] == before["jpeg_quality"]  # restored afterwards by default
    _, info = txt2img(url, override_settings={"jpeg_quality": 61, "CLIP_stop_at_last_layers": 3},
                      override_settings_restore_afterwards=False)
    assert info["clip_skip"] == 3
    after = options(url)
    assert after["jpeg_quality"] == 61 and after["CLIP_stop_at_last_layers"] == 3
    _, plain = txt2img(url)
    assert plain["clip_skip"] == 3  # the next request runs with it
    set_options(url, {"jpeg_quality": before["jpeg_quality"], "CLIP_stop_at_last_layers": 1})


def test_unknown_checkpoint_override_falls_back_with_a_warning(url, client, caplog):
    client.set_options({"sd_model_checkpoint": SD15})
    with caplog.at_level(logging.WARNING, logger="webui.api"):
        _, info = txt2img(url, override_settings={"sd_model_checkpoint": "no-such-model.safetensors"})
    assert info["sd_model_name"] == "tiny-sd15"
    assert any("no-such-model.safetensors" in w for w in info["warnings"])
    assert any("no-such-model.safetensors" in r.getMessage() for r in caplog.records)


def test_unknown_style_is_ignored_with_a_warning(url, client):
    result = client.txt2img(prompt="a cat", styles=["no such style"], width=64, height=64, seed=3)
    assert result.info["styles"] == []
    assert any("no such style" in w for w in result.info["warnings"])


# --- item 9: options -------------------------------------------------------------------------------


A1111_OPTION_TYPES = {
    "outdir_samples": str, "outdir_txt2img_samples": str, "outdir_img2img_samples": str,
    "outdir_extras_samples": str, "outdir_grids": str, "outdir_txt2img_grids": str, "outdir_img2img_grids": str,
    "samples_filename_pattern": str, "jpeg_quality": int, "webp_lossless": bool, "eta_noise_seed_delta": int,
    "return_grid": bool, "enable_pnginfo": bool, "sd_vae_decode_method": str,
    "save_images_before_face_restoration": bool, "save_images_before_highres_fix": bool,
    "save_images_before_color_correction": bool, "save_incomplete_images": bool, "samples_format": str,
    "grid_format": str, "samples_save": bool, "grid_save": bool, "sd_model_checkpoint": str, "sd_vae": str,
    "CLIP_stop_at_last_layers": int, "show_progress_every_n_steps": int, "randn_source": str,
}


def test_options_have_a1111_keys_and_types(client):
    current = client.get_options()
    for key, kind in A1111_OPTION_TYPES.items():
        assert key in current, key
        assert type(current[key]) is kind, (key, current[key])
    assert current["jpeg_quality"] == 80 and current["enable_pnginfo"] is True
    assert current["sd_vae_decode_method"] == "Full" and current["eta_noise_seed_delta"] == 0


def test_an_option_that_cannot_be_honoured_is_ignored_with_a_warning(url, caplog):
    with caplog.at_level(logging.WARNING, logger="webui.api"):
        set_options(url, {"sd_vae_decode_method": "TAESD", "save_images_before_face_restoration": False})
    assert options(url)["sd_vae_decode_method"] == "Full"
    assert any("sd_vae_decode_method" in r.getMessage() for r in caplog.records)
    _, info = txt2img(url, override_settings={"sd_vae_decode_method": "TAESD"})
    assert any("sd_vae_decode_method" in w for w in info["warnings"])


def _saved(api_engine, before: set) -> list:
    return sorted(p for p in api_engine.paths.outputs_dir.rglob("*") if p.is_file() and p not in before)


def test_saving_options_have_their_effect(url, api_engine):
    def files():
        return {p for p in api_engine.paths.outputs_dir.rglob("*") if p.is_file()}

    sizes = {}
    for quality in (5, 95):
        before = files()
        txt2img(url, save_images=True, override_settings={"samples_format": "jpg", "jpeg_quality": quality})
        (path,) = _saved(api_engine, before)
        sizes[quality] = path.stat().st_size
        assert path.suffix == ".jpg" and read_infotext(path)
    assert sizes[5] < sizes[95]

    before = files()
    txt2img(url, save_images=True, override_settings={"enable_pnginfo": False})
    (path,) = _saved(api_engine, before)
    assert read_infotext(path) is None

    before = files()
    txt2img(url, save_images=True, prompt="a red fox, jumping",
            override_settings={"samples_filename_pattern": "[seed]-[prompt_words]-[model_name]-[steps]"})
    (path,) = _saved(api_engine, before)
    assert path.name.endswith("-7-a red fox jumping-tiny-sd15-4.png"), path.name

    before = files()
    txt2img(url, save_images=True, enable_hr=True, hr_scale=2, denoising_strength=0.5, hr_upscaler="Latent",
            override_settings={"save_images_before_highres_fix": True})
    saved = _saved(api_engine, before)
    assert len(saved) == 2 and any(p.stem.endswith("-before-highres-fix") for p in saved)


def test_outdir_samples_replaces_the_mode_folders(url, api_engine):
    folder = api_engine.paths.outputs_dir / "all-samples"
    txt2img(url, save_images=True, override_settings={"outdir_samples": str(folder)})
    assert [p.suffix for p in folder.iterdir()] == [".png"]


def test_eta_noise_seed_delta_changes_ancestral_noise_and_is_recorded(url):
    plain, _ = txt2img(url, sampler_name="Euler a")
    delta, info = txt2img(url, sampler_name="Euler a", override_settings={"eta_noise_seed_delta": 31337})
    assert plain["images"][0] != delta["images"][0]
    assert parse_infotext(info["infotexts"][0])["ENSD"] == 31337
    again, _ = txt2img(url, sampler_name="Euler a", override_settings={"eta_noise_seed_delta": 31337})
    assert again["images"][0] == delta["images"][0]


def test_return_grid_false_leaves_the_grid_out(url):
    answer, info = txt2img(url, batch_size=2, save_images=True)
    assert len(answer["images"]) == 3 and info["index_of_first_image"] == 1
    answer, info = txt2img(url, batch_size=2, save_images=True, override_settings={"return_grid": False})
    assert len(answer["images"]) == 2 and info["index_of_first_image"] == 0


# --- item 10: API images per samples_format with their infotext -----------------------------------


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("jpg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_api_images_are_encoded_per_samples_format_with_their_infotext(url, fmt, magic):
    answer, info = txt2img(url, override_settings={"samples_format": fmt})
    raw = base64.b64decode(answer["images"][0])
    assert raw.startswith(magic)
    assert read_infotext(raw) == info["infotexts"][0]


def test_webuiapi_reads_jpeg_answers(client):
    result = client.txt2img(prompt="a cat", width=64, height=64, seed=4,
                            override_settings={"samples_format": "jpg"})
    assert result.image.size == (64, 64)
    assert read_infotext(result.image) == result.info["infotexts"][0]
