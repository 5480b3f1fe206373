"""Flux.1 through the A1111 API: sd-models names the family, override_settings chooses the text encoders
(Forge's ``forge_additional_modules``), the family's defaults apply to fields the body leaves out, and a missing
text encoder is a 422 naming the file and the folder."""

from __future__ import annotations

import pytest
import requests

from pipelines.engine import Engine
from pipelines.settings import EngineSettings, Paths
from tests.fixtures.api_helpers import ApiServer
from tests.fixtures.tiny_flux import write_tiny_flux

TIMEOUT = 120
BODY = {"prompt": "a photo of a cat", "seed": 3, "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-api")
    paths = write_tiny_flux(root / "models")
    engine = Engine(EngineSettings(paths=Paths(data_dir=root, models_dir=root / "models",
                                               outputs_dir=root / "outputs"), device="cpu", checkpoint_cache=1))
    api = ApiServer(engine, root).start()
    yield api, paths
    api.stop()


def test_sd_models_lists_the_family(server):
    api, _ = server
    models = requests.get(f"{api.url}/sdapi/v1/sd-models", params={"with_family": "true"}, timeout=TIMEOUT).json()
    families = {item["model_name"]: item["family"] for item in models}
    assert families == {"tiny-flux-dev-diffusers": "flux", "tiny-flux-dev": "flux", "tiny-flux-schnell": "flux",
                        "tiny-flux-dev-fp8": "flux"}
    # A1111's shape by default (its clients read the items with strict models); config is there, even if null.
    plain = requests.get(f"{api.url}/sdapi/v1/sd-models", timeout=TIMEOUT).json()
    assert all("family" not in item and "config" in item for item in plain)


def test_override_settings_choose_the_text_encoders(server):
    api, paths = server
    body = {**BODY, "override_settings": {
        "sd_model_checkpoint": "tiny-flux-schnell",
        # Forge sends full paths; the file names are looked up in models/text_encoder and models/VAE.
        "forge_additional_modules": [str(paths["clip_l"]), str(paths["t5xxl"]), str(paths["ae"])]}}
    answer = requests.post(f"{api.url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    info = answer.json()["info"]
    assert '"sampler_name": "Euler"' in info and '"cfg_scale": 1.0' in info  # the family's defaults


def test_missing_text_encoder_is_a_422_naming_file_and_folder(server):
    api, paths = server
    body = {**BODY, "override_settings": {"sd_model_checkpoint": "tiny-flux-schnell",
                                          "forge_additional_modules": ["clip_l.safetensors", "ae.safetensors"]}}
    answer = requests.post(f"{api.url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert answer.status_code == 422, answer.text
    detail = answer.text
    assert "t5xxl_fp16.safetensors" in detail and "text_encoder" in detail


def test_unknown_module_is_a_422_under_its_option(server):
    api, _ = server
    body = {**BODY, "override_settings": {"sd_model_checkpoint": "tiny-flux-schnell",
                                          "forge_additional_modules": ["nope.safetensors"]}}
    answer = requests.post(f"{api.url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "override_settings", "forge_additional_modules"]


def test_img2img_and_inpaint_with_a_flux_model_return_images(server):
    from tests.fixtures.api_helpers import b64_png, decode_png
    from tests.fixtures.pictures import half_mask, picture

    api, _ = server
    body = {**BODY, "override_settings": {"sd_model_checkpoint": "tiny-flux-dev-diffusers"},
            "init_images": [b64_png(picture())], "denoising_strength": 0.6, "batch_size": 2}
    answer = requests.post(f"{api.url}/sdapi/v1/img2img", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    images = [decode_png(data) for data in answer.json()["images"]]
    assert len(images) == 2 and all(image.size == (64, 64) for image in images)
    inpaint = {**body, "mask": b64_png(half_mask()), "mask_blur": 0, "batch_size": 1}
    answer = requests.post(f"{api.url}/sdapi/v1/img2img", json=inpaint, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert "Masked content: original" in answer.json()["info"]  # the infotext of an inpaint job
