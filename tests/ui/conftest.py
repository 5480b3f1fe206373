"""Fixtures of the browser tests: the UI server on the tiny models, headless Chromium, a fresh tab."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ui_server(tiny_models, tmp_path_factory):
    """The UI on the tiny models with its own data dir (one per test module; a module may override it).

    Small, fast defaults come through ui-config.json, the way a user keeps their own defaults.
    """
    import json

    from tests.ui.helpers import FAST_DEFAULTS, start_ui_server

    data = tmp_path_factory.mktemp("ui-data")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    running = start_ui_server(tiny_models, data)
    yield running
    running.server.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright; the tests skip (saying how to enable them) without it."""
    from tests.ui.helpers import CHROMIUM_ARGS, chromium_path

    executable = chromium_path()
    if executable is None:
        pytest.skip("browser tests need Chromium: run `apt-get install -y chromium` (Debian) to enable them")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, ui_server):
    """A fresh browser tab (its own Gradio session) on the module's UI server, loaded and ready."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(60_000)  # CI machines are small and busy
    tab.goto(ui_server.url)
    tab.locator("#txt2img_generate").wait_for()
    yield tab
    context.close()
