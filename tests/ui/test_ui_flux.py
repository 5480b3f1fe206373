"""Browser: a Flux.1 checkpoint shows its controls (Distilled CFG Scale, Shift, CFG scale 1, Euler) and the top
bar's "VAE / Text Encoder" list completes a transformer-only file; pasting an infotext fills Shift and the list."""

from __future__ import annotations

import json
import re

import pytest

from tests.fixtures.tiny_flux import write_tiny_flux
from tests.ui.helpers import fill_number, screenshot
from tests.ui.test_ui import choose_checkpoint, generate_and_wait

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    from tests.ui.helpers import FAST_DEFAULTS, start_ui_server

    root = tmp_path_factory.mktemp("flux-ui")
    write_tiny_flux(root / "models")
    data = root / "data"
    data.mkdir()
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    running = start_ui_server(root / "models", data)
    yield running
    running.server.close()


def test_flux_controls_and_split_files(page):
    choose_checkpoint(page, "tiny-flux-schnell.safetensors")
    page.locator("#txt2img_distilled_cfg_scale").wait_for(state="visible")
    page.locator("#txt2img_shift").wait_for(state="visible")
    fill_number(page, "txt2img_shift", 2.5)
    assert page.locator("#txt2img_cfg_scale input[type=number]").input_value() == "1"
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"):
        page.locator("#setting_forge_additional_modules input").click()
        page.get_by_role("option", name=re.compile(re.escape(name))).click()
    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    info = generate_and_wait(page, "txt2img")
    assert "Sampler: Euler" in info and "CFG scale: 1" in info and "Shift: 2.5" in info
    assert "Module 1: clip_l, Module 2: t5xxl_fp16, Module 3: ae" in info
    screenshot(page, "flux-txt2img")


def test_schnell_sets_its_few_steps_and_the_negative_prompt_says_when_it_counts(page):
    steps = page.locator("#txt2img_steps input[type=number]")
    negative = page.locator("#txt2img_neg_prompt textarea")
    choose_checkpoint(page, "tiny-flux-schnell.safetensors")
    page.wait_for_function("() => document.querySelector('#txt2img_steps input[type=number]').value === '4'")
    assert "only with CFG scale above 1" in negative.get_attribute("placeholder")
    choose_checkpoint(page, "tiny-flux-dev.safetensors")  # dev has no steps of its own: the tab's default again
    page.wait_for_function("() => document.querySelector('#txt2img_steps input[type=number]').value === '3'")
    assert steps.input_value() == "3"
    assert "only with CFG scale above 1" in negative.get_attribute("placeholder")


def test_paste_fills_shift_and_the_modules(ui_server):
    import gradio as gr

    from webui.ui.paste import PasteTarget, paste_updates

    shift, modules = gr.Slider(), gr.Dropdown(multiselect=True)
    target = PasteTarget({"shift": shift}, gr.Dropdown(), modules=modules)
    text = "a cat\nSteps: 3, Shift: 2.5, Module 1: clip_l, Module 2: t5xxl_fp16, Module 3: ae"
    updates = paste_updates(ui_server.ctx, text, target)
    assert updates[shift]["value"] == 2.5
    assert updates[modules]["value"] == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]
    with pytest.warns(UserWarning, match="modules gone"):
        updates = paste_updates(ui_server.ctx, "a cat\nSteps: 3, Size: 64x64, Module 1: gone", target)
    assert updates[modules]["value"] == []
