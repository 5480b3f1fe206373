"""Issue 17 in a real browser: settings that stick, errors where the eye is, the LoRA warning, polish.

Screenshots go to /tmp/ui-shots (ui-settings-search, ui-error-under-generate, ui-extras-result, ui-mobile).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipelines.request import MAX_PROMPT_CHARS
from tests.ui.helpers import fill_number, screenshot
from tests.ui.test_ui import TINY, choose_checkpoint, generate_and_wait

pytestmark = pytest.mark.browser

IN_VIEW = """(id) => {
    const box = document.getElementById(id).getBoundingClientRect();
    return box.height > 0 && box.top >= 0 && box.bottom <= window.innerHeight;
}"""


def open_settings(page) -> None:
    page.locator("button[role=tab]:has-text('Settings')").first.click()
    page.locator("#settings_submit").wait_for()


def dropdown_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def test_settings_survive_a_reload_and_a_second_apply_keeps_the_first(page, ui_server):
    ctx = ui_server.ctx
    before = ctx.options
    try:
        open_settings(page)
        fill_number(page, "setting_show_progress_every_n_steps", 4)
        choose(page, "setting_default_sampler", "Heun")
        choose(page, "setting_samples_format", "jpg")
        page.locator("#settings_submit").click()
        page.wait_for_function("() => document.querySelector('#settings_result').innerText.includes('3 setting(s)')")
        saved = json.loads((ui_server.data_dir / "config.json").read_text())
        assert (saved["show_progress_every_n_steps"], saved["default_sampler"], saved["samples_format"]) == \
            (4, "Heun", "jpg")

        # A fresh page shows the saved values (also txt2img's sampler), not those of the server's start.
        page.reload()
        page.locator("#txt2img_generate").wait_for()
        page.wait_for_function("() => document.querySelector('#txt2img_sampling input').value === 'Heun'")
        open_settings(page)
        assert dropdown_value(page, "setting_default_sampler") == "Heun"
        assert dropdown_value(page, "setting_samples_format") == "jpg"
        assert page.locator("#setting_show_progress_every_n_steps input[type=number]").input_value() == "4"

        # A second Apply of another setting leaves the first three as saved.
        page.locator("#setting_samples_save input[type=checkbox]").click()
        page.locator("#settings_submit").click()
        page.wait_for_function("() => document.querySelector('#settings_result').innerText.includes('1 setting(s)')")
        saved = json.loads((ui_server.data_dir / "config.json").read_text())
        assert saved["samples_save"] is (not before.samples_save)
        assert (saved["show_progress_every_n_steps"], saved["default_sampler"], saved["samples_format"]) == \
            (4, "Heun", "jpg")

        # A page opened before another tab's Apply does not write its stale values back.
        ctx.update_options({"samples_format": "webp"})
        page.locator("#setting_samples_save input[type=checkbox]").click()
        page.locator("#settings_submit").click()
        page.wait_for_function("() => document.querySelector('#settings_result').innerText.includes('samples_save.')")
        assert json.loads((ui_server.data_dir / "config.json").read_text())["samples_format"] == "webp"

        # The search box filters the settings by their label.
        page.locator("#settings_search textarea, #settings_search input").first.fill("format")
        page.wait_for_timeout(300)
        assert page.locator("#setting_samples_format").is_visible()
        assert not page.locator("#setting_show_progress_every_n_steps").is_visible()
        page.screenshot(path="/tmp/ui-settings-search.png")
        screenshot(page, "ui-settings-search")
    finally:
        ctx.update_options({name: getattr(before, name) for name in
                            ("show_progress_every_n_steps", "default_sampler", "samples_format", "samples_save")})


def test_a_refused_request_shows_under_generate_and_as_a_toast(page, ui_server):
    choose_checkpoint(page, TINY)
    generate_and_wait(page, "txt2img")
    old_info = page.locator("#html_info_txt2img").inner_text()
    fill_number(page, "txt2img_width", 70)
    page.locator("#txt2img_generate").click()
    error = page.locator("#txt2img_error")
    error.locator("p").wait_for()
    assert "width" in error.inner_text() and "8" in error.inner_text()
    assert page.evaluate(IN_VIEW, "txt2img_error")
    toast = page.locator("[data-testid=toast-body]").first
    toast.wait_for()
    assert "width" in toast.inner_text()
    # The old image and infotext are marked as not this request's.
    info = page.locator("#html_info_txt2img").inner_text()
    assert "refused" in info and old_info.splitlines()[0] in info
    assert "sdui-stale" in (page.locator("#txt2img_gallery").get_attribute("class") or "")
    page.screenshot(path="/tmp/ui-error-under-generate.png")
    # The next good request clears the line and the marks.
    fill_number(page, "txt2img_width", 64)
    generate_and_wait(page, "txt2img")
    assert error.inner_text().strip() == ""
    assert "sdui-stale" not in (page.locator("#txt2img_gallery").get_attribute("class") or "")


def test_a_file_that_is_not_an_image_gives_one_sentence(page, ui_server, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture\n")
    # PNG Info reads it at once.
    page.locator("button[role=tab]:has-text('PNG Info')").first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(fake))
    page.wait_for_function("() => document.querySelector('#pnginfo_html').innerText.includes('holiday.png')")
    text = page.locator("#pnginfo_html").inner_text().strip()
    assert "is not an image" in text and len(text.splitlines()) == 1
    assert str(tmp_path) not in text and "preprocess" not in text
    # img2img refuses it under Generate, in one sentence.
    page.locator("button[role=tab]:has-text('img2img')").first.click()
    page.locator("#img2img_image input[type=file]").set_input_files(str(fake))
    page.wait_for_timeout(500)
    page.locator("#img2img_generate").click()
    error = page.locator("#img2img_error")
    error.locator("p").wait_for()
    message = error.inner_text().strip()
    assert "holiday.png" in message and "is not an image" in message and len(message.splitlines()) == 1
    page_text = page.locator("body").inner_text()
    assert "Could not preprocess" not in page_text and str(tmp_path) not in page_text


def test_extras_result_is_fully_visible(page, ui_server, tmp_path):
    source = tmp_path / "big.png"
    Image.new("RGB", (256, 256), (200, 60, 30)).save(source)
    page.locator("button[role=tab]:has-text('Extras')").first.click()
    page.locator("#extras_image input[type=file]").set_input_files(str(source))
    page.locator("#extras_image img").wait_for()
    page.locator("#extras_upscaler_1 input").click()
    page.get_by_role("option", name="Lanczos").click()
    page.locator("#extras_generate").click()
    page.wait_for_function("() => document.getElementById('html_info_extras').innerText.includes('512x512')",
                           timeout=90_000)
    image = page.locator("#extras_gallery img").first
    image.wait_for()
    page.wait_for_timeout(500)
    page.screenshot(path="/tmp/ui-extras-result.png")
    box = image.bounding_box()
    frame = page.locator("#extras_gallery").bounding_box()
    assert box["width"] > 100 and box["height"] > 100
    assert box["x"] >= frame["x"] - 1 and box["y"] >= frame["y"] - 1
    assert box["x"] + box["width"] <= frame["x"] + frame["width"] + 1
    assert box["y"] + box["height"] <= frame["y"] + frame["height"] + 1
    # All of the picture is drawn in its box: nothing is cropped by object-fit.
    fit = page.evaluate("el => getComputedStyle(el).objectFit", image.element_handle())
    assert fit in ("contain", "scale-down", "fill", "none") and fit != "cover"


def test_a_batch_shows_its_grid_first(page, ui_server):
    choose_checkpoint(page, TINY)
    fill_number(page, "txt2img_batch_size", 2)
    try:
        generate_and_wait(page, "txt2img")
    finally:
        fill_number(page, "txt2img_batch_size", 1)
    page.wait_for_function("() => document.querySelectorAll('#txt2img_gallery .thumbnail-item').length >= 3")
    sources = page.evaluate("""() => [...new Set([...document.querySelectorAll('#txt2img_gallery .thumbnail-item img')]
        .map((img) => img.getAttribute('src')))]""")
    assert len(sources) == 3 and "grid" in sources[0] and not any("grid" in src for src in sources[1:]), sources


def test_preview_fills_its_box_and_the_page_fits_a_phone(page, ui_server):
    fit = page.evaluate("""() => {
        const rules = (s) => { try { return [...s.cssRules]; } catch (e) { return []; } };
        const rule = [...document.styleSheets].flatMap(rules).map(r => r.cssText).join('\\n');
        return rule.includes('_preview img');
    }""")
    assert fit, "a CSS rule scales the live preview up to its box"
    page.set_viewport_size({"width": 400, "height": 900})
    page.wait_for_timeout(800)
    page.screenshot(path="/tmp/ui-mobile.png", full_page=True)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 400, width


def test_token_counter_warns_near_and_over_the_limit(ui_server):
    from webui.ui.tokens import TokenCounter

    counter = TokenCounter(ui_server.ctx)
    assert "sdui-token-near" not in counter.html("a cat")
    near = counter.html("a, " * int(MAX_PROMPT_CHARS * 0.95 / 3))
    assert "sdui-token-near" in near and "Near the limit" in near
    over = counter.html("x" * (MAX_PROMPT_CHARS + 1))
    assert "sdui-token-over" in over and "Too long" in over and f"{MAX_PROMPT_CHARS:,}" in over
