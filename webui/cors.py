"""``--cors-allow-origins`` / ``--cors-allow-origins-regex``: which other web sites' pages may call the server."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from webui.flags import Flags


def cors_origins(flags: Flags) -> list[str]:
    """The origins of ``--cors-allow-origins a,b`` (spaces and empty items dropped)."""
    return [origin.strip() for origin in (flags.cors_allow_origins or "").split(",") if origin.strip()]


def add_cors(app: Starlette, flags: Flags, replacing: tuple[type, ...] = ()) -> None:
    """Answer cross-origin requests from the allowed origins (nothing changes without the flags).

    Works on an app that already serves: Gradio returns its app started, with its own CORS layer
    (``replacing``), which is taken out, as Gradio itself does under an app with its own CORS policy.
    The middleware stack is built again at the next request.
    """
    origins, regex = cors_origins(flags), flags.cors_allow_origins_regex or None
    if not origins and not regex:
        return
    ours = Middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=regex, allow_methods=["*"],
                      allow_headers=["*"], allow_credentials=True)
    app.user_middleware = [ours, *(m for m in app.user_middleware if m.cls not in replacing)]
    app.middleware_stack = None
