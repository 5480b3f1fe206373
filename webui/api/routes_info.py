"""Lists and facts: samplers, schedulers, upscalers, styles, embeddings, flags, memory, scripts, png-info.

Features that later issues add (face restoration, hypernetworks) answer honest
empty lists until they exist; those issues replace the lists here.
"""

from __future__ import annotations

import logging
from typing import Any

import psutil
import torch
from fastapi import APIRouter

from pipelines.images.saving import decode_base64_image, read_image_metadata, read_infotext
from pipelines.sampling.samplers import SAMPLERS, SCHEDULES
from webui.api.errors import ApiError
from webui.api.infotext_compat import a1111_parameters
from webui.api.models import (
    LatentUpscalerModeItem,
    PNGInfoRequest,
    PNGInfoResponse,
    PromptStyleItem,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    UpscalerItem,
)
from webui.context import AppContext

log = logging.getLogger("webui.api")
#: The scale A1111 answers for an upscaler that has none of its own (the built-ins).
DEFAULT_UPSCALER_SCALE = 4
#: A1111's latent upscale modes for hires fix (docs/compatibility.md §9).
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")


def _memory() -> dict[str, Any]:
    ram = psutil.virtual_memory()
    answer: dict[str, Any] = {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        answer["cuda"] = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": {"current": stats.get("active_bytes.all.current", 0),
                       "peak": stats.get("active_bytes.all.peak", 0)},
            "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                          "peak": stats.get("allocated_bytes.all.peak", 0)},
            "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                         "peak": stats.get("reserved_bytes.all.peak", 0)},
            "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                         "peak": stats.get("inactive_split_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    else:
        answer["cuda"] = {"error": "CUDA is not available"}
    return answer


def png_info(image_b64: str) -> dict[str, Any]:
    """The infotext of an image, its other text fields, and the infotext parsed."""
    try:
        image = decode_base64_image(image_b64)
    except ValueError as error:
        raise ApiError(("image",), f"image: {error}") from None
    with image:
        info = read_infotext(image) or ""
        items = {key: value for key, value in read_image_metadata(image).items() if key != "parameters"}
    if info and items.get("UserComment") == info:
        del items["UserComment"]  # the infotext of a JPEG/WebP, already in "info"
    # As A1111's API: parsed by its rules (text values, its defaults), even when the image carries none.
    return {"info": info, "items": items, "parameters": a1111_parameters(info)}


