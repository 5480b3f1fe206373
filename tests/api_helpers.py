"""Helpers for the API tests: the real server (uvicorn on a loopback port) on the tiny models, and images."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import uvicorn
from PIL import Image

from pipelines.engine import Engine
from webui.app import create_api_app
from webui.context import AppContext
from webui.flags import Flags

SD15 = "tiny-sd15.safetensors"


class ApiServer:
    """``create_api_app(ctx)`` served by uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, engine: Engine, data_dir: Path, **flags):
        self.ctx = AppContext(Flags(nowebui=True, data_dir=str(data_dir), **flags), engine,
                              data_dir / "config.json")
        self.app = create_api_app(self.ctx)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 20.0) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def b64_png(image: Image.Image, prefix: bool = False) -> str:
    """Base64 PNG of ``image``, optionally as a data: URL."""
    return b64_image(image, "PNG", prefix)


def b64_image(image: Image.Image, fmt: str, prefix: bool = False) -> str:
    """Base64 of ``image`` in ``fmt`` (PNG, JPEG, WEBP), optionally as a data: URL."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{data}" if prefix else data


def decode_png(data: str) -> Image.Image:
    """A returned image; it must be raw base64 of a PNG."""
    assert not data.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert image.format == "PNG"
    image.load()
    return image
