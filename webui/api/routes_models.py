"""Models and settings: sd-models, sd-vae, options, and refreshing, unloading and reloading checkpoints.

Loading and unloading go through the shared job queue, so they never happen under a running job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import TypeAdapter, ValidationError

from pipelines.engine import EngineError
from pipelines.models import families
from pipelines.models.weights import ModelFileError
from pipelines.request import GenerationRequest
from webui.api.errors import ApiError, StateConflict, model_file_error, model_file_loc, validation_errors
from webui.api.models import SDModelItem, SDVaeItem
from webui.api.state import ApiSelection
from webui.api.translate import (
    FIXED_OPTIONS,
    READ_ONLY_OPTIONS,
    check_option_changes,
    resolve_checkpoint,
    resolve_vae,
    unsupported_options,
)
from webui.context import AppContext

log = logging.getLogger("webui.api")
_CLIP_SKIP = TypeAdapter(Annotated[int, GenerationRequest.model_fields["clip_skip"]])
# What loading a broken or unreadable checkpoint raises; reported as a clear 500, not a traceback.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


def _sidecar_config(path: Path) -> str | None:
    config = path.with_suffix(".yaml")
    return str(config) if path.is_file() and config.is_file() else None


def _family(path: Path) -> str | None:
    family = families.family_of_path(path)
    return family.name if family is not None else None


def current_options(ctx: AppContext, selection: ApiSelection) -> dict[str, Any]:
    """The Settings tab's options plus A1111's model keys, as GET options shows them."""
    title = selection.peek_checkpoint(ctx.engine.models)
    sha256 = None
    if title:
        try:
            sha256 = ctx.engine.registry.find_checkpoint(title).sha256
        except LookupError:
            sha256 = None
    return {**FIXED_OPTIONS, **ctx.options.model_dump(), "sd_model_checkpoint": title, "sd_checkpoint_hash": sha256,
            "sd_vae": selection.vae, "CLIP_stop_at_last_layers": selection.clip_skip}


def _check_clip_skip(value: Any) -> int:
    try:
        return _CLIP_SKIP.validate_python(value)
    except ValidationError as error:
        errors = validation_errors(error.errors(include_url=False), GenerationRequest, ("body", "clip_skip"))
        for item in errors:
            item["loc"] = ["body", "CLIP_stop_at_last_layers"]
            item["msg"] = item["msg"].replace("clip_skip", "CLIP_stop_at_last_layers", 1)
        raise ApiError.from_errors(errors) from None


def set_options(ctx: AppContext, selection: ApiSelection, changes: dict[str, Any]) -> None:
    """Check every change first, then apply: switch the model, store the defaults, persist the options.

    As in A1111, keys that are not options here are ignored (with a warning in the log): clients post
    back the whole dict GET options gave them, including keys of A1111 settings we do not have. A fixed option
    (``FIXED_OPTIONS``) set to another value than the one shown is ignored with a warning as well.
    """
    engine = ctx.engine
    unknown = sorted(unsupported_options(changes))
    if unknown:
        log.warning("POST /sdapi/v1/options: %s not supported here; ignored", ", ".join(unknown))
    changes = {key: value for key, value in changes.items()
               if key not in READ_ONLY_OPTIONS and key not in unknown and key not in FIXED_OPTIONS}
    title = vae = clip_skip = None
    if "sd_model_checkpoint" in changes:
        title = resolve_checkpoint(engine, changes.pop("sd_model_checkpoint"), ("sd_model_checkpoint",))
    if "sd_vae" in changes:
        vae = resolve_vae(engine, changes.pop("sd_vae"), ("sd_vae",))
    if "CLIP_stop_at_last_layers" in changes:
        clip_skip = _check_clip_skip(changes.pop("CLIP_stop_at_last_layers"))
    check_option_changes(ctx.options, changes, ())

    if title is not None or vae is not None:
        # Loaded now, so that an unusable file is a 422 naming it and the selection stays as it was.
        def load(control) -> None:
            checkpoint = title or selection.checkpoint(engine.models)
            try:
                engine.models.get(checkpoint, vae or selection.vae)
            except ModelFileError as error:
                raise model_file_error(error, model_file_loc(error)) from None
            except _LOAD_ERRORS as error:
                raise EngineError(f"could not load {checkpoint}: {error}") from error

        ctx.queue.run(load, source="api", description=f"load {title or vae}")
    selection.select(title, vae, clip_skip, changes)


def router(ctx: AppContext, selection: ApiSelection, route_class: type) -> APIRouter:
    """The model and settings routes on ``ctx``."""
    api = APIRouter(route_class=route_class, tags=["models and settings"])
    engine = ctx.engine

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], response_model_exclude_unset=True)
    def sd_models(with_family: bool = False) -> list[dict]:
        """Checkpoints in models/Stable-diffusion and models/unet (and --ckpt-dir). ``with_family=true`` adds each
        one's model family (left out otherwise: A1111's clients read these items with strict models)."""
        items = []
        for m in engine.registry.checkpoints:
            item = {"title": m.title, "model_name": m.model_name, "hash": m.short_hash, "sha256": m.sha256,
                    "filename": str(m.path), "config": _sidecar_config(m.path)}
            if with_family:
                item["family"] = _family(m.path)
            items.append(item)
        return items

    @api.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem])
    def sd_vae() -> list[dict]:
        """VAEs in models/VAE (and --vae-dir)."""
        return [{"model_name": m.model_name, "filename": str(m.path)} for m in engine.registry.vaes]

    @api.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        """The settings: those of the Settings tab, plus sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers."""
        return current_options(ctx, selection)

    @api.post("/sdapi/v1/options")
    def post_options(changes: dict[str, Any] = Body(..., examples=[{"sd_model_checkpoint": "model.safetensors"}])
                     ) -> dict:
        """Change settings. ``sd_model_checkpoint`` (title, file name, name or hash) switches the model."""
        set_options(ctx, selection, changes)
        return {}

    @api.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> dict:
        """Scan the checkpoint folders again."""
        engine.registry.refresh()
        return {}

    @api.post("/sdapi/v1/refresh-vae")
    def refresh_vae() -> dict:
        """Scan the VAE folders again."""
        engine.registry.refresh()
        return {}

    @api.post("/sdapi/v1/unload-checkpoint")
    def unload_checkpoint() -> dict:
        """Free the loaded models; the selected one loads again with the next job."""
        def unload(control) -> None:
            title = selection.checkpoint(engine.models)
            if title:
                selection.select(title)
            engine.models.unload()

        ctx.queue.run(unload, source="api", description="unload models")
        return {}

    @api.post("/sdapi/v1/reload-checkpoint")
    def reload_checkpoint() -> dict:
        """Load the selected checkpoint again from disk."""
        def reload(control) -> None:
            title = selection.checkpoint(engine.models)
            engine.models.unload()
            if title:
                try:
                    engine.models.get(title, selection.vae)
                except ModelFileError as error:
                    raise StateConflict("ModelFileError", f"the selected model cannot be loaded: {error}") from None
                except _LOAD_ERRORS as error:
                    raise EngineError(f"could not load {title}: {error}") from error

        ctx.queue.run(reload, source="api", description="reload model")
        return {}

    return api
