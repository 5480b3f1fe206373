"""The A1111-compatible HTTP API (``/sdapi/v1/...``, REFERENCE §8): a thin client of the engine.

:func:`mount_api` adds the routes to a FastAPI app: the API-only app of ``--nowebui``, or Gradio's app
with ``--api``. Jobs go through the shared queue of the :class:`~webui.context.AppContext`, so API and
UI jobs never run at once.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from webui.api import routes_extras, routes_generation, routes_info, routes_models
from webui.api.auth import basic_auth_dependency
from webui.api.errors import ApiRoute
from webui.api.state import ApiSelection
from webui.context import AppContext


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
