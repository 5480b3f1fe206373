"""img2img's Batch and Inpaint sketch sub-tabs, and unreadable uploads in its image editors, in a real browser.

Screenshots go to /tmp/ui-shots (img2img-batch, img2img-batch-refused, img2img-inpaint-sketch,
img2img-editor-not-an-image).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.images.ops import resize_image
from pipelines.images.saving import read_infotext
from tests.fixtures.pictures import picture
from tests.ui.helpers import fill_number, paint_stroke_and_generate, screenshot
from tests.ui.test_ui import TINY, choose_checkpoint, generate_and_wait

pytestmark = pytest.mark.browser


def open_sub_tab(page, elem_id: str) -> None:
    page.locator("button[role=tab]:has-text('img2img')").first.click()
    page.locator(f"#{elem_id}-button").click()


def test_img2img_batch_over_a_folder(page, ui_server, tmp_path):
    data = ui_server.data_dir
    source = data / "batch-in"
    source.mkdir()
    picture().save(source / "first.png")
    picture().rotate(180).save(source / "second.png")
    (source / "broken.png").write_text("this is not a picture\n")
    choose_checkpoint(page, TINY)
    open_sub_tab(page, "img2img_batch_tab")
    page.locator("#img2img_batch_input_dir textarea").fill("batch-in")
    page.locator("#img2img_batch_output_dir textarea").fill("batch-out")
    page.locator("#img2img_prompt textarea").fill("a painting")
    screenshot(page, "img2img-batch")
    generate_and_wait(page, "img2img")
    log = page.locator("#html_log_img2img").inner_text()
    assert "2 of 3 image(s) processed" in log and "broken.png: not an image" in log, log
    assert str(data) not in log
    saved = sorted(p.name for p in (data / "batch-out").iterdir())
    assert saved == ["00000-first.png", "00001-second.png"]
    info = read_infotext(data / "batch-out" / "00001-second.png")
    assert info.startswith("a painting\n") and "Denoising strength: 0.75" in info
    screenshot(page, "img2img-batch-done")

    # A folder outside the allowed folders is refused under Generate, naming the field.
    page.locator("#img2img_batch_input_dir textarea").fill(str(tmp_path))
    page.locator("#img2img_generate").click()
    error = page.locator("#img2img_error")
    error.locator("p").wait_for()
    message = error.inner_text().strip()
    assert message.startswith("Input directory:") and "outside the folders" in message, message
    screenshot(page, "img2img-batch-refused")


def test_inpaint_sketch_paints_the_mask_and_the_colours(page, ui_server, tmp_path):
    # Large beside the brush, so that a stroke down the middle leaves the edges unpainted.
    picture((512, 512)).save(tmp_path / "base.png")
    choose_checkpoint(page, TINY)
    open_sub_tab(page, "img2img_inpaint_sketch_tab")
    page.locator("#img2img_mask_alpha").wait_for()  # "Mask transparency" only in this sub-tab
    page.locator("#inpaint_sketch input[type=file]").set_input_files(str(tmp_path / "base.png"))
    canvas = page.locator("#inpaint_sketch canvas").first
    canvas.wait_for()
    fill_number(page, "img2img_mask_blur", 0)
    info = paint_stroke_and_generate(page, canvas, across=(0.45, 0.55), settle_ms=800)
    screenshot(page, "img2img-inpaint-sketch")
    assert "Mask blur: 0" in info, info
    files = sorted((ui_server.data_dir / "outputs" / "img2img-images").rglob("*.png"), key=lambda p: p.stat().st_mtime)
    out = np.asarray(Image.open(files[-1]).convert("RGB")).astype(int)
    original = np.asarray(resize_image(picture((512, 512)), 64, 64, 0)).astype(int)
    # The stroke ran down the middle: the left and right edges were not painted, so they are kept.
    assert np.abs(out[:, :8] - original[:, :8]).max() <= 2 and np.abs(out[:, -8:] - original[:, -8:]).max() <= 2


def test_a_file_that_is_not_an_image_in_the_image_editors_gives_one_sentence(page, ui_server, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture\n")
    for tab, editor, label in (("img2img_inpaint_tab", "img2maskimg", "Image for inpainting with mask"),
                               ("img2img_inpaint_sketch_tab", "inpaint_sketch", "Color sketch inpainting"),
                               ("img2img_img2img_sketch_tab", "img2img_sketch", "Sketch")):
        open_sub_tab(page, tab)
        page.locator(f"#{editor} input[type=file]").set_input_files(str(fake))
        page.wait_for_function("() => document.querySelector('#img2img_unreadable_uploads textarea')"
                               "?.value.includes('holiday.png')")
        page.wait_for_timeout(300)
        page.locator("#img2img_generate").click()
        error = page.locator("#img2img_error")
        page.wait_for_function("label => document.getElementById('img2img_error').innerText.startsWith(label)",
                               arg=label)
        message = error.inner_text().strip()
        assert message == (f"{label}: the file 'holiday.png' is not an image that can be read; use a PNG, JPEG, "
                           "WebP or BMP file."), message
        body = page.locator("body").inner_text()
        assert "Could not preprocess" not in body and str(tmp_path) not in body
    screenshot(page, "img2img-editor-not-an-image")


def test_the_new_sub_tabs_fit_a_phone(page, ui_server):
    for tab in ("img2img_inpaint_sketch_tab", "img2img_batch_tab"):
        # Chosen at desktop width: on a phone Gradio folds tab buttons that do not fit into a menu.
        page.set_viewport_size({"width": 1400, "height": 1000})
        open_sub_tab(page, tab)
        page.set_viewport_size({"width": 400, "height": 900})
        page.wait_for_timeout(800)
        screenshot(page, f"img2img-phone-{tab}")
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 400, (tab, width)
