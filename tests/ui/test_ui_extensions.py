"""Extensions in the browser: the example's accordion, its argument in the job, pasting it back, the Script
dropdown, and a broken UI builder that leaves the page working.

Without Chromium these tests skip, as tests/ui/test_ui.py does.
"""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from playwright.sync_api import expect

from tests.ui.helpers import FAST_DEFAULTS, fill_number, screenshot, start_ui_server
from tests.ui.test_ui import TINY, choose_checkpoint, generate_and_wait, newest_output, number_value
from webui.extensions import ROOT

pytestmark = pytest.mark.browser

# A selectable script with a textbox: its value replaces the prompt of the one job it runs.
REPLACE_PROMPT = """
    import gradio as gr

    from webui.extension_api import ScriptControls, SelectableScript

    class ReplacePrompt(SelectableScript):
        title = "Replace prompt"

        def parse_args(self, args):
            if len(args) != 1 or not str(args[0]).strip():
                raise ValueError("the new prompt must not be empty")
            return str(args[0])

        def run(self, request, args, run_job, control):
            return run_job(request.model_copy(update={"prompt": args}))

    def build(tab):
        text = gr.Textbox(label="New prompt", elem_id=f"{tab.tab}_replace_prompt_text")
        return ScriptControls(inputs=[text])

    def setup(api):
        api.add_selectable_script(ReplacePrompt(), ui=build)
"""

# Its UI builder adds a control and an event, then raises: the page must load without any of it.
BROKEN_UI = """
    import gradio as gr

    from webui.extension_api import AlwaysOnScript

    class BrokenUi(AlwaysOnScript):
        name, title = "broken_ui", "Broken UI"

    def build(tab):
        box = gr.Checkbox(label="half built", elem_id=f"{tab.tab}_half_built")
        box.change(lambda value: value, inputs=[box], outputs=[box])
        raise RuntimeError("builder failed on purpose")

    def setup(api):
        api.add_script(BrokenUi(), ui=build)
"""


@pytest.fixture(scope="module")
def ui_server(tiny_models, tmp_path_factory):
    """The UI (with --api) on the tiny models, loading the example and the two test extensions above."""
    data = tmp_path_factory.mktemp("ui-ext-data")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    extensions = tmp_path_factory.mktemp("ui-extensions")
    shutil.copytree(ROOT / "extensions" / "example.disabled", extensions / "example")
    for name, source in (("replace_prompt", REPLACE_PROMPT), ("broken_ui", BROKEN_UI)):
        (extensions / name).mkdir()
        (extensions / name / "extension.py").write_text(textwrap.dedent(source))
    running = start_ui_server(tiny_models, data, "--extensions-dir", str(extensions))
    yield running
    running.server.close()


def example_controls(page, tab: str) -> tuple[bool, float]:
    return (page.locator(f"#{tab}_example_enabled input[type=checkbox]").is_checked(),
            number_value(page, f"{tab}_example_strength"))


def test_example_accordion_sets_the_job_and_pastes_back(page, ui_server):
    choose_checkpoint(page, TINY)
    accordion = page.locator("#txt2img_script_example")
    assert "Example: fade to grey" in accordion.inner_text()
    # The broken builder's accordion and its half-built control are not on the page.
    assert page.locator("#txt2img_script_broken_ui, #txt2img_half_built").count() == 0
    assert ui_server.ctx.engine.scripts.get("broken_ui") is not None  # the script itself still works via the API

    accordion.click()
    page.locator("#txt2img_example_enabled input[type=checkbox]").check()
    fill_number(page, "txt2img_example_strength", 0.25)
    page.locator("#txt2img_prompt textarea").fill("a red house")
    info = generate_and_wait(page, "txt2img")
    screenshot(page, "ext-01-example")
    assert "Example strength: 0.25" in info
    saved = newest_output(ui_server.data_dir, "txt2img")

    # Send to img2img fills the img2img tab's example controls from the infotext.
    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#img2img_image img").wait_for()
    page.locator("#img2img_script_example").click()  # the accordion's content is rendered once opened
    expect(page.locator("#img2img_example_enabled input[type=checkbox]")).to_be_checked()
    assert example_controls(page, "img2img") == (True, 0.25)

    # Reset txt2img's controls, then paste the saved image's infotext back through PNG Info.
    page.locator("button[role=tab]:has-text('txt2img')").first.click()
    page.locator("#txt2img_example_enabled input[type=checkbox]").uncheck()
    fill_number(page, "txt2img_example_strength", 0.5)
    page.locator("button[role=tab]:has-text('PNG Info')").first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    page.locator("#pnginfo_parameters").wait_for()
    page.locator("#pnginfo_send_to_txt2img").click()
    expect(page.locator("#txt2img_example_enabled input[type=checkbox]")).to_be_checked()
    assert example_controls(page, "txt2img") == (True, 0.25)
    screenshot(page, "ext-02-pasted")


def test_script_dropdown_shows_the_selected_script_and_runs_it(page):
    choose_checkpoint(page, TINY)
    group = page.locator("#txt2img_script_replace_prompt")
    assert group.is_hidden()
    page.locator("#txt2img_script input").click()
    page.get_by_role("option", name="Replace prompt").click()
    group.wait_for(state="visible")
    page.locator("#txt2img_prompt textarea").fill("a red house")
    page.locator("#txt2img_replace_prompt_text textarea").fill("a blue boat")
    info = generate_and_wait(page, "txt2img")
    screenshot(page, "ext-03-script")
    assert info.startswith("a blue boat")
    page.locator("#txt2img_script input").click()
    page.get_by_role("option", name="None").click()
    group.wait_for(state="hidden")
