"""Start the server: ONE FastAPI app of ours, served by uvicorn on one port.

On it: the A1111 API (with --api, or alone with --nowebui), the Gradio UI mounted at ``/`` (unless
--nowebui), and one CORS layer for both. ``webui.server`` runs it; nothing at start-up depends on a timed
probe of our own URL, so a busy machine or a proxy variable cannot fail the start.
"""

from __future__ import annotations

import logging
import time
import webbrowser

from fastapi import FastAPI

from webui.context import AppContext
from webui.cors import add_cors
from webui.flags import Flags
from webui.server import RunningServer, ServerStartError, keep_loopback_off_proxies, run_in_background

log = logging.getLogger("webui")


def _warn_about_exposure(flags: Flags) -> None:
    if (flags.listen or flags.share) and not (flags.gradio_auth or flags.gradio_auth_path):
        log.warning(
            "\n" + "!" * 78 + "\n"
            "WARNING: the UI is reachable from other machines (--listen/--share) and has NO LOGIN.\n"
            "Anyone who can reach it can generate images, read your prompts and outputs, and use your GPU.\n"
            "Set --gradio-auth user:password (and --api-auth for the API).\n" + "!" * 78
        )
    if (flags.api or flags.nowebui) and (flags.listen or flags.share) and not flags.api_auth:
        log.warning("WARNING: the API is open to the network (--listen/--share) without --api-auth: anyone "
                    "who can reach it can use it.")


def _our_app() -> FastAPI:
    # The API serves its own schema and docs (webui.api), behind --api-auth like every route.
    return FastAPI(title="SD web UI API", docs_url=None, redoc_url=None, openapi_url=None)


def create_api_app(ctx: AppContext) -> FastAPI:
    """Our app with only the A1111 API (--nowebui), its docs at /docs, and the CORS layer of the flags."""
    from webui.api.mount import mount_api

    app = _our_app()
    add_cors(app, ctx.flags)
    mount_api(app, ctx)
    return app


def create_app(ctx: AppContext) -> tuple[FastAPI, object | None]:
    """Our app for the flags, and the Gradio Blocks mounted on it (None with --nowebui).

    The API routes come first (the UI is mounted at ``/`` and would otherwise take every path); the CORS
    layer of --cors-allow-origins is added once, on our app, and covers both.
    """
    flags = ctx.flags
    if flags.nowebui or flags.api:
        app = create_api_app(ctx)
    else:
        app = _our_app()
        add_cors(app, flags)
    if flags.nowebui:
        return app, None
    from webui.ui import mount_ui  # imports gradio: not needed for the API alone

    return app, mount_ui(app, ctx)


def start_server(ctx: AppContext) -> RunningServer:
    """Build our app from ``ctx.flags`` and serve it in the background; returns once it answers HTTP."""
    keep_loopback_off_proxies()
    flags = ctx.flags
    app, blocks = create_app(ctx)
    return run_in_background(app, host=flags.host, port=flags.server_port, blocks=blocks,
                             tls_keyfile=flags.tls_keyfile, tls_certfile=flags.tls_certfile)


def serve(flags: Flags, started: float | None = None) -> int:
    """Build everything from the flags, serve until stopped; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = started or time.perf_counter()
    _warn_about_exposure(flags)
    ctx = AppContext.create(flags)
    try:
        server = start_server(ctx)
    except ServerStartError as error:
        log.error("%s", error)
        return 1
    device = ctx.engine.models.device
    url = server.local_url
    what = f"API at {url} (docs at {url}docs)" if flags.nowebui else f"UI at {url}" + (
        f" (API at {url}sdapi/v1, docs at {url}docs)" if flags.api else "")
    log.info("%s; device %s, %s; ready in %.1f s", what, device.device, str(device.dtype).removeprefix("torch."),
             time.perf_counter() - started)
    if flags.share and server.open_share_link():
        log.info("public URL: %s", server.share_url)
    if flags.autolaunch:
        webbrowser.open(server.share_url or server.local_url)
    try:
        server.wait()
    finally:
        server.close()
    return 0
