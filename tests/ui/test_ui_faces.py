"""Face restoration in the browser: the Extras tab's GFPGAN / CodeFormer sliders on random-weight models in the
published layouts, the Settings tab's "Face restoration" section, and the message when a model file is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.images.saving import read_infotext
from tests.fixtures.pictures import picture
from tests.ui.helpers import fill_number, screenshot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tiny_models, face_models, tmp_path_factory):
    """The UI on the tiny models, with the face models in the folders the A1111 flags add."""
    from tests.ui.helpers import FAST_DEFAULTS, start_ui_server

    data = tmp_path_factory.mktemp("ui-faces")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    running = start_ui_server(tiny_models, data, "--gfpgan-models-path", str(face_models / "GFPGAN"),
                              "--codeformer-models-path", str(face_models / "Codeformer"))
    yield running
    running.server.close()


def _open_extras_with(page, path) -> None:
    page.locator("button[role=tab]:has-text('Extras')").first.click()
    page.locator("#extras_image input[type=file]").set_input_files(str(path))
    page.locator("#extras_image img").wait_for()


def _wait_for_result(page) -> str:
    page.wait_for_function("() => document.getElementById('html_info_extras').innerText.includes('image(s)')",
                           timeout=600_000)
    return page.locator("#html_info_extras").inner_text()


def test_extras_gfpgan_slider_restores_the_face(page, ui_server, tmp_path):
    source = picture((96, 96))
    source.save(tmp_path / "face.png")
    _open_extras_with(page, tmp_path / "face.png")
    fill_number(page, "extras_upscaling_resize", 1)  # restore only, at the source's size
    page.locator("#extras_gfpgan").get_by_text("GFPGAN").first.click()  # open the accordion
    fill_number(page, "extras_gfpgan_visibility", 1)
    page.locator("#extras_generate").click()
    info = _wait_for_result(page)
    page.locator("#extras_gallery img").first.wait_for()
    screenshot(page, "faces-extras-gfpgan")
    assert "1 image(s), 96x96" in info and "GFPGAN visibility: 1" in info
    saved = sorted((ui_server.data_dir / "outputs" / "extras-images").rglob("*.png"))[-1]
    with Image.open(saved) as image:
        result = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert result.shape == (96, 96, 3)
    assert np.abs(result - np.asarray(source, dtype=np.int16)).max() > 0  # the face was restored
    assert "GFPGAN visibility: 1" in read_infotext(saved)


def test_settings_have_the_face_restoration_section(page):
    page.locator("button[role=tab]:has-text('Settings')").first.click()
    for elem_id in ("setting_face_restoration", "setting_face_restoration_model", "setting_code_former_weight",
                    "setting_face_restoration_unload"):
        assert page.locator(f"#{elem_id}").count() == 1, elem_id
    assert page.get_by_text("Face restoration", exact=True).count() >= 1


def test_a_missing_model_file_is_named(page, ui_server, tmp_path):
    folder = ui_server.ctx.engine.face_restorers.model_file("CodeFormer").parent
    hidden = folder / ".hidden"
    hidden.mkdir()
    model = folder / "codeformer-v0.1.0.pth"
    model.rename(hidden / model.name)  # as if the user had not put it there yet
    try:
        picture((64, 64)).save(tmp_path / "face.png")
        _open_extras_with(page, tmp_path / "face.png")
        page.locator("#extras_codeformer").get_by_text("CodeFormer").first.click()
        fill_number(page, "extras_codeformer_visibility", 1)
        page.locator("#extras_generate").click()
        toast = page.locator("[data-testid=toast-body]").first
        toast.wait_for()
        assert "codeformer-v0.1.0.pth" in toast.inner_text() and "models/Codeformer/" in toast.inner_text()
    finally:
        (hidden / model.name).rename(model)
        hidden.rmdir()
