"""The web UI in a real browser (headless Debian Chromium) against the real server on the tiny models.

Without Chromium the browser tests skip; `apt-get install -y chromium` enables them (.ci/run does).
Screenshots go to /tmp/ui-shots.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.images.saving import read_infotext
from pipelines.request import GenerationRequest
from tests.ui.helpers import fill_number, paint_stroke_and_generate, screenshot, start_ui_server

pytestmark = pytest.mark.browser

TINY = "tiny-sd15.safetensors"
#: The queue line's own text: Gradio keeps an invisible (opacity 0) timer of the status refresh beside it.
QUEUE_STATUS = "#queue_status .html-container"


def choose_checkpoint(page, name: str) -> None:
    page.locator("#setting_sd_model_checkpoint input").click()
    page.get_by_role("option", name=re.compile(re.escape(name) + r" \[")).click()


def generate_and_wait(page, tab: str, *, shortcut: bool = False) -> str:
    """Press Generate (or Ctrl+Enter in the prompt), wait for the job to end, return the infotext."""
    before = page.evaluate("tab => document.querySelector(`#${tab}_gallery img`)?.src ?? null", tab)
    if shortcut:
        page.locator(f"#{tab}_prompt textarea").press("Control+Enter")
    else:
        page.locator(f"#{tab}_generate").click()
    # Done when the gallery shows a new file and Generate is back. Interrupt is not awaited: a tiny job
    # may end before the browser is looked at.
    page.wait_for_function(
        """([tab, before]) => {
            const img = document.querySelector(`#${tab}_gallery img`);
            const button = document.getElementById(`${tab}_generate`);
            const info = document.getElementById(`html_info_${tab}`).innerText;
            return img && img.src !== before && button.offsetParent !== null && !/^\\d+(\\.\\d+)?s/.test(info);
        }""", arg=[tab, before], timeout=90_000)
    log = page.locator(f"#html_log_{tab}").inner_text()
    assert "Error" not in log, log
    page.locator(f"#{tab}_gallery img").first.wait_for()
    return page.locator(f"#html_info_{tab}").inner_text()


def newest_output(data_dir: Path, mode: str) -> Path:
    files = sorted((data_dir / "outputs" / f"{mode}-images").rglob("*.png"), key=lambda p: p.stat().st_mtime)
    assert files, f"no {mode} image was saved"
    return files[-1]


def number_value(page, elem_id: str) -> float:
    return float(page.locator(f"#{elem_id} input[type=number]").first.input_value())


@pytest.fixture
def clip_skip_restored(ui_server):
    """Clip skip is kept server-wide (as A1111's quicksettings): back to 1 for the next tests."""
    yield
    ui_server.ctx.update_options({"CLIP_stop_at_last_layers": 1})


def test_txt2img_img2img_and_png_info_round_trip(page, ui_server, clip_skip_restored):
    screenshot(page, "01-start")
    assert page.locator("#no_model_notice").is_hidden()
    choose_checkpoint(page, TINY)
    page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
    page.locator("#txt2img_neg_prompt textarea").fill("blurry")
    page.locator("#txt2img_seed input").fill("1234")
    # Values other than the page's defaults, so that pasting them back later shows something.
    page.locator("#txt2img_sampling input").click()
    page.get_by_role("option", name="DDIM", exact=True).click()
    fill_number(page, "txt2img_steps", 4)
    fill_number(page, "txt2img_width", 96)
    fill_number(page, "txt2img_cfg_scale", 5)
    fill_number(page, "setting_CLIP_stop_at_last_layers", 2)
    deadline = time.monotonic() + 30
    while ui_server.ctx.options.CLIP_stop_at_last_layers != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ui_server.ctx.options.CLIP_stop_at_last_layers == 2  # kept server-wide, as A1111's quicksettings
    # "a photo of a cat" is 5 tokens of 75.
    page.wait_for_function("() => document.querySelector('#txt2img_token_counter').innerText.includes('5/75')")

    info = generate_and_wait(page, "txt2img", shortcut=True)
    screenshot(page, "02-txt2img-result")
    assert info.startswith("a photo of a cat")
    assert "Negative prompt: blurry" in info
    for part in ("Steps: 4", "Sampler: DDIM", "CFG scale: 5", "Seed: 1234", "Size: 96x64", "Model: tiny-sd15",
                 "Clip skip: 2"):
        assert part in info
    saved = newest_output(ui_server.data_dir, "txt2img")
    assert read_infotext(saved).replace("\n", " ") == info.replace("\n", " ")

    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#img2img_image img").wait_for()
    assert page.locator("#img2img_prompt textarea").input_value() == "a photo of a cat"
    info2 = generate_and_wait(page, "img2img")
    screenshot(page, "03-img2img-result")
    assert "Denoising strength: 0.75" in info2 and "Seed: 1234" in info2

    # Inpaint with a mask drawn in the browser: send the result to Inpaint and paint a stroke over it.
    page.locator("#img2img_send_to_inpaint").click()
    canvas = page.locator("#img2maskimg canvas").first
    canvas.wait_for()
    info3 = paint_stroke_and_generate(page, canvas, across=(0.5, 0.6), settle_ms=500)
    screenshot(page, "03b-inpaint-drawn")
    assert "Mask blur: 4" in info3, info3

    # A fresh page with another checkpoint and clip skip: every value must come back from the image.
    page.reload()
    page.locator("#txt2img_generate").wait_for()
    choose_checkpoint(page, "tiny-sd21-v.safetensors")
    fill_number(page, "setting_CLIP_stop_at_last_layers", 1)
    # The top bar's choices are kept (config.json) for the next start, as A1111's quicksettings are.
    def kept() -> bool:
        saved = json.loads(ui_server.ctx.options_path.read_text())
        return saved["sd_model_checkpoint"].startswith("tiny-sd21-v.safetensors [") \
            and saved["CLIP_stop_at_last_layers"] == 1

    deadline = time.monotonic() + 30
    while not kept() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kept()
    assert number_value(page, "txt2img_steps") == 3 and page.locator("#txt2img_sampling input").input_value() == "Euler"
    page.locator("#tab_pnginfo-button, button[role=tab]:has-text('PNG Info')").first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    page.locator("#pnginfo_parameters").wait_for()
    screenshot(page, "04-png-info")
    page.locator("#pnginfo_send_to_txt2img").click()
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'a photo of a cat'")
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "blurry"
    assert number_value(page, "txt2img_steps") == 4
    assert number_value(page, "txt2img_seed") == 1234
    assert number_value(page, "txt2img_width") == 96 and number_value(page, "txt2img_height") == 64
    assert number_value(page, "txt2img_cfg_scale") == 5
    assert number_value(page, "setting_CLIP_stop_at_last_layers") == 2
    assert page.locator("#txt2img_sampling input").input_value() == "DDIM"
    assert page.locator("#txt2img_scheduler input").input_value() == "Automatic"
    assert TINY in page.locator("#setting_sd_model_checkpoint input").input_value()
    screenshot(page, "05-sent-to-txt2img")


def test_inpaint_with_uploaded_mask_keeps_unmasked_pixels(page, ui_server, tmp_path):
    choose_checkpoint(page, TINY)
    base = np.zeros((64, 64, 3), dtype=np.uint8)
    base[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    base[..., 2] = 200
    Image.fromarray(base).save(tmp_path / "base.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 40:] = 255  # redraw the right part only
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")

    page.locator("button[role=tab]:has-text('img2img')").first.click()
    page.locator("#img2img_inpaint_upload_tab-button, button[role=tab]:has-text('Inpaint upload')").first.click()
    page.locator("#img_inpaint_base input[type=file]").set_input_files(str(tmp_path / "base.png"))
    page.locator("#img_inpaint_mask input[type=file]").set_input_files(str(tmp_path / "mask.png"))
    page.locator("#img_inpaint_mask img").wait_for()
    page.locator("#img2img_prompt textarea").fill("a red ball")
    page.locator("#img2img_denoising_strength input[type=number]").fill("1")
    page.locator("#img2img_mask_blur input[type=number]").fill("0")
    page.locator("#img2img_mask_blur input[type=number]").press("Tab")
    info = generate_and_wait(page, "img2img")
    screenshot(page, "06-inpaint-upload")
    assert "Mask blur: 0" in info and "Denoising strength: 1" in info
    out = np.asarray(Image.open(newest_output(ui_server.data_dir, "img2img")).convert("RGB")).astype(int)
    assert np.abs(out[:, :32] - base[:, :32]).max() <= 2, "pixels outside the mask must be the original's"
    assert np.abs(out[:, 48:] - base[:, 48:]).mean() > 10, "the masked part must be redrawn"


def test_interrupt_a_long_job(page, ui_server):
    choose_checkpoint(page, TINY)
    page.locator("#txt2img_steps input[type=number]").fill("150")
    page.locator("#txt2img_batch_count input[type=number]").fill("16")
    page.locator("#txt2img_batch_count input[type=number]").press("Tab")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => /Step \\d+\\/150/.test(document.querySelector('#txt2img_progress').innerText)")
    assert page.locator("#txt2img_skip").is_visible()
    screenshot(page, "07-running")
    page.wait_for_timeout(1500)  # a tick or two of the status timer: this user's own job is not "another job"
    assert page.locator(QUEUE_STATUS).inner_text().strip() == ""
    started = time.monotonic()
    page.locator("#txt2img_interrupt").click()
    page.locator("#txt2img_generate").wait_for(state="visible", timeout=30_000)
    assert time.monotonic() - started < 30
    page.wait_for_function("() => document.querySelector('#html_log_txt2img').innerText.includes('Interrupted')")
    assert ui_server.ctx.queue.running is None
    # Interrupt keeps work: the image of the interrupted step is shown (decoded from its latents)
    page.locator("#txt2img_gallery img").first.wait_for(timeout=30_000)
    notes = page.locator("#html_log_txt2img").inner_text()
    assert "shown as it was at the interrupted step" in notes and "Interrupted: 0 of" not in notes, notes


def test_settings_and_ui_defaults_are_saved(page, ui_server):
    page.locator("button[role=tab]:has-text('Settings')").first.click()
    fill_number(page, "setting_show_progress_every_n_steps", 2)
    page.locator("#settings_submit").click()
    page.wait_for_function("() => document.querySelector('#settings_result').innerText.includes('saved')")
    saved = json.loads((ui_server.data_dir / "config.json").read_text())
    assert saved["show_progress_every_n_steps"] == 2 and ui_server.ctx.options.show_progress_every_n_steps == 2
    page.locator("#ui_defaults_submit").click()
    page.wait_for_function("() => document.querySelector('#settings_result').innerText.includes('UI defaults')")
    defaults = json.loads((ui_server.data_dir / "ui-config.json").read_text())
    assert defaults["txt2img/Sampling steps/value"] == 3 and defaults["img2img/Width/value"] == 64
    screenshot(page, "08-settings")


def test_queued_job_shows_its_position_and_can_be_cancelled(ui_server):
    from webui.ui.jobs import Session, run_job

    release = threading.Event()
    holder = threading.Thread(target=ui_server.ctx.queue.run, args=(lambda _c: release.wait(30),),
                              kwargs={"source": "api", "description": "an API job"})
    holder.start()
    try:
        while ui_server.ctx.queue.running is None:
            time.sleep(0.01)
        session = Session()
        updates = run_job(ui_server.ctx, session, GenerationRequest(prompt="x", width=64, height=64, steps=1))
        first = next(updates)
        assert "In queue: position 1" in first.progress_html and "API job is running" in first.progress_html
        session.stop(ui_server.ctx.queue)
        last = list(updates)[-1]
        assert "Cancelled before it started" in last.progress_html
    finally:
        release.set()
        holder.join()


def test_app_without_models_says_where_to_put_one(tmp_path, monkeypatch):
    from pipelines.options import Options
    from webui.ui.download import network_problem

    models = tmp_path / "models"
    running = start_ui_server(models, tmp_path / "data", "--api", "--cors-allow-origins", "https://allowed.example")
    try:
        config = httpx.get(running.url + "config", timeout=10).text
        assert "No checkpoint found" in config
        assert str(models / "Stable-diffusion") in config
        # --api mounts the A1111 API on the same server, with its docs and a schema of the API routes only.
        assert httpx.get(running.url + "sdapi/v1/sd-models", timeout=10).json() == []
        docs = httpx.get(running.url + "docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text
        paths = httpx.get(running.url + "openapi.json", timeout=10).json()["paths"]
        assert "/sdapi/v1/txt2img" in paths and not any(path.startswith(("/login", "/config", "/gradio_api"))
                                                        for path in paths)
        # --cors-allow-origins: a page of the allowed site may call the server; another site may not.
        preflight = {"Access-Control-Request-Method": "POST"}
        for origin, allowed in (("https://allowed.example", True), ("https://evil.example", False)):
            answer = httpx.options(running.url + "sdapi/v1/txt2img", headers={"Origin": origin, **preflight})
            assert (answer.headers.get("access-control-allow-origin") == origin) is allowed, answer.headers
    finally:
        running.server.close()
    # Offline, the download button explains itself instead of trying (tests never download).
    assert "HF_HUB_OFFLINE" in network_problem(Options().default_model_url)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    problem = network_problem("https://127.0.0.1:9/model.safetensors", timeout=1)
    assert problem and "127.0.0.1:9 cannot be reached" in problem


def test_notes_of_an_interrupted_or_skipped_job():
    from pipelines.processing import GenerationResult
    from webui.ui.generation import result_notes

    plain = GenerationRequest(prompt="x", batch_size=2, n_iter=2)
    result = GenerationResult(request=plain, model_title="m", images=[Image.new("RGB", (8, 8))] * 3,
                              warnings=["a warning"], interrupted=True, seconds=1.5)
    assert result_notes(plain, result) == [
        "a warning", "Interrupted: 3 of 4 images; the last batch is shown as it was at the interrupted step.",
        "Time taken: 1.50 s"]
    # a script's result holds grids and cells of several jobs: it reports its own progress
    scripted = plain.model_copy(update={"script_name": "X/Y/Z plot"})
    assert result_notes(scripted, result)[1] == "Interrupted: what the script finished is shown."
    result.interrupted = False
    assert result_notes(plain, result) == ["a warning", "Time taken: 1.50 s"]
    # Skip keeps the skipped batch's images and says so
    result.skipped_batches = [0]
    assert result_notes(plain, result)[1] == "Skipped batch 1 of 2: its images are shown as they were when skipped."


def test_gradio_auth_parsing(tmp_path):
    from webui.flags import parse_flags
    from webui.ui import parse_auth

    logins = tmp_path / "logins.txt"
    logins.write_text("carol:secret\ndave:pw2,erin:pw3\n")
    flags = parse_flags(["--gradio-auth", "alice:a1,bob:b:2", "--gradio-auth-path", str(logins)], environ={})
    assert parse_auth(flags) == [("alice", "a1"), ("bob", "b:2"), ("carol", "secret"), ("dave", "pw2"),
                                 ("erin", "pw3")]
    with pytest.raises(ValueError, match="user:password"):
        parse_auth(parse_flags(["--gradio-auth", "nopassword"], environ={}))


def test_token_counter_works_before_any_model_is_loaded(tmp_path):
    from webui.context import AppContext
    from webui.flags import parse_flags
    from webui.ui.tokens import TokenCounter

    ctx = AppContext.create(parse_flags(["--data-dir", str(tmp_path), "--use-cpu", "all"], {}))
    assert ctx.engine.models.current is None
    counter = TokenCounter(ctx)
    assert counter.count("a photo of a cat") == (5, 75)
    assert counter.count(", ".join(["a red apple"] * 30)) == (119, 150)


def test_extras_upscales_a_sent_image_x2_and_keeps_its_infotext(page, ui_server):
    choose_checkpoint(page, TINY)
    page.locator("#txt2img_prompt textarea").fill("a red barn")
    page.locator("#txt2img_seed input").fill("99")
    generate_and_wait(page, "txt2img")
    page.locator("#txt2img_send_to_extras").click()
    page.locator("#extras_image img").wait_for()
    page.locator("#extras_upscaler_1 input").click()
    page.get_by_role("option", name="tiny-esrgan-4x").click()
    page.locator("#extras_generate").click()
    page.wait_for_function("() => document.getElementById('html_info_extras').innerText.includes('image(s)')",
                           timeout=90_000)
    page.locator("#extras_gallery img").first.wait_for()
    screenshot(page, "06-extras-result")
    info = page.locator("#html_info_extras").inner_text()
    assert "1 image(s), 128x128" in info and "Postprocess upscaler: tiny-esrgan-4x" in info
    saved = newest_output(ui_server.data_dir, "extras")
    with Image.open(saved) as image:
        assert image.size == (128, 128)
    text = read_infotext(saved)
    assert text.startswith("a red barn") and "Seed: 99" in text and "Postprocess upscale by: 2" in text


def test_extras_batch_from_directory_scales_to_size(page, ui_server):
    folder = ui_server.data_dir / "extras-in"  # inside the data dir: the only folders the tab may read
    folder.mkdir()
    for k, size in enumerate(((40, 30), (24, 24))):
        Image.new("RGB", size, (40 * k, 90, 200)).save(folder / f"{k}.png")
    page.locator("button[role=tab]:has-text('Extras')").first.click()
    page.locator("button[role=tab]:has-text('Batch from Directory')").first.click()
    page.locator("#extras_batch_input_dir textarea").fill(str(folder))
    page.locator("button[role=tab]:has-text('Scale to')").first.click()
    fill_number(page, "extras_upscaling_resize_w", 50)
    fill_number(page, "extras_upscaling_resize_h", 20)
    page.locator("#extras_upscaler_1 input").click()
    page.get_by_role("option", name="Lanczos").click()
    page.locator("#extras_generate").click()
    page.wait_for_function("() => document.getElementById('html_info_extras').innerText.includes('image(s)')",
                           timeout=90_000)
    assert "2 image(s), 50x20" in page.locator("#html_info_extras").inner_text()


def test_hires_fix_from_the_txt2img_tab(page, ui_server):
    choose_checkpoint(page, TINY)
    page.locator("#txt2img_prompt textarea").fill("a tall tower")
    page.locator("#txt2img_hr").click()  # open the accordion
    page.locator("#txt2img_enable_hr input[type=checkbox]").check()
    page.locator("#txt2img_hires_steps input[type=number]").fill("2")
    page.locator("#txt2img_hires_steps input[type=number]").press("Tab")
    page.locator("#txt2img_hr_sampler input").click()
    page.get_by_role("option", name="Euler a", exact=True).click()
    page.locator("#txt2img_hr_prompt textarea").fill("a tall tower, sharp")
    info = generate_and_wait(page, "txt2img")
    screenshot(page, "11-hires")
    assert "Size: 64x64" in info and "Hires upscale: 2" in info and "Hires upscaler: Latent" in info
    assert "Hires sampler: Euler a" in info and 'Hires prompt: "a tall tower, sharp"' in info
    assert "Hires checkpoint" not in info  # "Use same checkpoint" is the default
    saved = newest_output(ui_server.data_dir, "txt2img")
    assert Image.open(saved).size == (128, 128)


def test_one_click_final_size_preset(page, ui_server):
    choose_checkpoint(page, TINY)
    page.locator("#txt2img_hr").click()
    page.locator("#txt2img_hr_final_preset").click()
    page.wait_for_function("() => document.querySelector('#txt2img_hr_resize_x input[type=number]').value == '2048'")
    assert page.locator("#txt2img_enable_hr input[type=checkbox]").is_checked()
    assert number_value(page, "txt2img_denoising_strength") == 0
    assert number_value(page, "txt2img_hr_resize_y") == 2048
    assert "tiny-esrgan-4x" in page.locator("#txt2img_hr_upscaler input").input_value()


def test_paste_keeps_the_checkpoint_when_the_image_names_an_unknown_one(ui_server):
    import gradio as gr

    from webui.ui.paste import PasteTarget, find_model, paste_updates

    ctx = ui_server.ctx
    model, warning = find_model(ctx, {"sd_model_hash": "deadbeef00", "sd_model_name": "nowhere"})
    assert model is None and "nowhere [deadbeef00]" in warning and "not in your models folder" in warning
    known = ctx.engine.registry.find_checkpoint(TINY)
    assert find_model(ctx, {"sd_model_hash": known.short_hash, "sd_model_name": "renamed"}) == (known, None)

    prompt, checkpoint = gr.Textbox(), gr.Dropdown()
    target = PasteTarget({"prompt": prompt}, checkpoint)
    with pytest.warns(UserWarning, match="not in your models folder"):
        updates = paste_updates(ctx, "a cat\nSteps: 3, Model hash: deadbeef00, Model: nowhere", target)
    assert updates[prompt]["value"] == "a cat" and checkpoint not in updates  # no switch


def test_api_docs_render_with_no_network(browser, tmp_path):
    """/docs is Swagger UI served by the app itself: it renders every route with the internet cut off."""
    running = start_ui_server(tmp_path / "models", tmp_path / "data", "--api")
    context = browser.new_context()
    outside: list[str] = []

    def local_only(route) -> None:
        if route.request.url.startswith(running.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        context.route("**/*", local_only)
        tab = context.new_page()
        tab.goto(running.url + "docs")
        tab.locator(".opblock-summary-path", has_text="/sdapi/v1/txt2img").first.wait_for(timeout=30_000)
        assert tab.locator(".opblock").count() > 20
        screenshot(tab, "13-api-docs")
        assert not outside, outside
    finally:
        context.close()
        running.server.close()


def test_queue_status_shows_an_api_job_while_it_runs(page, ui_server):
    release = threading.Event()

    def job(control) -> None:
        control.start(1, 20)
        control.update(step=3)
        release.wait(30)

    holder = threading.Thread(target=ui_server.ctx.queue.run, args=(job,),
                              kwargs={"source": "api", "description": "an API job"})
    holder.start()
    try:
        page.wait_for_function(
            f"() => document.querySelector('{QUEUE_STATUS}').innerText.includes('An API job is running: step 3/20')",
            timeout=15_000)
        screenshot(page, "12-api-job-running")
    finally:
        release.set()
        holder.join()
    page.wait_for_function(f"() => document.querySelector('{QUEUE_STATUS}').innerText.trim() === ''", timeout=15_000)


def test_swap_reuse_seed_styles_and_zip(page, ui_server):
    import csv
    import io
    import zipfile

    choose_checkpoint(page, TINY)
    fill_number(page, "txt2img_width", 96)
    page.locator("#txt2img_res_switch_btn").click()
    page.wait_for_function("""() => {
        const value = id => document.querySelector(`#${id} input[type=number]`).value;
        return value('txt2img_width') === '64' && value('txt2img_height') === '96';
    }""")

    # Save the prompts as a style: styles.csv gets the row, the Styles list offers it.
    page.locator("#txt2img_prompt textarea").fill("a lighthouse")
    page.locator("#txt2img_neg_prompt textarea").fill("fog")
    page.get_by_text("Save prompts as a style").click()
    page.locator("#txt2img_style_name textarea, #txt2img_style_name input").first.fill("coastal")
    page.locator("#txt2img_style_save").click()
    styles_file = ui_server.data_dir / "styles.csv"
    deadline = time.monotonic() + 30
    while not (styles_file.is_file() and "coastal" in styles_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(styles_file.read_text()))}
    assert rows["coastal"]["prompt"] == "a lighthouse" and rows["coastal"]["negative_prompt"] == "fog"
    # Apply it to other prompts: they become what the engine's style rules make of them, the selection clears.
    page.locator("#txt2img_prompt textarea").fill("at night")
    page.locator("#txt2img_neg_prompt textarea").fill("")
    page.locator("#txt2img_styles input").click()
    page.get_by_role("option", name="coastal").click()
    page.locator("#txt2img_style_apply").click()
    expected = ui_server.ctx.engine.styles.apply("at night", "", ["coastal"])
    page.wait_for_function("text => document.querySelector('#txt2img_prompt textarea').value === text",
                           arg=expected[0])
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == expected[1] == "fog"

    # A random seed, then reuse it: the seed box gets the seed of the image shown.
    fill_number(page, "txt2img_batch_size", 2)
    page.locator("#txt2img_seed input").fill("-1")
    info = generate_and_wait(page, "txt2img")
    seed = int(re.search(r"Seed: (\d+)", info).group(1))
    assert "Size: 64x96" in info
    page.locator("#txt2img_reuse_seed").click()
    page.wait_for_function("seed => document.querySelector('#txt2img_seed input').value === String(seed)", arg=seed)

    # Zip: a download with both images of the batch, each with its infotext.
    page.locator("#txt2img_save_zip").click()
    link = page.locator("#txt2img_download_files a[href]").first
    link.wait_for()
    href = link.get_attribute("href")
    data = httpx.get(href if href.startswith("http") else ui_server.url.rstrip("/") + href, timeout=30).content
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert len(names) == 2 and all(name.endswith(".png") for name in names)
        seeds = sorted(int(re.search(r"Seed: (\d+)", read_infotext(archive.read(name))).group(1))
                       for name in names)
    assert seeds == [seed, seed + 1]
    screenshot(page, "13-styles-seed-zip")


def test_refresh_lists_new_checkpoints_and_upscalers_in_every_dropdown(page, ui_server):
    import shutil

    from tests.fixtures.tiny_upscalers import write_tiny_esrgan

    folder = ui_server.ctx.engine.registry.paths.model_dirs("checkpoint")[0]
    added = folder / "tiny-added-later.safetensors"
    shutil.copyfile(folder / TINY, added)
    upscaler = write_tiny_esrgan(ui_server.ctx.engine.paths.model_dirs("esrgan")[0] / "added-later-2x.pth", 2)
    checkpoint = r"tiny-added-later\.safetensors \["
    new_options = {"#setting_sd_model_checkpoint": checkpoint, "#txt2img_hr_checkpoint": checkpoint,
                   "#txt2img_hr_upscaler": "added-later-2x"}
    try:
        page.locator("#txt2img_hr").click()
        page.locator("#refresh_sd_model_checkpoint").click()
        for dropdown, option in new_options.items():
            page.locator(f"{dropdown} input").click()
            page.locator(dropdown).get_by_role("option", name=re.compile(option)).wait_for(timeout=20_000)
            page.locator(f"{dropdown} input").press("Escape")
    finally:
        added.unlink()
        upscaler.unlink()
        ui_server.ctx.engine.registry.refresh()
        ui_server.ctx.engine.upscalers.refresh()
