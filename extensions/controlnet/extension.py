"""Built-in extension: ControlNet units in txt2img, img2img/inpaint and the hires pass, with
sd-webui-controlnet's API routes (``/controlnet/*``) and ``alwayson_scripts["controlnet"]`` arguments."""

from __future__ import annotations

from webui.extension_api import ExtensionAPI, ScriptControls, TabUi

from .models import ControlNetLibrary
from .routes import add_routes
from .script import ControlNetScript


def setup(api: ExtensionAPI) -> None:
    """Register the ControlNet script, its accordion and its routes."""
    library = ControlNetLibrary(folders=lambda: api.model_dirs("controlnet"), file_hash=api.file_hash,
                                device=lambda: api.device, dtype=lambda: api.dtype,
                                annotator_folders=lambda: api.model_dirs("controlnet_annotator"),
                                memory_mode=lambda: api.memory_mode,
                                clip_vision_folders=lambda: api.model_dirs("clip_vision"))

    def build(tab_ui: TabUi) -> ScriptControls:
        from .ui import build_ui  # gradio is imported only when the UI is built (plain Python and the API run without)

        return build_ui(library)(tab_ui)

    api.add_script(ControlNetScript(library), ui=build)
    api.add_api_routes(add_routes(api.new_router("ControlNet"), library))
