"""The Script dropdown in a real browser: the checkpoint comparison of issue 8 (three checkpoints x one
prompt x two seeds) runs in one click and shows the labelled grid.

Without Chromium the test skips; `apt-get install -y chromium` enables it. Screenshots go to /tmp/ui-shots.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from tests.ui.helpers import screenshot

pytestmark = pytest.mark.browser

CHECKPOINTS = ["tiny-sd15.safetensors", "tiny-sd21-v.safetensors", "tiny-sdxl.safetensors"]


def choose(page, elem_id: str, option: str | re.Pattern) -> None:
    """Pick ``option`` (its exact text, or a pattern) in the Gradio dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=isinstance(option, str)).first.click()


def newest_grid(data_dir: Path) -> Path:
    files = sorted((data_dir / "outputs" / "txt2img-grids").rglob("*.png"), key=lambda p: p.stat().st_mtime)
    assert files, "no grid was saved"
    return files[-1]


def test_checkpoint_comparison_in_one_click(page, ui_server):
    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    page.locator("#txt2img_seed input").fill("1")
    choose(page, "txt2img_script", "X/Y/Z plot")
    page.locator("#txt2img_script_x_y_z_plot").wait_for(state="visible")

    choose(page, "txt2img_xyz_x_type", "Checkpoint name")
    picker = page.locator("#txt2img_xyz_x_values_dropdown")
    picker.wait_for(state="visible")
    box = picker.locator("input").first
    for k, name in enumerate(CHECKPOINTS):
        # Type to filter the list, Enter picks the match; wait for its token before the next one.
        box.click()
        box.fill(name)
        page.get_by_role("option", name=re.compile(re.escape(name))).first.wait_for()
        box.press("Enter")
        page.wait_for_function("([id, n]) => document.querySelectorAll(`#${id} .token`).length >= n",
                               arg=["txt2img_xyz_x_values_dropdown", k + 1])
    box.press("Escape")
    choose(page, "txt2img_xyz_y_type", "Seed")
    values = page.locator("#txt2img_xyz_y_values textarea, #txt2img_xyz_y_values input").first
    values.fill("1, 2")
    values.press("Tab")
    page.wait_for_function("() => document.querySelector('#txt2img_xyz_summary').innerText.includes('6 image')")
    screenshot(page, "xyz-01-set-up")

    before = page.evaluate("() => document.querySelector('#txt2img_gallery img')?.src ?? null")
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        """(before) => {
            const img = document.querySelector('#txt2img_gallery img');
            const button = document.getElementById('txt2img_generate');
            const info = document.getElementById('html_info_txt2img').innerText;
            return img && img.src !== before && button.offsetParent !== null && info.includes('X/Y/Z plot');
        }""", arg=before, timeout=180_000)
    screenshot(page, "xyz-02-grid")
    log = page.locator("#html_log_txt2img").inner_text()
    assert "Error" not in log, log
    info = page.locator("#html_info_txt2img").inner_text()
    assert "X Type: Checkpoint name" in info and "Y Type: Seed" in info

    grid_file = newest_grid(ui_server.data_dir)
    params = parse_infotext(read_infotext(grid_file))
    assert params["Script"] == "X/Y/Z plot" and params["Y Values"] == "1, 2"
    # the dropdown offers titles ("name [hash]"), so a pasted grid finds the same files again
    assert [title.split(" [")[0] for title in params["X Values"].split(", ")] == CHECKPOINTS
    with Image.open(grid_file) as grid:
        pixels = np.asarray(grid.convert("RGB"))
    # Three columns and two rows of 64x64 images under the checkpoint labels, the seed labels on the left.
    assert pixels.shape[1] > 3 * 64 and pixels.shape[0] > 2 * 64
    cells = pixels[-128:, -192:]
    assert cells.std() > 5, "the cells hold generated images"
