"""Serving our one FastAPI app with uvicorn: in a background thread, ready only once it answers HTTP.

Nothing here depends on a timed self-probe that can fail the start: the server thread binds the port, and
start-up waits (as long as the thread lives) until the port accepts a connection and answers an HTTP
request on the loopback address, never through a proxy. The share link and the browser come after that,
and neither can stop the local server.
"""

from __future__ import annotations

import http.client
import logging
import os
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse, urlunparse

import uvicorn

log = logging.getLogger("webui")
#: Loopback names that must never go through an HTTP proxy.
LOOPBACK = ("localhost", "127.0.0.1", "::1")


class ServerStartError(RuntimeError):
    """The server could not start serving (the port is taken, a TLS file is bad, ...)."""


def keep_loopback_off_proxies(environ=os.environ) -> None:
    """Add the loopback names to ``NO_PROXY``/``no_proxy``, so that an ``HTTP(S)_PROXY`` never sits between
    this process (or its extensions) and the local server."""
    for key in ("NO_PROXY", "no_proxy"):
        names = [name.strip() for name in environ.get(key, "").split(",") if name.strip()]
        environ[key] = ",".join(names + [name for name in LOOPBACK if name not in names])


def loopback_host(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine (a wildcard means loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def url_of(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port/``, with an IPv6 address in brackets."""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/"


def answers_http(host: str, port: int, tls: bool, timeout: float = 10.0) -> bool:
    """True when ``GET /`` on ``host:port`` gets any HTTP answer (a plain socket: no proxy, no environment)."""
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a self-signed certificate is the usual case for a home server
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/")
        return connection.getresponse().status > 0
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@dataclass
class RunningServer:
    """A started server: our FastAPI app (the Gradio Blocks mounted on it, if any) and its URLs."""

    blocks: object | None  # gr.Blocks, or None with --nowebui
    app: object
    local_url: str
    share_url: str | None = None
    server: uvicorn.Server | None = field(default=None, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)
    tunnels: list = field(default_factory=list, repr=False)

    def open_share_link(self) -> str | None:
        """A public Gradio share link to this server, or None (logged with the reason) where the network does
        not allow one; the local server keeps serving either way."""
        from gradio import networking

        address = urlparse(self.local_url)
        token = getattr(self.blocks, "share_token", None) or secrets.token_urlsafe(32)
        try:
            url = networking.setup_tunnel(local_host=loopback_host(address.hostname or ""), local_port=address.port,
                                          share_token=token, share_server_address=None,
                                          share_server_tls_certificate=None)
        except Exception as error:  # any failure here only means "no share link"
            log.error("--share: could not open a Gradio share link (%s: %s). No network, a proxy or a firewall "
                      "in the way, or the share server is down. The server keeps serving locally at %s.",
                      type(error).__name__, error, self.local_url)
            return None
        from gradio.tunneling import CURRENT_TUNNELS

        self.tunnels = [tunnel for tunnel in CURRENT_TUNNELS if getattr(tunnel, "share_token", None) == token]
        self.share_url = urlunparse(("https", *urlparse(url)[1:]))
        return self.share_url

    def wait(self) -> None:
        """Block until the server stops (or Ctrl-C)."""
        try:
            while self.thread is not None and self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            pass

    def close(self) -> None:
        """Stop serving: the Gradio queue, the share tunnel, then uvicorn (which frees the port)."""
        if self.blocks is not None:
            self.blocks.close(verbose=False)
        for tunnel in self.tunnels:
            tunnel.kill()
        self.tunnels = []
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)


def run_in_background(app, *, host: str, port: int, blocks=None, tls_keyfile: str | None = None,
                      tls_certfile: str | None = None, timeout: float = 300.0) -> RunningServer:
    """Serve ``app`` with uvicorn in a daemon thread; return once it answers HTTP on ``host:port``.

    The lifespan runs (it starts the queue of a mounted Gradio app). Start-up fails only when the server
    cannot serve at all: its thread ends (port taken, bad TLS files) or it never answers within ``timeout``
    seconds while its thread lives, which a busy machine does not come near.
    """
    config = uvicorn.Config(app, host=host, port=port, ssl_keyfile=tls_keyfile, ssl_certfile=tls_certfile,
                            log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    tls = bool(tls_certfile)
    probe_host = loopback_host(host)
    deadline = time.monotonic() + timeout
    while True:
        if server.started and answers_http(probe_host, port, tls):
            break
        if not thread.is_alive():
            raise ServerStartError(f"could not serve on {host}:{port}: the port may be taken by another program, "
                                   "or a --tls-* file cannot be used (see the message above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ServerStartError(f"the server on {host}:{port} did not answer within {timeout:.0f} s")
        time.sleep(0.05)
    local_url = url_of("https" if tls else "http", probe_host, port)
    return RunningServer(blocks, app, local_url, server=server, thread=thread)

