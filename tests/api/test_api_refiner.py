"""The refiner over the A1111 API (issue 17): refiner_checkpoint / refiner_switch_at in txt2img and img2img."""

from __future__ import annotations

import json

import pytest
import requests

from pipelines.images.infotext import parse_infotext
from tests.fixtures.api_helpers import ApiServer, b64_png
from tests.fixtures.pictures import picture
from tests.helpers import SDXL

TIMEOUT = 300
REFINER = "tiny-sdxl-refiner.safetensors"
BODY = {"prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64, "seed": 3,
        "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": SDXL}}


@pytest.fixture(scope="module")
def url(engine):
    server = ApiServer(engine, engine.paths.data_dir).start()
    yield server.url + "/sdapi/v1"
    server.stop()


def post(url: str, route: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/{route}", json=body, timeout=TIMEOUT)


@pytest.mark.parametrize("route, extra", [("txt2img", {}), ("img2img", {"init_images": [b64_png(picture())],
                                                                         "denoising_strength": 0.6})])
def test_refiner_fields_work(url, engine, route, extra):
    response = post(url, route, {**BODY, **extra, "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5})
    assert response.status_code == 200, response.text
    answer = response.json()
    refiner = engine.registry.find_checkpoint(REFINER)
    info = parse_infotext(json.loads(answer["info"])["infotexts"][0])
    assert info["Refiner"] == f"tiny-sdxl-refiner [{refiner.short_hash}]" and info["Refiner switch at"] == 0.5
    assert answer["parameters"]["refiner_checkpoint"] == "tiny-sdxl-refiner"
    plain = post(url, route, {**BODY, **extra, "refiner_checkpoint": None, "refiner_switch_at": None})
    assert plain.status_code == 200 and "Refiner" not in plain.json()["info"]
    assert plain.json()["images"][0] != answer["images"][0]


def test_unknown_refiner_is_422_listing_the_checkpoints(url):
    response = post(url, "txt2img", {**BODY, "refiner_checkpoint": "sd_xl_refiner_1.0"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    item = next(item for item in detail if "refiner_checkpoint" in item["loc"])
    assert "no model matches 'sd_xl_refiner_1.0'" in item["msg"] and "tiny-sdxl-refiner.safetensors [" in item["msg"]
