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
from PIL import Image

from webui.api.auth import parse_credentials
from webui.context import AppContext
from webui.cors import add_cors
from webui.flags import Flags
from webui.security import Guard, Policy, hide_api_info_before_login
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
    ui_login = flags.api and not flags.nowebui and (flags.gradio_auth or flags.gradio_auth_path)
    if (flags.api or flags.nowebui) and (flags.listen or flags.share) and not flags.api_auth and not ui_login:
        log.warning("WARNING: the API is open to the network (--listen/--share) without --api-auth: anyone "
                    "who can reach it can use it.")


def _our_app(ctx: AppContext) -> FastAPI:
    """Our app with the guard of :mod:`webui.security` (the CORS layer goes around it, see :func:`add_cors`).

    The API serves its own schema and docs (webui.api), behind the API's login like every route. Images
    larger than --max-image-pixels are refused wherever Pillow decodes them.
    """
    Image.MAX_IMAGE_PIXELS = ctx.flags.max_image_pixels
    app = FastAPI(title="SD web UI API", docs_url=None, redoc_url=None, openapi_url=None)
    policy = Policy.from_flags(ctx.flags)
    if ctx.flags.api_auth:
        policy.api_credentials = parse_credentials(ctx.flags.api_auth)
    app.state.policy = policy
    app.add_middleware(Guard, policy=policy)
    return app


def create_api_app(ctx: AppContext) -> FastAPI:
    """Our app with only the A1111 API (--nowebui), its docs at /docs, and the CORS layer of the flags."""
    from webui.api.mount import mount_api

    app = _our_app(ctx)
    add_cors(app, ctx.flags)
    mount_api(app, ctx)
    app.state.policy.api_prefixes |= _api_prefixes(app)
    return app


def _api_prefixes(app: FastAPI) -> set[str]:
    """The first path segments of the routes on ``app`` (the API's, extensions' included)."""
    return {"/" + path.lstrip("/").partition("/")[0] for route in app.routes
            if (path := getattr(route, "path", "")) and path != "/"}


def _share_ui_login(app: FastAPI, ctx: AppContext, blocks) -> None:
    """With --gradio-auth: the UI's uploads are bounded, its /login failures counted, and with --api but no
    --api-auth the API takes the UI's logins (HTTP Basic) or a logged-in UI session's cookie."""
    from webui.ui.mount import parse_auth

    policy: Policy = app.state.policy
    blocks.max_file_size = policy.max_body_bytes
    config = getattr(blocks, "config", None)
    if isinstance(config, dict):
        config["max_file_size"] = policy.max_body_bytes
    logins = parse_auth(ctx.flags)
    if not logins:
        return
    policy.login_paths = ("/login", "/login/")
    gradio_app = blocks.app

    def ui_session(cookies: dict[str, str]) -> bool:
        cookie_id = gradio_app.cookie_id
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return bool(token) and token in gradio_app.tokens

    policy.ui_logged_in = ui_session
    hide_api_info_before_login(gradio_app)
    if ctx.flags.api and not ctx.flags.api_auth:
        policy.api_credentials = [(user.encode(), password.encode()) for user, password in logins]
        policy.ui_session = ui_session
        log.info("the API (--api) uses the UI's logins (--gradio-auth): HTTP Basic with a UI user:password, or "
                 "the cookie of a logged-in UI session; set --api-auth for separate API credentials")


def create_app(ctx: AppContext) -> tuple[FastAPI, object | None]:
    """Our app for the flags, and the Gradio Blocks mounted on it (None with --nowebui).

    The API routes come first (the UI is mounted at ``/`` and would otherwise take every path); the CORS
    layer of --cors-allow-origins is added once, on our app, and covers both.
    """
    flags = ctx.flags
    if flags.nowebui or flags.api:
        app = create_api_app(ctx)
    else:
        app = _our_app(ctx)
        add_cors(app, flags)
    if flags.nowebui:
        return app, None
    from webui.ui import mount_ui  # imports gradio: not needed for the API alone

    blocks = mount_ui(app, ctx)
    _share_ui_login(app, ctx, blocks)
    return app, blocks


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
        ctx.close()
        return 1
    device = ctx.engine.models.device
    url = server.local_url
    what = f"API at {url} (docs at {url}docs)" if flags.nowebui else f"UI at {url}" + (
        f" (API at {url}sdapi/v1, docs at {url}docs)" if flags.api else "")
    if ctx.pool is not None:
        what += f"; jobs run on {ctx.pool.size} engine replicas (Ray)"
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
        ctx.close()
    return 0
