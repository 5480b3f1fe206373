"""Helpers for the browser tests: the real UI server on the tiny models, Chromium, screenshots."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
#: 64x64 and few steps: the tiny models make such an image in well under a second on a CPU.
FAST_DEFAULTS = {f"{tab}/{label}/value": value for tab in ("txt2img", "img2img")
                 for label, value in (("Width", 64), ("Height", 64), ("Sampling steps", 3),
                                      ("Sampling method", "Euler"))}
SHOTS = Path(os.environ.get("SDUI_SHOTS", "/tmp/ui-shots"))


def chromium_path() -> str | None:
    """Debian's chromium, or whatever ``chromium`` is on PATH; None when there is none."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class UiServer:
    """A running UI server and what the tests need of it."""

    ctx: object
    server: object
    url: str
    data_dir: Path


def start_ui_server(models_dir: Path, data_dir: Path, *extra_flags: str) -> UiServer:
    """The real server (UI, with the API when ``--api`` is passed) on a free loopback port, in the background."""
    from webui.app import start_server
    from webui.context import AppContext
    from webui.flags import parse_flags

    flags = parse_flags(["--data-dir", str(data_dir), "--models-dir", str(models_dir), "--use-cpu", "all",
                         "--port", str(free_port()), *extra_flags], environ={})
    ctx = AppContext.create(flags)
    server = start_server(ctx)
    return UiServer(ctx, server, server.local_url, data_dir)


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot under /tmp/ui-shots (or $SDUI_SHOTS) to look at."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def fill_number(page, elem_id: str, value: float) -> None:
    """Type ``value`` into a Gradio number/slider box and make sure it stuck.

    A box in a tab that was just selected can still be mounting when Playwright types into it, and Gradio
    then resets it to its initial value; typing again once it is visible and settled is reliable.
    """
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input[type=number]").first
    box.wait_for(state="visible")
    text = str(value)
    for _ in range(3):
        box.fill(text)
        box.press("Tab")
        page.wait_for_timeout(200)
        if box.input_value() == text:
            break
    expect(box).to_have_value(text)
