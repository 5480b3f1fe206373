"""``--cors-allow-origins`` / ``--cors-allow-origins-regex``: which other web sites' pages may call the server."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from webui.flags import Flags


def cors_origins(flags: Flags) -> list[str]:
    """The origins of ``--cors-allow-origins a,b`` (spaces and empty items dropped)."""
    return [origin.strip() for origin in (flags.cors_allow_origins or "").split(",") if origin.strip()]


def cors_configured(flags: Flags) -> bool:
    """True when --cors-allow-origins or --cors-allow-origins-regex is given."""
    return bool(cors_origins(flags) or flags.cors_allow_origins_regex)


def drop_middleware(app: Starlette, classes: tuple[type, ...]) -> None:
    """Take the middlewares of these classes out of ``app`` (the stack is built again at the next request)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls not in classes]
    app.middleware_stack = None


def add_cors(app: Starlette, flags: Flags, replacing: tuple[type, ...] = ()) -> None:
    """Answer cross-origin requests from the allowed origins (nothing changes without the flags).

    Our app gets it once, before it serves, for every route on it: the API and the UI mounted on it. Any
    other CORS layer of the classes in ``replacing`` is taken out (Gradio's own, which lets only local pages
    call the server, is taken out of the mounted UI: see ``webui.ui.mount``).
    """
    if not cors_configured(flags):
        return
    ours = Middleware(CORSMiddleware, allow_origins=cors_origins(flags),
                      allow_origin_regex=flags.cors_allow_origins_regex or None, allow_methods=["*"],
                      allow_headers=["*"], allow_credentials=True)
    drop_middleware(app, replacing)
    app.user_middleware.insert(0, ours)
