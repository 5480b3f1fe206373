"""Mounting the A1111-compatible HTTP API on a FastAPI app.

:func:`mount_api` adds the routes to a FastAPI app: the API-only app of ``--nowebui``, or Gradio's app
with ``--api``. Jobs go through the shared queue of the :class:`~webui.context.AppContext`, so API and
UI jobs never run at once.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.routing import APIRoute

import pipelines
from webui.api import (
    routes_compat,
    routes_evaluate,
    routes_extras,
    routes_generation,
    routes_info,
    routes_models,
    routes_train,
)
from webui.api.errors import ApiRoute
from webui.api.state import ApiSelection
from webui.context import AppContext

log = logging.getLogger(__name__)

DOCS_URL = "/docs"
OPENAPI_URL = "/openapi.json"
DOCS_ASSETS_URL = "/docs-assets"
#: The Swagger UI 5 files /docs needs, served from the fastapi-swagger package (no CDN), with their types.
#: (Swagger UI 4 cannot read the OpenAPI 3.1 schema FastAPI writes.)
DOCS_ASSETS_DIR = Path(str(resources.files("fastapi_swagger") / "resources"))
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}

#: The error answers every API route may give, in its schema (the guard's and the route class's).
_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"detail": {}}}}}}
COMMON_RESPONSES: dict[int | str, dict] = {
    401: {"description": "Missing or wrong credentials (with --api-auth, or the UI's logins).", **_ERROR},
    413: {"description": "The request body is larger than --max-body-size.", **_ERROR},
    422: {"description": "A field is invalid; the answer names it and the allowed values.", **_ERROR},
    429: {"description": "Too many failed logins from this client; see Retry-After.", **_ERROR},
}


def mount_api(app: FastAPI, ctx: AppContext) -> None:
    """Add every API route to ``app``, with its OpenAPI schema and Swagger UI.

    The API's login (HTTP Basic of ``--api-auth``, or the UI's logins) is checked before any route, the body
    not yet read, by :class:`webui.security.Guard` on our app; every route's schema documents its 401, 413
    and 422 answers."""
    selection = ApiSelection(ctx)
    dependencies: list = []
    before = set(map(id, app.routes))
    for router in (
        routes_generation.router(ctx, selection, ApiRoute),
        routes_models.router(ctx, selection, ApiRoute),
        routes_info.router(ctx, ApiRoute),
        routes_extras.router(ctx, ApiRoute),
        routes_compat.router(ctx, ApiRoute),
        routes_train.router(ctx, ApiRoute),
        routes_evaluate.router(ctx, ApiRoute),
    ):
        app.include_router(router, dependencies=dependencies, responses=COMMON_RESPONSES)
    _mount_extension_routes(app, ctx, dependencies)
    ours = [route for route in app.routes if id(route) not in before]
    _mount_docs(app, ours, dependencies)


def _mount_docs(app: FastAPI, routes: list, dependencies: list) -> None:
    """``/openapi.json`` describing the API routes only (on Gradio's app, not Gradio's own), and Swagger UI at
    ``/docs`` unless the app already serves a page there."""
    if app.openapi_url == OPENAPI_URL:
        # Gradio's app serves FastAPI's own schema of every route it has, Gradio's included, unguarded.
        app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) != OPENAPI_URL]
    taken = {getattr(route, "path", None) for route in app.routes}
    schema: dict = {}

    def openapi() -> JSONResponse:
        if not schema:  # built at the first request: extension routes are all mounted by then
            schema.update(get_openapi(title="Stable Diffusion web UI API", version=pipelines.__version__,
                                      description="A1111-compatible API (/sdapi/v1)", routes=routes))
        return JSONResponse(schema)

    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title="Stable Diffusion web UI API - docs",
                                   swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon-32x32.png")

    def docs_asset(name: str) -> FileResponse:
        """Swagger UI's files from the installed package, so /docs works with no network."""
        if name not in DOCS_ASSETS:
            raise HTTPException(404, f"no docs asset {name!r}")
        return FileResponse(DOCS_ASSETS_DIR / name, media_type=DOCS_ASSETS[name],
                            headers={"Cache-Control": "max-age=86400"})

    if OPENAPI_URL not in taken:
        app.add_api_route(OPENAPI_URL, openapi, methods=["GET"], include_in_schema=False, dependencies=dependencies)
    if DOCS_URL not in taken:
        app.add_api_route(DOCS_URL, docs, methods=["GET"], include_in_schema=False, dependencies=dependencies)
        app.add_api_route(DOCS_ASSETS_URL + "/{name}", docs_asset, methods=["GET"], include_in_schema=False,
                          dependencies=dependencies)


def _mount_extension_routes(app: FastAPI, ctx: AppContext, dependencies: list) -> None:
    """The extensions' routes, behind the same auth; a plug-in may not take a path and method already served."""
    for record, router in ctx.extensions.routers:
        taken = {(route.path, method) for route in app.routes if isinstance(route, APIRoute)
                 for method in route.methods}
        wanted = {(route.path, method) for route in router.routes if isinstance(route, APIRoute)
                  for method in route.methods}
        clashes = sorted(wanted & taken)
        if clashes and not record.builtin:
            record.error = f"its API routes clash with existing ones: {clashes}"
            log.error("extension %s: %s; its routes are not served", record.name, record.error)
            continue
        app.include_router(router, dependencies=dependencies, responses=COMMON_RESPONSES)
