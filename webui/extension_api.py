"""The public interface for extensions: the one module an extension imports from us.

An extension is a folder in ``extensions/`` holding ``extension.py`` with a ``setup`` function::

    from webui.extension_api import AlwaysOnScript, ExtensionAPI, Job

    class Sharpen(AlwaysOnScript):
        name, title = "sharpen", "Sharpen"
        ...

    def setup(api: ExtensionAPI) -> None:
        api.add_script(Sharpen(), ui=build_controls)

``setup`` registers what the extension provides; nothing it registers takes effect unless ``setup``
returns normally, so a broken extension leaves no half-registered pieces behind. See
``extensions/README.md`` for the whole guide and ``extensions/example.disabled/`` for a small example.

Everything an extension may use is importable from here; the names re-exported from the engine are
documented where they are defined (``pipelines/plugins/scripts.py``, ``pipelines/plugins/extra_networks.py``,
``pipelines/models/weights.py``: the one reader of model files, which never runs code from a pickle).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter

from pipelines.images.grids import GridLabel, annotated_grid, combine_grids, infotext_with_params, labels, save_grid
from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from pipelines.job_control import JobControl
from pipelines.models.manager import LoadedModel
from pipelines.models.weights import (
    ModelFileError,
    UnsafeCheckpointError,
    model_file_field,
    read_safetensors_header,
    read_weights,
)
from pipelines.plugins.extra_networks import ExtraNetworkHandler
from pipelines.plugins.scripts import (
    AlwaysOnScript,
    Job,
    JobRunner,
    ScriptError,
    SelectableScript,
    UnetCall,
    UnetPatch,
    UnetResiduals,
    validate_args,
)
from pipelines.processing import GenerationResult
from pipelines.prompts.parser import ExtraNetworkTag
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.sampling.samplers import SAMPLERS, SCHEDULE_NAMES
from webui.api.errors import ApiRoute

if TYPE_CHECKING:  # the engine itself is only handed in, never imported here at run time
    from pipelines.engine import Engine

__all__ = [
    "AlwaysOnScript", "ExtensionAPI", "ExtraNetworkHandler", "ExtraNetworkTag", "Job", "JobRunner", "PasteHook",
    "PromptPanel", "ScriptControls", "SelectableScript", "TabUi", "UnetCall", "UnetPatch", "UnetResiduals",
    "parse_infotext", "read_infotext", "ScriptError", "validate_args",
    "GenerationRequest", "Img2ImgRequest", "LoadedModel", "JobControl",
    "GenerationResult", "GridLabel", "annotated_grid", "combine_grids", "infotext_with_params", "labels", "save_grid",
    "ModelFileError", "UnsafeCheckpointError", "model_file_field", "read_safetensors_header", "read_weights",
]

TABS = ("txt2img", "img2img")


@dataclass(frozen=True)
class TabUi:
    """Where an extension's controls are being built: the tab and its prompt boxes (Gradio Textboxes)."""

    tab: str  # "txt2img" or "img2img"
    prompt: Any
    negative_prompt: Any


@dataclass
class ScriptControls:
    """What an always-on script's UI builder returns.

    ``inputs``: Gradio components whose values, in order, become the script's argument list (passed
    through ``to_args`` first when the UI's values are not already the API's argument list).
    ``paste``: (component, infotext key or function of the parsed infotext dict) pairs that "Send to" and
    "Read generation parameters" fill in.
    """

    inputs: list[Any]
    to_args: Callable[[list[Any]], list[Any]] | None = None
    paste: Sequence[tuple[Any, str | Callable[[dict[str, str]], Any]]] = field(default_factory=list)


#: Builds an always-on script's controls inside the accordion we open for it.
ScriptUiBuilder = Callable[[TabUi], ScriptControls]
#: Rewrites parsed infotext params before they are pasted into the UI (e.g. resolve LoRAs by hash).
PasteHook = Callable[[dict[str, str]], dict[str, str]]


@dataclass
class PromptPanel:
    """A panel shown under the prompt (like the LoRA browser); ``build`` makes its Gradio content."""

    title: str
    build: Callable[[TabUi], None]
    tabs: tuple[str, ...] = TABS


@dataclass
class Registrations:
    """What one extension's ``setup`` asked for; committed only if ``setup`` returned normally."""

    scripts: list[tuple[AlwaysOnScript, ScriptUiBuilder | None, tuple[str, ...]]] = field(default_factory=list)
    selectable_scripts: list[tuple[SelectableScript, ScriptUiBuilder | None, tuple[str, ...]]] = field(
        default_factory=list)
    extra_networks: list[tuple[str, ExtraNetworkHandler]] = field(default_factory=list)
    routers: list[APIRouter] = field(default_factory=list)
    panels: list[PromptPanel] = field(default_factory=list)
    paste_hooks: list[PasteHook] = field(default_factory=list)


