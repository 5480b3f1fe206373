"""Face restoration over the HTTP API with random-weight GFPGAN / CodeFormer files: restore_faces in txt2img,
the Extras visibilities, /sdapi/v1/face-restorers, and the flags that add face model folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from tests.fixtures.api_helpers import ApiServer, b64_png, decode_png
from tests.fixtures.pictures import picture
from tests.helpers import SD15

TIMEOUT = 900
SMALL = {"prompt": "a face", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
         "override_settings": {"sd_model_checkpoint": SD15}}


@pytest.fixture(scope="module")
def url(face_engine):
    server = ApiServer(face_engine, face_engine.paths.data_dir).start()
    yield f"{server.url}/sdapi/v1"
    server.stop()


def test_face_restorers_are_listed_ready_with_their_folders(url, face_models):
    restorers = requests.get(f"{url}/face-restorers", timeout=TIMEOUT).json()
    assert [r["name"] for r in restorers] == ["CodeFormer", "GFPGAN"]
    by_name = {r["name"]: r for r in restorers}
    assert by_name["GFPGAN"]["model_path"] == str(face_models / "GFPGAN" / "GFPGANv1.4.pth")
    assert by_name["CodeFormer"]["model_path"] == str(face_models / "Codeformer" / "codeformer-v0.1.0.pth")
    assert all(r["ready"] for r in restorers)


def test_txt2img_restore_faces(url):
    body = {**SMALL, "override_settings": {**SMALL["override_settings"], "face_restoration_model": "GFPGAN"}}
    plain = requests.post(f"{url}/txt2img", json=body, timeout=TIMEOUT)
    restored = requests.post(f"{url}/txt2img", json={**body, "restore_faces": True}, timeout=TIMEOUT)
    assert plain.status_code == 200 and restored.status_code == 200, restored.text
    info = json.loads(restored.json()["info"])
    assert info["restore_faces"] is True and info["face_restoration_model"] == "GFPGAN"
    assert json.loads(plain.json()["info"])["restore_faces"] is False
    image = decode_png(restored.json()["images"][0])
    assert parse_infotext(read_infotext(image))["Face restoration"] == "GFPGAN"
    before = np.asarray(decode_png(plain.json()["images"][0]).convert("RGB"), dtype=np.int16)
    assert image.size == (64, 64) and np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - before).max() > 0


def test_extras_visibility(url):
    source = picture((96, 96))
    body = {"image": b64_png(source), "upscaling_resize": 1, "gfpgan_visibility": 1}
    answer = requests.post(f"{url}/extra-single-image", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    image = decode_png(answer.json()["image"])
    assert image.size == source.size
    assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - np.asarray(source, dtype=np.int16)).max() > 0
    assert parse_infotext(read_infotext(image))["GFPGAN visibility"] == 1
    # Visibility 0: unchanged.
    off = requests.post(f"{url}/extra-single-image", json={**body, "gfpgan_visibility": 0}, timeout=TIMEOUT)
    assert np.array_equal(np.asarray(decode_png(off.json()["image"]).convert("RGB")), np.asarray(source))


def test_unknown_face_restoration_model_is_422(url):
    body = {**SMALL, "restore_faces": True,
            "override_settings": {**SMALL["override_settings"], "face_restoration_model": "RestoreFormer"}}
    answer = requests.post(f"{url}/txt2img", json=body, timeout=TIMEOUT)
    assert answer.status_code == 422
    assert "face_restoration_model" in answer.text and "CodeFormer" in answer.text


def test_face_model_folder_flags():
    from webui.flags import parse_flags

    flags = parse_flags(["--gfpgan-models-path", "/srv/gfpgan", "--codeformer-models-path", "/srv/cf"], environ={})
    paths = flags.paths()
    assert paths.model_dirs("gfpgan")[-1].as_posix() == "/srv/gfpgan"
    assert paths.model_dirs("codeformer")[-1].as_posix() == "/srv/cf"


def test_extra_batch_images_with_codeformer(url):
    source = picture((64, 64))
    body = {"imageList": [{"data": b64_png(source), "name": "a.png"}], "upscaling_resize": 1,
            "codeformer_visibility": 0.5, "codeformer_weight": 0.25}
    answer = requests.post(f"{url}/extra-batch-images", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    [encoded] = answer.json()["images"]
    image = decode_png(encoded)
    assert image.size == source.size
    assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - np.asarray(source, dtype=np.int16)).max() > 0
    params = parse_infotext(read_infotext(image))
    assert params["CodeFormer visibility"] == 0.5 and params["CodeFormer weight"] == 0.25
