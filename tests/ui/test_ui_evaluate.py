"""The Evaluate tab in a browser: a small run (2 checkpoints x 2 prompts x 1 seed, SSIM and PSNR against the
prompt file's reference images) shows the table, the chart and the contact sheets; a bad field is an error."""

from __future__ import annotations

import csv
import re

import pytest
from playwright.sync_api import expect

from tests.engine.test_evaluation_metrics import shapes
from tests.helpers import SD15, SD21
from tests.ui.helpers import fill_number, screenshot

pytestmark = pytest.mark.browser


def open_tab(page) -> None:
    page.locator("button[role=tab]:has-text('Evaluate')").first.click()
    page.locator("#evaluate_run").wait_for(state="visible")


def pick_checkpoints(page, *names: str) -> None:
    """Type each name into the multi-select and take the one option left."""
    box = page.locator("#evaluate_checkpoints input")
    for name in names:
        box.click()
        box.fill(name)
        option = page.get_by_role("option", name=re.compile(re.escape(name) + r" \["))
        expect(option).to_have_count(1)
        box.press("Enter")
        expect(page.locator("#evaluate_checkpoints")).to_contain_text(name)
    page.keyboard.press("Escape")


def small_run(page) -> None:
    pick_checkpoints(page, SD15, SD21)
    page.locator("#evaluate_prompt_set textarea, #evaluate_prompt_set input").first.fill("prompts/set.csv")
    page.locator("#evaluate_seeds textarea, #evaluate_seeds input").first.fill("5")
    metrics = page.locator("#evaluate_metrics")
    for label in ("CLIP score", "Inception Score"):
        metrics.get_by_label(label, exact=True).uncheck()
    for label in ("SSIM", "PSNR (dB)"):
        metrics.get_by_label(label, exact=True).check()
    page.get_by_label("Sampling method").last.click()
    page.get_by_role("option", name="Euler", exact=True).click()
    for elem_id, value in (("evaluate_steps", 2), ("evaluate_width", 64), ("evaluate_height", 64)):
        fill_number(page, elem_id, value)


def test_a_small_evaluation_shows_the_table_the_chart_and_the_sheets(page, ui_server):
    prompts = ui_server.data_dir / "prompts"
    prompts.mkdir(exist_ok=True)
    with (prompts / "set.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "reference"])
        for k, image in enumerate(shapes(11, 2)):
            image.save(prompts / f"ref{k}.png")
            writer.writerow([f"a picture number {k}", f"ref{k}.png"])
    open_tab(page)
    small_run(page)
    page.locator("#evaluate_run").click()
    expect(page.locator("#evaluate_progress")).to_contain_text("Done in", timeout=240_000)
    table = page.locator("#evaluate_table")
    expect(table).to_contain_text("SSIM")
    expect(table).to_contain_text("PSNR (dB)")
    expect(table).to_contain_text("tiny-sd15.safetensors")
    expect(table).to_contain_text("tiny-sd21-v.safetensors")
    expect(table).to_contain_text("★")
    page.locator("#evaluate_chart img").wait_for()
    assert page.locator("#evaluate_chart img").evaluate("img => img.naturalWidth") > 200
    expect(page.locator("#evaluate_sheets img")).to_have_count(2, timeout=30_000)
    screenshot(page, "evaluate-results")
    runs = list((ui_server.data_dir / "outputs" / "evaluations").glob("*/results.json"))
    assert len(runs) == 1


def test_a_prompt_file_outside_the_allowed_folders_is_an_error(page, ui_server):
    open_tab(page)
    pick_checkpoints(page, SD15)
    page.locator("#evaluate_prompt_set textarea, #evaluate_prompt_set input").first.fill("/etc/passwd")
    page.locator("#evaluate_run").click()
    expect(page.locator(".toast-body, .toast-wrap").first).to_contain_text("prompt_set", timeout=30_000)


def test_upscalers_are_compared_against_the_sources_and_missing_lpips_weights_are_named(page, ui_server):
    sources = ui_server.data_dir / "upscale-sources"
    sources.mkdir(exist_ok=True)
    for k, image in enumerate(shapes(12, 2)):
        image.save(sources / f"source{k}.png")
    open_tab(page)
    page.locator("#evaluate_mode").get_by_label("Upscalers").check()
    metrics = page.locator("#evaluate_metrics")
    for label in ("SSIM", "PSNR (dB)", "LPIPS"):  # the mode ticks the fidelity metrics
        expect(metrics.get_by_label(label, exact=True)).to_be_checked()
    expect(metrics.get_by_label("CLIP score", exact=True)).not_to_be_checked()
    page.locator("#evaluate_source_dir textarea, #evaluate_source_dir input").first.fill("upscale-sources")
    fill_number(page, "evaluate_upscale_by", 2)
    box = page.locator("#evaluate_upscalers input")
    for name in ("Lanczos", "Nearest"):
        box.click()
        box.fill(name)
        page.get_by_role("option", name=name, exact=True).click()
        expect(page.locator("#evaluate_upscalers")).to_contain_text(name)
    page.keyboard.press("Escape")
    page.locator("#evaluate_run").click()
    expect(page.locator("#evaluate_progress")).to_contain_text("Done in", timeout=240_000)
    table = page.locator("#evaluate_table")
    for text in ("Lanczos", "Nearest", "SSIM", "PSNR (dB)", "★"):
        expect(table).to_contain_text(text)
    # no LPIPS weights on this server: the message names the file, the other metrics ran
    expect(page.locator("#evaluate_messages")).to_contain_text("alexnet-owt-7be5be79.pth")
    expect(page.locator("#evaluate_sheets img")).to_have_count(2, timeout=30_000)


def test_the_train_tabs_evaluate_button_needs_a_run_from_the_page(page, ui_server):
    """The button queues "Evaluate this run" for the page's training run (POST /sdapi/v1/train/{id}/evaluate's
    path, tested in tests/api/test_evaluate_training_api.py); without a run it says so."""
    page.locator("button[role=tab]:has-text('Train')").first.click()
    page.locator("#train_evaluate").click()
    page.get_by_text("Evaluate this run: no training run started from this page").first.wait_for(timeout=30_000)
