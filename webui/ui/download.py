"""Download of a default checkpoint for a fresh install, into ``models/Stable-diffusion/``.

The URL is the ``default_model_url`` option (SD 1.5 unless changed in Settings).

Only ever started by the user's click; tests call :func:`network_problem` against an unreachable host.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

CHUNK = 1 << 20


def network_problem(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host cannot be reached from here, or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 is set, so nothing is downloaded."
    parts = urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"{host}:{port} cannot be reached ({error.strerror or error}); this machine looks offline."


def download_model(url: str, folder: Path) -> Iterator[tuple[float, str]]:
    """Stream ``url`` into ``folder`` (via a ``.part`` file, renamed when complete), yielding (fraction, text)."""
    import httpx

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(urlparse(url).path).name
    if target.exists():
        yield 1.0, f"{target.name} is already there."
        return
    part = target.with_name(target.name + ".part")
    with httpx.stream("GET", url, follow_redirects=True, timeout=30) as response:
        response.raise_for_status()
        total = int(response.headers.get("content-length") or 0)
        done = 0
        try:
            with open(part, "wb") as handle:
                for chunk in response.iter_bytes(CHUNK):
                    handle.write(chunk)
                    done += len(chunk)
                    fraction = done / total if total else 0.0
                    yield fraction, f"{target.name}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB"
            os.replace(part, target)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    yield 1.0, f"Downloaded {target.name} into {folder}."
