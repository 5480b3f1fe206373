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


def paint_stroke_and_generate(page, canvas, across: tuple[float, float], settle_ms: int) -> str:
    """Paint one stroke down ``canvas`` (an img2img mask editor) from 30 % to 70 % of its height, across
    ``across`` (fractions of its width), press Generate, and return the infotext under the image.

    On a busy machine the editor may still be setting up when the first stroke comes (``settle_ms`` is the wait
    before each); the app then answers that nothing was painted, as it would a user, and the stroke is drawn again.
    """
    for _attempt in range(3):
        page.wait_for_timeout(settle_ms)
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] * across[0], box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * across[1], box["y"] + box["height"] * 0.7, steps=10)
        page.mouse.up()
        page.locator("#img2img_generate").click()
        page.wait_for_function("""() => {
            const log = document.getElementById('html_log_img2img').innerText;
            const info = document.getElementById('html_info_img2img').innerText;
            return log.includes('paint over the part') || info.includes('Mask blur');
        }""", timeout=90_000)
        if "Mask blur" in page.locator("#html_info_img2img").inner_text():
            break
    return page.locator("#html_info_img2img").inner_text()
