"""Built-in extension: LoRA (``<lora:name:weight>`` in prompts), its browser, API routes and paste hook.

Files in ``models/Lora`` and ``--lora-dir``: kohya / A1111, LyCORIS (LoCon) and diffusers / peft formats,
for SD 1.x, SD 2.x and SDXL, as far as diffusers reads them; for Flux.1 and SD 3.5 also kohya sd-scripts, ComfyUI,
ai-toolkit and XLabs files (the family's ``lora_keys`` hook converts what diffusers does not read). See
``network.py`` for the tag syntax.
"""

from __future__ import annotations

from functools import partial

from webui.extension_api import ExtensionAPI

from .library import LoraLibrary
from .network import LoraNetwork
from .pasting import resolve_by_hash
from .routes import add_routes


def setup(api: ExtensionAPI) -> None:
    """Register the ``lora`` tag handler, the LoRA browser, ``/sdapi/v1/loras`` and the paste hook."""
    library = LoraLibrary(lambda: api.model_dirs("lora"), lambda path: api.file_hash(path, "addnet"))
    api.add_extra_network("lora", LoraNetwork(library))
    api.add_paste_hook(partial(resolve_by_hash, library))
    api.add_api_routes(add_routes(api.new_router("LoRA"), library))
    # The browser imports gradio; only the UI builds it, so an API-only server never loads gradio for it.
    api.add_prompt_panel("Lora", partial(_build_panel, library))


def _build_panel(library: LoraLibrary, tab_ui) -> None:
    from .ui import build_panel

    build_panel(library, tab_ui)
