"""Start the server: the Gradio UI (with the API beside it on --api), or the API alone (--nowebui)."""

from __future__ import annotations

import logging
import time

from webui.context import AppContext
from webui.flags import Flags

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


def create_api_app(ctx: AppContext):
    """A FastAPI app with only the A1111 API (--nowebui), its docs at /docs."""
    from fastapi import FastAPI

    from webui.api.mount import mount_api
    from webui.cors import add_cors

    # mount_api serves the schema and the docs, behind --api-auth like every route.
    app = FastAPI(title="SD web UI API", docs_url=None, redoc_url=None, openapi_url=None)
    mount_api(app, ctx)
    add_cors(app, ctx.flags)
    return app


def serve(flags: Flags, started: float | None = None) -> int:
    """Build everything from the flags, serve until stopped; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = started or time.perf_counter()
    _warn_about_exposure(flags)
    ctx = AppContext.create(flags)
    device = ctx.engine.models.device
    if flags.nowebui:
        import uvicorn

        app = create_api_app(ctx)
        url = f"{'https' if flags.tls_certfile else 'http'}://{flags.host}:{flags.server_port}"
        log.info("API at %s (docs at %s/docs); device %s, %s; ready in %.1f s", url, url, device.device,
                 str(device.dtype).removeprefix("torch."), time.perf_counter() - started)
        uvicorn.run(app, host=flags.host, port=flags.server_port, ssl_keyfile=flags.tls_keyfile,
                    ssl_certfile=flags.tls_certfile, log_level="warning")
        return 0
    from webui.ui import launch_ui

    return launch_ui(ctx, started=started)
