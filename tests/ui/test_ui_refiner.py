"""The Refiner accordion (issue 17) in a real browser: pick the SDXL refiner in txt2img, see its infotext keys,
and get them back through PNG Info -> Send to txt2img. Screenshot: /tmp/ui-shots/ui-refiner.png."""

from __future__ import annotations

import re

import pytest

from tests.ui.helpers import fill_number, screenshot
from tests.ui.test_ui import choose_checkpoint, generate_and_wait, newest_output, number_value

pytestmark = pytest.mark.browser

REFINER = "tiny-sdxl-refiner.safetensors"


def choose(page, elem_id: str, option: str | re.Pattern) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=isinstance(option, str)).click()


def test_refiner_in_txt2img_writes_its_keys_and_pastes_back(page, ui_server):
    choose_checkpoint(page, "tiny-sdxl.safetensors")
    page.locator("#txt2img_prompt textarea").fill("a lighthouse")
    page.locator("#txt2img_refiner").click()  # open the accordion
    assert page.locator("#txt2img_refiner_checkpoint input").input_value() == "None"
    choose(page, "txt2img_refiner_checkpoint", re.compile(re.escape(REFINER) + r" \["))
    fill_number(page, "txt2img_refiner_switch_at", 0.7)
    info = generate_and_wait(page, "txt2img")
    screenshot(page, "ui-refiner")
    refiner = ui_server.ctx.engine.registry.find_checkpoint(REFINER)
    assert f"Refiner: tiny-sdxl-refiner [{refiner.short_hash}]" in info and "Refiner switch at: 0.7" in info
    assert "Model: tiny-sdxl," in info

    # Back to no refiner, then the saved image's infotext restores both controls.
    choose(page, "txt2img_refiner_checkpoint", "None")
    fill_number(page, "txt2img_refiner_switch_at", 0.8)
    page.locator("#tab_pnginfo-button, button[role=tab]:has-text('PNG Info')").first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(newest_output(ui_server.data_dir, "txt2img")))
    page.locator("#pnginfo_parameters").wait_for()
    page.locator("#pnginfo_send_to_txt2img").click()
    page.wait_for_function("(title) => document.querySelector('#txt2img_refiner_checkpoint input').value === title",
                           arg=refiner.title)
    assert number_value(page, "txt2img_refiner_switch_at") == 0.7

    # img2img has the same accordion.
    page.locator("button[role=tab]:has-text('img2img')").first.click()
    page.locator("#img2img_refiner").click()
    assert page.locator("#img2img_refiner_checkpoint input").input_value() == "None"
    assert number_value(page, "img2img_refiner_switch_at") == 0.8
