"""HTTP API: ``GET /sdapi/v1/loras`` and ``POST /sdapi/v1/refresh-loras`` (A1111's shapes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .library import LoraFile, LoraLibrary


def lora_item(file: LoraFile) -> dict[str, Any]:
    """One LoRA as ``/sdapi/v1/loras`` lists it: name (file stem, what ``<lora:name:1>`` uses), alias
    (``ss_output_name`` or the name), path, metadata (the safetensors metadata, JSON values decoded)."""
    return {"name": file.name, "alias": file.alias, "path": str(file.path), "metadata": file.metadata}


def add_routes(router: APIRouter, library: LoraLibrary) -> APIRouter:
    """Put the LoRA routes on ``router`` (one made by ``api.new_router()``)."""

    @router.get("/sdapi/v1/loras")
    def list_loras() -> list[dict[str, Any]]:
        """Every LoRA in models/Lora and --lora-dir, as last scanned."""
        return [lora_item(file) for file in library.files()]

    @router.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> None:
        """Scan the LoRA folders again."""
        library.refresh()

    return router