class ExtensionAPI:
    """Handed to an extension's ``setup(api)``: facts about the app and the ``add_*`` registration calls."""

    def __init__(self, name: str, folder: Path, engine: Engine, *, builtin: bool):
        self.name = name
        #: The extension's own folder (for its data files).
        self.folder = folder
        self.builtin = builtin
        self.log = logging.getLogger(f"extensions.{name}")
        self._engine = engine
        self.registrations = Registrations()

    # --- facts ---------------------------------------------------------------------------------

    def model_dirs(self, kind: str) -> tuple[Path, ...]:
        """Folders holding models of ``kind`` ("lora", "controlnet", "controlnet_annotator", ...; the kinds of
        ``MODEL_KINDS`` in ``pipelines/settings.py``, others raise ValueError): ``models/<Folder>`` and any
        extra folder given on the command line (``--lora-dir``, ``--controlnet-dir``)."""
        return self._engine.paths.model_dirs(kind)

    @property
    def data_dir(self) -> Path:
        """The app's data folder (``models/``, ``outputs/``, ``config.json`` live under it)."""
        return self._engine.paths.data_dir

    @property
    def device(self) -> torch.device:
        """The device models run on."""
        return self._engine.models.device.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype models run in (fp16 on a GPU unless ``--no-half``, fp32 on the CPU)."""
        return self._engine.models.device.dtype

    @property
    def memory_mode(self) -> str:
        """"normal", "medvram" or "lowvram" (``--medvram`` / ``--lowvram``; always "normal" on the CPU): under
        the last two, an extension's own models leave the GPU when they are done."""
        return self._engine.models.device.memory_mode

    def file_hash(self, path: Path, kind: str = "sha256") -> str:
        """Full hex SHA-256 of a model file, cached by path, size and mtime: ``kind`` "sha256" hashes the
        whole file, "addnet" the bytes after a safetensors header (docs/compatibility.md §2, LoRA hashes)."""
        hashes = self._engine.registry.hashes
        if kind == "addnet":
            return hashes.addnet_hash(Path(path))
        if kind == "sha256":
            return hashes.sha256(Path(path))
        raise ValueError(f"kind must be 'sha256' or 'addnet', got {kind!r}")

    def current_model(self) -> LoadedModel | None:
        """The loaded checkpoint (``.unet``, ``.vae``, ``.family``, ``.is_sdxl``), or None."""
        return self._engine.models.current

    def new_router(self, tag: str | None = None) -> APIRouter:
        """An APIRouter whose routes report bad input like ours do (422 naming the field), listed in /docs
        under ``tag`` (default: the extension's name)."""
        return APIRouter(route_class=ApiRoute, tags=[tag or self.name])

    # --- registration --------------------------------------------------------------------------

    def add_script(self, script: AlwaysOnScript, *, ui: ScriptUiBuilder | None = None,
                   tabs: Sequence[str] = TABS) -> None:
        """Register an always-on script (its args arrive as ``alwayson_scripts[script.name]``), with an
        optional UI builder whose controls appear in an accordion titled ``script.title`` on ``tabs``."""
        bad = [tab for tab in tabs if tab not in TABS]
        if bad:
            raise ValueError(f"tabs must be among {TABS}, got {bad}")
        self.registrations.scripts.append((script, ui, tuple(tabs)))

    def add_extra_network(self, name: str, handler: ExtraNetworkHandler) -> None:
        """Make ``handler`` handle the ``<name:...>`` prompt tags (see ExtraNetworkHandler)."""
        self.registrations.extra_networks.append((name, handler))

    def add_api_routes(self, router: APIRouter) -> None:
        """Serve ``router``'s routes with the HTTP API (``--api``/``--nowebui``), behind ``--api-auth``.
        A plug-in's route whose path and method are taken already is refused."""
        self.registrations.routers.append(router)

    def add_prompt_panel(self, title: str, build: Callable[[TabUi], None], tabs: Sequence[str] = TABS) -> None:
        """Show a panel under the prompt of ``tabs``, built by ``build(tab_ui)`` (e.g. a browser whose
        cards insert a tag into ``tab_ui.prompt``)."""
        self.registrations.panels.append(PromptPanel(title, build, tuple(tabs)))

    def add_selectable_script(self, script: SelectableScript, *, ui: ScriptUiBuilder | None = None,
                              tabs: Sequence[str] = TABS) -> None:
        """Register a script for the Script dropdown (API ``script_name`` = its title); ``ui`` builds its
        controls, shown while it is selected; their values become ``script_args``."""
        bad = [tab for tab in tabs if tab not in TABS]
        if bad:
            raise ValueError(f"tabs must be among {TABS}, got {bad}")
        self.registrations.selectable_scripts.append((script, ui, tuple(tabs)))

    def add_paste_hook(self, hook: PasteHook) -> None:
        """Rewrite parsed infotext params before "Send to" / "Read generation parameters" paste them."""
        self.registrations.paste_hooks.append(hook)

    # --- facts for the Script dropdown's scripts (read-only) ------------------------------------

    @property
    def outputs_dir(self) -> Path:
        """The outputs folder (``outputs/`` under the data dir unless configured): grids go to
        ``<mode>-grids/`` there (see save_grid)."""
        return self._engine.paths.outputs_dir

    def checkpoint_titles(self) -> list[str]:
        """Titles ("name.safetensors [hash]") of the checkpoints found now, in folder order."""
        return [model.title for model in self._engine.registry.checkpoints]

    def find_checkpoint(self, query: str) -> str:
        """The title of the checkpoint ``query`` names (title, file name, name or hash); LookupError lists
        the available ones."""
        return self._engine.registry.find_checkpoint(query).title

    def vae_names(self) -> list[str]:
        """What a request's ``vae`` may be: "Automatic", "None" and the files in models/VAE."""
        return ["Automatic", "None", *(vae.name for vae in self._engine.registry.vaes)]

    def sampler_names(self) -> list[str]:
        """The sampling methods, as the Sampling method dropdown lists them."""
        return list(SAMPLERS)

    def schedule_names(self) -> list[str]:
        """The schedule types ("Automatic" first)."""
        return list(SCHEDULE_NAMES)

    def hires_upscaler_names(self) -> list[str]:
        """What ``hr_upscaler`` may be: the latent modes, then the image upscalers."""
        return self._engine.hires_upscaler_names()
