"""The UI on our FastAPI app: the Blocks with its queue, login, page assets and the files it may serve."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from gradio.route_utils import CustomCORSMiddleware
from gradio.routes import App

from webui.context import AppContext
from webui.cors import cors_configured, drop_middleware
from webui.flags import Flags
from webui.ui.layout import build_ui

ASSETS = Path(__file__).resolve().parent


def parse_auth(flags: Flags) -> list[tuple[str, str]]:
    """Logins from --gradio-auth (``u:p,u2:p2``) and --gradio-auth-path (one or more per line)."""
    text = flags.gradio_auth or ""
    if flags.gradio_auth_path:
        text += "," + Path(flags.gradio_auth_path).read_text(encoding="utf-8").replace("\n", ",")
    logins = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise ValueError("--gradio-auth: each login must look like user:password")
        logins.append((user, password))
    return logins


def mount_ui(app: FastAPI, ctx: AppContext) -> gr.Blocks:
    """Build the UI and mount it at ``/`` of ``app`` (after the API routes, which keep their paths).

    The Blocks' queue starts with the app's lifespan (uvicorn runs it); the login from --gradio-auth
    guards the UI's pages and routes.
    """
    flags = ctx.flags
    blocks = build_ui(ctx)
    blocks.queue()
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        server_name=flags.host,
        server_port=flags.server_port,
        auth=parse_auth(flags) or None,
        allowed_paths=[str(ctx.engine.paths.outputs_dir)],
        css=(ASSETS / "style.css").read_text(encoding="utf-8"),
        head=f"<script>{(ASSETS / 'script.js').read_text(encoding='utf-8')}</script>",
        ssr_mode=False,
        show_error=True,
    )
    gradio_app = next(route.app for route in app.routes if isinstance(getattr(route, "app", None), App))
    # As launch() would: Blocks.close() then stops the queue and the event streams of this app.
    blocks.app = blocks.server_app = gradio_app
    if cors_configured(flags):
        # Gradio's own CORS layer lets only local pages call the UI; --cors-allow-origins (on our app) replaces it.
        drop_middleware(gradio_app, (CustomCORSMiddleware,))
    return blocks
