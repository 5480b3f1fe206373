"""Shared fixtures: the tiny random-weight model tree, and engines on it (CPU, fp32)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network or the user's Hugging Face cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A models/ folder in A1111 layout holding every tiny model (written once per test session)."""
    from tests.tiny_models import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def engine_factory(tiny_models, tmp_path_factory):
    """Build an engine on the tiny models with its own data dir; keyword args go to EngineSettings."""
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    def make(**settings) -> Engine:
        data = tmp_path_factory.mktemp("data")
        paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs")
        return Engine(EngineSettings(paths=paths, device="cpu", **settings))

    return make


@pytest.fixture(scope="session")
def engine(engine_factory):
    """One engine shared by the tests that only generate (its model cache holds all tiny models)."""
    return engine_factory(checkpoint_cache=5)


# --- browser tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_server(tiny_models, tmp_path_factory):
    """The UI on the tiny models with its own data dir (one per test module; a module may override it).

    Small, fast defaults come through ui-config.json, the way a user keeps their own defaults.
    """
    import json

    from tests.ui_helpers import FAST_DEFAULTS, start_ui_server

    data = tmp_path_factory.mktemp("ui-data")
    (data / "ui-config.json").write_text(json.dumps(FAST_DEFAULTS))
    running = start_ui_server(tiny_models, data)
    yield running
    running.server.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright; the tests skip (saying how to enable them) without it."""
    from tests.ui_helpers import CHROMIUM_ARGS, chromium_path

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
