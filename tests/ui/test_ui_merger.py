"""The Checkpoint Merger and Extensions tabs in the browser: a merge whose model appears in the top bar and
generates, and the installed extensions with their states, a disable that survives a restart, the install box
off without the flag.

Without Chromium these tests skip, as tests/ui/test_ui.py does.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from playwright.sync_api import expect

from tests.engine.test_merge import _perturbed
from tests.ui.helpers import FAST_DEFAULTS, screenshot, start_ui_server
from tests.ui.test_ui import choose_checkpoint, generate_and_wait
from webui.extensions import ROOT

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui_server(tiny_models, tmp_path_factory):
    """The UI on a models folder of its own (the merge writes into it), with two plug-ins: the example and a
    broken one."""
    models = tmp_path_factory.mktemp("merger-models")
    folder = models / "Stable-diffusion"
    folder.mkdir()
    shutil.copy(tiny_models / "Stable-diffusion" / "tiny-sd15.safetensors", folder / "a.safetensors")
    shutil.copy(tiny_models / "Stable-diffusion" / "tiny-sd15.yaml", folder / "a.yaml")
    _perturbed(folder / "a.safetensors", folder / "b.safetensors", 1)
    shutil.copytree(tiny_models / "VAE", models / "VAE")
    plugins = tmp_path_factory.mktemp("plugins")
    shutil.copytree(ROOT / "extensions" / "example.disabled", plugins / "example")
    (plugins / "broken").mkdir()
    (plugins / "broken" / "extension.py").write_text("def setup(api):\n    raise RuntimeError('broken on purpose')\n")
    data = tmp_path_factory.mktemp("merger-data")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    running = start_ui_server(models, data, "--extensions-dir", str(plugins))
    running.models_dir, running.plugins = models, plugins
    yield running
    running.server.close()


LABELS = {"tab_modelmerger": "Checkpoint Merger", "tab_extensions": "Extensions", "tab_txt2img": "txt2img"}


def _open_tab(page, elem_id: str) -> None:
    """Select a main tab (on a narrow screen its button sits in Gradio's "More tabs" menu)."""
    page.locator("#tabs").wait_for()
    button = page.locator(f"#{elem_id}-button")
    if button.count() and button.is_visible():
        button.click()
        return
    page.locator("#tabs button[aria-label='More tabs']").click()
    page.locator("#tabs button:visible", has_text=LABELS[elem_id]).last.click()


def _choose(page, elem_id: str, name: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id}").get_by_role("option", name=re.compile(re.escape(name) + r"( \[|$)")).click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(re.compile(re.escape(name)))


def test_merge_in_the_tab_appears_in_the_top_bar_and_generates(page, ui_server):
    _open_tab(page, "tab_modelmerger")
    expect(page.locator("#modelmerger_interp_description")).to_contain_text("A * (1 - M) + B * M")
    expect(page.locator("#modelmerger_note")).to_contain_text("diffusers folders cannot be merged")
    _choose(page, "modelmerger_primary_model_name", "a.safetensors")
    _choose(page, "modelmerger_secondary_model_name", "b.safetensors")
    page.locator("#modelmerger_custom_name textarea, #modelmerger_custom_name input").first.fill("merged-ui")
    page.locator("#modelmerger_save_as_half input").check()
    screenshot(page, "merger-tab")
    page.locator("#modelmerger_merge").click()
    expect(page.locator("#modelmerger_saved")).to_contain_text("merged-ui.safetensors", timeout=90_000)
    target = ui_server.models_dir / "Stable-diffusion" / "merged-ui.safetensors"
    assert target.is_file() and (target.with_suffix(".yaml")).is_file()  # config copied from A
    screenshot(page, "merger-tab-done")
    # In the top-bar list at once, without pressing refresh; and it generates.
    choose_checkpoint(page, "merged-ui.safetensors")
    _open_tab(page, "tab_txt2img")
    info = generate_and_wait(page, "txt2img")
    assert "Model: merged-ui" in info, info


def test_merge_error_is_shown(page):
    _open_tab(page, "tab_modelmerger")
    _choose(page, "modelmerger_primary_model_name", "a.safetensors")
    page.locator("#modelmerger_merge").click()  # Weighted sum without B
    expect(page.locator("#modelmerger_result")).to_contain_text("secondary_model_name: choose the secondary (B) model")


def test_extensions_tab_lists_states_and_disable_survives_a_restart(browser, page, ui_server, tiny_models):
    _open_tab(page, "tab_extensions")
    table = page.locator("#extensions_table")
    expect(table.locator("tr[data-extension='example'] .sdui-ext-state")).to_have_text("enabled")
    expect(table.locator("tr[data-extension='broken'] .sdui-ext-state")).to_contain_text(
        "failed to load: RuntimeError: broken on purpose")
    expect(table.locator("tr[data-extension='lora'] .sdui-ext-state")).to_have_text("enabled")
    screenshot(page, "extensions-tab")
    page.locator("#extensions_enabled label", has_text="example").locator("input").uncheck()
    page.locator("#extensions_apply").click()
    expect(page.locator("#extensions_saved")).to_contain_text("example will be off. Restart the server to apply.")
    expect(table.locator("tr[data-extension='example'] .sdui-ext-state")).to_have_text(
        "enabled; disabled at the next start")
    saved = json.loads((ui_server.data_dir / "config.json").read_text())
    assert saved["disabled_extensions"] == ["example"]
    page.locator("#extensions_install_tab-button").click()
    expect(page.locator("#extensions_install_off")).to_contain_text("--enable-insecure-extension-access")
    expect(page.locator("#extension_to_install textarea, #extension_to_install input").first).to_be_disabled()
    screenshot(page, "extensions-install-off")

    # "Restart": a new server on the same data dir and plug-in folder.
    restarted = start_ui_server(ui_server.models_dir, ui_server.data_dir, "--extensions-dir", str(ui_server.plugins))
    try:
        assert ui_server.ctx.engine.scripts.get("example") is not None  # the running one kept it
        assert restarted.ctx.engine.scripts.get("example") is None
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        other = context.new_page()
        other.set_default_timeout(60_000)
        other.goto(restarted.url)
        other.locator("#txt2img_generate").wait_for()
        _open_tab(other, "tab_extensions")
        expect(other.locator("#extensions_table tr[data-extension='example'] .sdui-ext-state")).to_contain_text(
            "disabled (the Extensions tab")
        expect(other.locator("#extensions_enabled label", has_text="example").locator("input")).not_to_be_checked()
        expect(other.locator("#txt2img_script_container, body")).not_to_contain_text("Example: fade to grey")
        context.close()
    finally:
        restarted.server.close()


def test_merger_and_extensions_fit_a_phone(browser, ui_server):
    context = browser.new_context(viewport={"width": 400, "height": 900})
    phone = context.new_page()
    phone.set_default_timeout(60_000)
    phone.goto(ui_server.url)
    phone.locator("#txt2img_generate").wait_for()
    for tab, name in (("tab_modelmerger", "merger-phone"), ("tab_extensions", "extensions-phone")):
        _open_tab(phone, tab)
        phone.wait_for_timeout(500)
        width = phone.evaluate("document.documentElement.scrollWidth")
        screenshot(phone, name)
        assert width <= 400, f"{tab} overflows a 400 px screen: {width} px"
    # The wide table scrolls inside its box instead of being cut off.
    box = phone.locator(".sdui-ext-table-wrap").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 400
    assert phone.evaluate("document.querySelector('.sdui-ext-table-wrap').scrollWidth > "
                          "document.querySelector('.sdui-ext-table-wrap').clientWidth")
    context.close()
