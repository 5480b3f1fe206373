"""ControlNet in a real browser: a unit's preprocessor preview (depth, from annotator weights on disk), and the
detected map shown in the gallery after the generated image."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.tiny_annotators import write_annotators
from tests.fixtures.tiny_controlnets import write_tiny_controlnets
from tests.ui.helpers import screenshot
from tests.ui.test_ui import generate_and_wait
from tests.ui.test_ui_scripts import choose

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tiny_models, tmp_path_factory):
    """The UI with the tiny ControlNets and a Depth Anything v2 annotator in the models folder."""
    from tests.ui.helpers import FAST_DEFAULTS, start_ui_server

    write_tiny_controlnets(tiny_models / "ControlNet")
    write_annotators(tiny_models / "ControlNet" / "annotators", ["depth_anything_v2"])
    data = tmp_path_factory.mktemp("ui-data")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    running = start_ui_server(tiny_models, data)
    yield running
    running.server.close()


def test_preview_shows_the_depth_map_and_the_gallery_shows_the_detected_map(page, tmp_path):
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    Image.fromarray(pixels).save(tmp_path / "square.png")
    page.locator("#txt2img_script_controlnet").click()  # open the accordion
    page.locator("#txt2img_controlnet_image_0 input[type=file]").set_input_files(str(tmp_path / "square.png"))
    choose(page, "txt2img_controlnet_module_0", "depth_anything_v2")
    page.locator("#txt2img_controlnet_preview_0").click()
    preview = page.locator("#txt2img_controlnet_preview_image_0 img")
    preview.wait_for(timeout=60_000)
    assert preview.evaluate("img => img.naturalWidth") == 512  # the default processor resolution
    screenshot(page, "controlnet-preview")
    # the model dropdown shows the whole title "name [hash]"
    choose(page, "txt2img_controlnet_model_0", re.compile(r"tiny-controlnet-sd15 \["))
    title = page.locator("#txt2img_controlnet_model_0 input").first.input_value()
    assert title.startswith("tiny-controlnet-sd15 [")
    box = page.locator("#txt2img_controlnet_model_0 input").first.bounding_box()
    assert box is not None and box["width"] > 250
    page.locator("#txt2img_controlnet_enable_0 input").check()
    generate_and_wait(page, "txt2img")
    page.wait_for_function("() => document.querySelectorAll('#txt2img_gallery img').length >= 2", timeout=30_000)
    screenshot(page, "controlnet-gallery-map")
