"""Download of a default checkpoint for a fresh install, into ``models/Stable-diffusion/``.

The URL is the operator's: ``--default-model-url``, else the ``default_model_url`` option from config.json
(SD 1.5 unless changed there); the UI and the API cannot change it, so the server never fetches, nor probes
with :func:`network_problem`, a host a request chose. Redirects are followed only to the URL's own host or,
for a Hugging Face URL, to its download hosts (:func:`redirect_allowed`).

Only ever started by the user's click, and only while there is no checkpoint.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

CHUNK = 1 << 20
#: Hosts (and their sub-domains) a download from the key host may be redirected to: Hugging Face answers a
#: file URL with a redirect to its storage hosts.
REDIRECT_HOSTS = {"huggingface.co": ("huggingface.co", "hf.co")}
MAX_REDIRECTS = 5


def redirect_allowed(url: str, target: str) -> bool:
    """Whether a download of ``url`` may follow a redirect to ``target``: the same host, or one of the hosts
    :data:`REDIRECT_HOSTS` lists for it, and never from https to plain http."""
    source, dest = urlparse(url), urlparse(target)
    host, to = (source.hostname or "").lower(), (dest.hostname or "").lower()
    if dest.scheme not in ("http", "https") or (source.scheme == "https" and dest.scheme != "https") or not to:
        return False
    if to == host:
        return True
    return any(to == allowed or to.endswith("." + allowed) for allowed in REDIRECT_HOSTS.get(host, ()))


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
    with httpx.Client(follow_redirects=False, timeout=30) as client:
        yield from _stream(client, url, target, part)
    yield 1.0, f"Downloaded {target.name} into {folder}."


def _stream(client, url: str, target: Path, part: Path) -> Iterator[tuple[float, str]]:
    """GET ``url`` into ``part``, then rename it to ``target``; redirects checked by :func:`redirect_allowed`."""
    import httpx

    current = url
    for _ in range(MAX_REDIRECTS + 1):
        request = client.build_request("GET", current)
        response = client.send(request, stream=True)
        if not response.is_redirect:
            break
        location = str(response.url.join(response.headers.get("location", "")))
        response.close()
        if not redirect_allowed(url, location):
            raise httpx.HTTPError(f"{urlparse(url).hostname} redirected the download to "
                                  f"{urlparse(location).hostname or location!r}, another host; not followed")
        current = location
    else:
        raise httpx.HTTPError(f"more than {MAX_REDIRECTS} redirects downloading {url}")
    with response:
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
