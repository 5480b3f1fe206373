"""A1111 routes that clients call besides the generation API (docs/compatibility.md §8).

``GET /internal/ping``, ``POST /internal/progress`` (the web page's progress poll, by ``id_task``),
``GET /sdapi/v1/script-info`` (each script's arguments, read from the controls its UI builder makes, as
A1111 reads them) and ``POST /sdapi/v1/interrogate``, which answers 422 naming what is missing: no
interrogator model ships with this app.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from pipelines.images.saving import encode_base64_png
from pipelines.settings import MODEL_KINDS
from webui.api.errors import ApiError
from webui.context import AppContext
from webui.extension_api import ScriptControls, TabUi

log = logging.getLogger("webui.api")


class InternalProgressRequest(BaseModel):
    """Body of POST /internal/progress."""

    model_config = ConfigDict(extra="ignore")
    id_task: str | None = Field(None, description="id_task of the job (force_task_id of the request).")
    id_live_preview: int = Field(-1, description="id of the last preview received; that one is not sent again.")
    live_preview: bool = Field(True, description="Include the live preview.")


class InternalProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: float | None = None
    eta: float | None = None
    live_preview: str | None = Field(None, description="data: URL of a PNG")
    id_live_preview: int | None = None
    textinfo: str | None = None


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field("", description="Base64 image.")
    model: str = Field("clip", description="clip or deepdanbooru.")


class ScriptArg(BaseModel):
    label: str | None = None
    value: Any | None = None
    minimum: Any | None = None
    maximum: Any | None = None
    step: Any | None = None
    choices: list[Any] | None = None


class ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg]


def _choice_value(choice: Any) -> Any:
    return choice[1] if isinstance(choice, list | tuple) and len(choice) == 2 else choice


def script_arg(component: Any) -> dict[str, Any]:
    """A UI control as A1111's ScriptArg: label, default value, bounds, step and choices when it has them."""
    choices = getattr(component, "choices", None)
    value = getattr(component, "value", None)
    try:
        json.dumps(value)
    except (TypeError, ValueError):  # a callable or an object default: not something a client can send
        value = None
    return {"label": getattr(component, "label", None), "value": value,
            "minimum": getattr(component, "minimum", None), "maximum": getattr(component, "maximum", None),
            "step": getattr(component, "step", None),
            "choices": [_choice_value(c) for c in choices] if choices is not None else None}


def script_args(name: str, builder: Any, tab: str) -> list[dict[str, Any]]:
    """The arguments of a script, from the controls its UI builder makes in a throwaway Blocks (as A1111
    reads its scripts' Gradio inputs); [] without a builder or when building fails (logged)."""
    if builder is None:
        return []
    try:
        import gradio as gr

        with gr.Blocks():
            controls: ScriptControls = builder(TabUi(tab, gr.Textbox(), gr.Textbox()))
        return [script_arg(component) for component in controls.inputs]
    except Exception as error:  # a plug-in's builder: its failure must not break the listing
        log.warning("script-info: cannot read the arguments of %s (%s): %s", name, tab, error)
        return []


def router(ctx: AppContext, route_class: type) -> APIRouter:
    """The compatibility routes on ``ctx``."""
    api = APIRouter(route_class=route_class, tags=["compatibility"])
    cache: list[dict[str, Any]] = []
    cache_lock = threading.Lock()

    @api.get("/internal/ping")
    def ping() -> dict:
        """Answers {} while the server runs."""
        return {}

    @api.post("/internal/progress", response_model=InternalProgressResponse)
    def internal_progress(body: InternalProgressRequest) -> dict:
        """Progress of the job ``id_task``: waiting (with its place in line), running, or finished."""
        running, place, completed = ctx.queue.task_state(body.id_task or "")
        if running is None:
            textinfo = f"In queue: {place}/{ctx.queue.waiting}" if place else "Waiting..."
            return {"active": False, "queued": bool(place), "completed": completed, "id_live_preview": -1,
                    "textinfo": textinfo}
        p = running.control.progress
        preview, preview_id = None, body.id_live_preview
        if body.live_preview and p.preview is not None:
            current_id = p.job_no * 100_000 + p.sampling_step  # changes whenever a new preview can exist
            if current_id != body.id_live_preview:
                preview, preview_id = "data:image/png;base64," + encode_base64_png(p.preview, ""), current_id
        return {"active": True, "queued": False, "completed": False, "progress": p.fraction, "eta": p.eta_seconds,
                "live_preview": preview, "id_live_preview": preview_id, "textinfo": p.textinfo or None}

    @api.get("/sdapi/v1/script-info", response_model=list[ScriptInfo])
    def script_info() -> list[dict]:
        """Every script of each tab: the Script dropdown's, then the always-on ones, with their arguments."""
        with cache_lock:
            if not cache:
                for tab in ("txt2img", "img2img"):
                    for title, builder in ctx.extensions.selectable_for(tab):
                        cache.append({"name": title.lower(), "is_alwayson": False, "is_img2img": tab == "img2img",
                                      "args": script_args(title, builder, tab)})
                    for name, builder in ctx.extensions.scripts_for(tab):
                        cache.append({"name": name, "is_alwayson": True, "is_img2img": tab == "img2img",
                                      "args": script_args(name, builder, tab)})
            return list(cache)

    @api.post("/sdapi/v1/interrogate")
    def interrogate(body: InterrogateRequest) -> dict:
        """Caption an image: no interrogator ships with this app, so this answers 422 saying what is missing."""
        # Named, not read: nothing in this version reads models/CLIP yet.
        folders = str(ctx.engine.paths.models_dir / MODEL_KINDS["clip"].folder)
        raise ApiError(("model",), f"model {body.model!r}: interrogation is not available here: no CLIP/BLIP "
                                   f"interrogator is shipped or supported yet (its model files would go in "
                                   f"{folders}); caption the image with another tool")

    return api
