"""The Train tab in a real browser: the dataset check names a bad file, a short LoRA run shows its loss plot
and sample images, and its saved settings load back into the tab.

Screenshots go to /tmp/ui-shots (ui-train-dataset, ui-train-run).
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from tests.engine.test_training import write_dataset
from tests.helpers import SD15
from tests.ui.helpers import FAST_DEFAULTS, fill_number, screenshot, start_ui_server

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tiny_models, tmp_path_factory):
    """The UI on the tiny models, with its own empty Lora folder (runs write there) and a dataset holding a
    broken image and an image without a caption beside four good ones."""
    models = tmp_path_factory.mktemp("train_ui_models")
    for folder in tiny_models.iterdir():
        if folder.name != "Lora":
            (models / folder.name).symlink_to(folder, target_is_directory=folder.is_dir())
    (models / "Lora").mkdir()
    data = tmp_path_factory.mktemp("train_ui_data")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    pictures = write_dataset(data / "pictures")
    (pictures / "broken.png").write_bytes(b"not a picture at all")
    (pictures / "broken.txt").write_text("sks, broken")
    Image.new("RGB", (64, 96), (10, 200, 10)).save(pictures / "uncaptioned.png")
    running = start_ui_server(models, data)
    yield running
    running.server.close()


def open_train(page) -> None:
    page.locator("button[role=tab]:has-text('Train')").first.click()
    page.locator("#train_start").wait_for()


def fill_text(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def open_group(page, title: str) -> None:
    page.locator(f"button:has-text('{title}'), span:has-text('{title}')").first.click()
    page.wait_for_timeout(300)


def test_check_dataset_names_the_bad_files(page, ui_server):
    open_train(page)
    fill_text(page, "train_dataset", "pictures")
    page.locator("#train_check").click()
    report = page.locator("#train_dataset_report textarea")
    page.wait_for_function(
        "() => (document.querySelector('#train_dataset_report textarea')?.value ?? '').includes('problems')")
    text = report.input_value()
    assert "4 usable images (6 per epoch with repeats)" in text, text
    assert "- broken.png: cannot be read as an image" in text, text
    assert "- uncaptioned.png: no caption (uncaptioned.txt not found)" in text, text
    assert page.locator("#train_dataset_images").get_by_text("red_circle.png").count() == 1
    screenshot(page, "ui-train-dataset")

    # A folder outside the allowed ones is refused by name, as the API does.
    fill_text(page, "train_dataset", "../..")
    page.locator("#train_check").click()
    page.get_by_text(re.compile(r"dataset: \.\./\.\. is outside the allowed folders")).first.wait_for()


def test_a_short_run_shows_its_loss_plot_and_samples_and_its_settings_load_back(page, ui_server):
    open_train(page)
    assert page.locator("#train_name input, #train_name textarea").first.input_value() == ""  # no default name
    fill_text(page, "train_name", "ui-run")
    fill_text(page, "train_dataset", "pictures")
    page.locator("#train_checkpoint input").first.click()
    page.get_by_role("option", name=re.compile(re.escape(SD15) + r" \[")).click()
    fill_number(page, "train_steps", 4)
    fill_number(page, "train_learning_rate", 0.01)
    open_group(page, "Network")
    fill_number(page, "train_rank", 4)
    fill_number(page, "train_alpha", 4)
    open_group(page, "Images and captions")
    fill_number(page, "train_resolution", 64)
    open_group(page, "Saves and samples")
    fill_number(page, "train_sample_every", 2)
    fill_number(page, "train_sample_steps", 2)
    fill_text(page, "train_sample_prompts", "sks, red circle")

    page.locator("#train_start").click()
    page.wait_for_function("() => (document.querySelector('#train_progress')?.innerText ?? '').includes('done')",
                           timeout=300_000)
    progress = page.locator("#train_progress").inner_text()
    assert "step 4/4" in progress and "it/s" in progress and "loss " in progress, progress
    # The plot draws the four losses; the gallery shows the samples of steps 2 and 4.
    page.locator("#train_loss_plot canvas, #train_loss_plot svg").first.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('#train_gallery img')]"
                           ".filter(img => img.complete && img.naturalWidth === 64).length === 2")
    captions = page.locator("#train_gallery").inner_text()
    assert "step 2: sks, red circle" in captions and "step 4: sks, red circle" in captions, captions

    ctx = ui_server.ctx
    folder = ctx.engine.paths.outputs_dir / "train" / "ui-run"
    csv_path = page.locator("#train_loss_csv textarea, #train_loss_csv input").first.input_value()
    assert csv_path == str(folder / "loss.csv")
    rows = (folder / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,time" and [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4"]
    samples = sorted((folder / "samples").glob("*.png"))
    assert [path.name for path in samples] == ["step00000002-00.png", "step00000004-00.png"]
    with Image.open(samples[0]) as sample:
        assert "LoRA training: ui-run step 2" in sample.info["parameters"]
    lora_dir = ctx.engine.paths.model_dirs("lora")[0]
    assert (lora_dir / "ui-run.safetensors").is_file()
    saved = json.loads((lora_dir / "ui-run.train.json").read_text())
    assert (saved["steps"], saved["rank"], saved["resolution"], saved["sample_every"]) == (4, 4, 64, 2)
    screenshot(page, "ui-train-run")

    # The saved settings load back into the tab, over values changed since.
    fill_number(page, "train_steps", 9)
    fill_number(page, "train_rank", 8)
    page.locator("#train_load_refresh").click()
    page.wait_for_timeout(500)
    page.locator("#train_load input").first.click()
    page.get_by_role("option", name="ui-run", exact=True).click()
    page.wait_for_function("() => document.querySelector('#train_steps input[type=number]').value === '4'")
    assert page.locator("#train_rank input[type=number]").first.input_value() == "4"
    assert page.locator("#train_sample_prompts textarea").input_value() == "sks, red circle"
