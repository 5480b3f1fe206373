"""Built-in extension: ControlNet units in txt2img, img2img/inpaint and the hires pass, with
sd-webui-controlnet's API routes (``/controlnet/*``) and ``alwayson_scripts["controlnet"]`` arguments."""

from __future__ import annotations

from webui.extension_api import ExtensionAPI

from .models import ControlNetLibrary
from .routes import add_routes
from .script import ControlNetScript
from .ui import build_ui


def setup(api: ExtensionAPI) -> None:
    """Register the ControlNet script, its accordion and its routes."""
    library = ControlNetLibrary(folders=lambda: api.model_dirs("controlnet"), file_hash=api.file_hash,
                                device=lambda: api.device, dtype=lambda: api.dtype,
                                annotator_folders=lambda: api.model_dirs("controlnet_annotator"))
    api.add_script(ControlNetScript(library), ui=build_ui(library))
    api.add_api_routes(add_routes(api.new_router("ControlNet"), library))