def router(ctx: AppContext, route_class: type) -> APIRouter:
    """The list and info routes on ``ctx``."""
    api = APIRouter(route_class=route_class, tags=["info"])
    engine = ctx.engine

    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    def samplers() -> list[dict]:
        """Sampling methods with their aliases and schedule types."""
        return [{"name": s.name, "aliases": list(s.aliases), "options": {"scheduler": s.default_schedule}}
                for s in SAMPLERS.values()]

    @api.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[dict]:
        """Schedule types, as A1111 lists them: name, label, aliases, default_rho, need_inner_model."""
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
                 "need_inner_model": s.need_inner_model} for s in SCHEDULES]

    @api.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem])
    def upscalers() -> list[dict]:
        """Image upscalers: the built-ins (None, Lanczos, Nearest) and the usable model files.

        As in A1111 every entry has a scale: the model's own, 4 for the built-ins (A1111's default). A model
        file that cannot be used is left out and logged with the reason (the UI lists it with the reason).
        """
        ctx.upscalers.refresh()
        unusable = ctx.upscalers.unusable()
        listed = []
        for u in ctx.upscalers.upscalers:
            scale = ctx.upscalers.scale(u.name) if u.is_model else DEFAULT_UPSCALER_SCALE
            if scale is None:
                log.warning("GET /sdapi/v1/upscalers: %s left out: %s", u.name, unusable.get(u.name, "cannot be used"))
                continue
            listed.append({"name": u.name, "model_name": u.model_name, "model_path": str(u.path) if u.path else None,
                           "model_url": None, "scale": float(scale)})
        return listed

    @api.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscalerModeItem])
    def latent_upscale_modes() -> list[dict]:
        """Latent upscale modes of hires fix."""
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @api.get("/sdapi/v1/prompt-styles", response_model=list[PromptStyleItem])
    def prompt_styles() -> list[dict]:
        """Styles from styles.csv."""
        engine.styles.reload()
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in engine.styles.styles()]

    @api.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        """Textual inversion embeddings: loaded ones, and files that failed to load."""
        engine.embeddings.refresh()
        loaded = {
            ti.name: {"step": ti.step, "sd_checkpoint": None, "sd_checkpoint_name": ti.sd_checkpoint_name,
                      "shape": int(next(iter(ti.vectors.values())).shape[-1]), "vectors": ti.vector_count}
            for ti in engine.embeddings.items()
        }
        skipped = {path: {"error": message} for path, message in engine.embeddings.errors.items()}
        return {"loaded": loaded, "skipped": skipped}

    @api.post("/sdapi/v1/refresh-embeddings")
    def refresh_embeddings() -> dict:
        """Scan the embeddings folder again."""
        engine.embeddings.refresh()
        return {}

    @api.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        """The command-line flags, secrets masked."""
        return ctx.flags.public()

    @api.get("/sdapi/v1/memory")
    def memory() -> dict[str, Any]:
        """RAM and, on CUDA, GPU memory in bytes."""
        return _memory()

    @api.get("/sdapi/v1/scripts", response_model=ScriptsList)
    def scripts() -> dict:
        """Script names by tab, as A1111 lists them: the Script dropdown's (lowercase titles), then the
        always-on scripts of the loaded extensions. With ControlNet, "controlnet m2m" too, as
        sd-webui-controlnet lists it (clients such as webuiapi look for that name)."""
        lists = {}
        for tab in ("txt2img", "img2img"):
            names = [title.lower() for title, _ in ctx.extensions.selectable_for(tab)]
            names += [name for name, _ in ctx.extensions.scripts_for(tab)]
            if "controlnet" in names:
                names.append("controlnet m2m")
            lists[tab] = names
        return lists

    @api.get("/sdapi/v1/extensions")
    def extensions() -> list[dict]:
        """Every extension folder found: built-ins and plug-ins, loaded, disabled or failed (with the error)."""
        return [{"name": r.name, "remote": r.remote, "branch": r.branch, "commit_hash": r.commit_hash,
                 "version": r.commit_hash[:8], "commit_date": 0, "enabled": r.loaded, "builtin": r.builtin,
                 "error": r.error} for r in ctx.extensions.records]

    @api.get("/sdapi/v1/face-restorers")
    def face_restorers() -> list[dict]:
        """The face restorers (A1111's: CodeFormer, GFPGAN) with the folder their model goes in (``cmd_dir``), the
        file found there (None: not installed yet) and whether everything they need is there."""
        faces = ctx.engine.face_restorers
        answer = []
        for name in faces.names:
            model = faces.model_file(name)
            try:
                faces.check(name)
                ready = True
            except ValueError:
                ready = False
            answer.append({"name": name, "cmd_dir": str(faces.folder(name)),
                           "model_path": str(model) if model else None, "ready": ready})
        return answer

    @api.get("/sdapi/v1/realesrgan-models")
    def realesrgan_models() -> list[dict]:
        """The Real-ESRGAN model files (from ``models/RealESRGAN/``)."""
        ctx.upscalers.refresh()
        return [{"name": u.name, "path": str(u.path), "scale": ctx.upscalers.scale(u.name)}
                for u in ctx.upscalers.upscalers if u.kind == "realesrgan"]

    @api.get("/sdapi/v1/hypernetworks")
    def hypernetworks() -> list[dict]:
        """Hypernetworks (not supported)."""
        return []

    @api.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    def png_info_route(body: PNGInfoRequest) -> dict:
        """Read the generation parameters an image carries."""
        return png_info(body.image)

    return api
