"""The A1111-compatible HTTP API (``/sdapi/v1/...``, REFERENCE §8): a thin client of the engine.

:func:`mount_api` adds the routes to a FastAPI app: the API-only app of ``--nowebui``, or Gradio's app
with ``--api``. Jobs go through the shared queue of the :class:`~webui.context.AppContext`, so API and
UI jobs never run at once.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from webui.api import routes_extras, routes_generation, routes_info, routes_models
from webui.api.auth import basic_auth_dependency
from webui.api.errors import ApiRoute
from webui.api.state import ApiSelection
from webui.context import AppContext

log = logging.getLogger(__name__)


def mount_api(app: FastAPI, ctx: AppContext) -> None:
    """Add every API route to ``app``; with ``--api-auth`` each one needs HTTP Basic credentials."""
    selection = ApiSelection()
    dependencies = [Depends(basic_auth_dependency(ctx.flags.api_auth))] if ctx.flags.api_auth else []
    for router in (
        routes_generation.router(ctx, selection, ApiRoute),
        routes_models.router(ctx, selection, ApiRoute),
        routes_info.router(ctx, ApiRoute),
        routes_extras.router(ctx, ApiRoute),
    ):
        app.include_router(router, dependencies=dependencies)
    _mount_extension_routes(app, ctx, dependencies)


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
        app.include_router(router, dependencies=dependencies)
