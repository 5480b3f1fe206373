"""``<lora:name:weight>`` tags: diffusers adapters on the job's model for one job, removed afterwards.

``<lora:name>`` = weight 1; ``<lora:name:w>`` = w for the text encoder(s) and the UNet;
``<lora:name:te:unet>`` (or ``te=...``/``unet=...``) weighs them apart. Weight 0 turns a part off, negative
weights work. diffusers' ``load_lora_weights`` reads kohya / A1111, LyCORIS (LoCon) and diffusers / peft key
formats; ``set_adapters`` gives each part its weight. Deactivating deletes our adapters and, when no adapter
is left, takes the LoRA layers out of the modules, so the model is exactly what it was before the job.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from webui.extension_api import ExtraNetworkTag, LoadedModel

from .library import LoraFile, LoraLibrary, LoraTagError

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "sdui_lora_"
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a job: the name as the prompt wrote it, its file and the weights of the two parts."""

    mentioned: str
    file: LoraFile
    te: float
    unet: float

    @property
    def off(self) -> bool:
        return self.te == 0 and self.unet == 0


def _weight(text: str, tag: ExtraNetworkTag) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoraTagError(f"<lora:{':'.join(tag.args)}>: weight {text!r} is not a number") from None


def parse_tag(tag: ExtraNetworkTag) -> tuple[str, float, float]:
    """(name, text-encoder weight, UNet weight) of one tag; LoraTagError (a ValueError) naming the tag otherwise."""
    if not tag.args or not tag.args[0].strip():
        raise LoraTagError("<lora:...>: the tag needs a LoRA name, like <lora:name:0.8>")
    name, rest = tag.args[0].strip(), [arg.strip() for arg in tag.args[1:]]
    named = {k.strip().lower(): v for k, _, v in (arg.partition("=") for arg in rest if "=" in arg)}
    positional = [arg for arg in rest if "=" not in arg]
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 2:
        raise LoraTagError(f"<lora:{':'.join(tag.args)}>: expected <lora:name:weight> or <lora:name:te_weight:"
                           "unet_weight> (or te=/unet=)")
    te = _weight(positional[0], tag) if positional else 1.0
    unet = _weight(positional[1], tag) if len(positional) > 1 else te
    te = _weight(named["te"], tag) if "te" in named else te
    unet = _weight(named["unet"], tag) if "unet" in named else unet
    return name, te, unet


def resolve(library: LoraLibrary, tags: Sequence[ExtraNetworkTag]) -> list[LoraUse]:
    """The LoRAs of a job, in prompt order; a LoRA named twice keeps its last weights.

    Everything is checked before the model is touched: an unknown name raises UnknownLoraError.
    """
    uses: dict = {}
    for tag in tags:
        name, te, unet = parse_tag(tag)
        file = library.find(name)
        uses.pop(file.path, None)
        uses[file.path] = LoraUse(name, file, te, unet)
    return list(uses.values())


def hashes_param(library: LoraLibrary, uses: Sequence[LoraUse]) -> str:
    """The ``Lora hashes`` value: ``name: 12hex, ...`` with names as the prompt wrote them."""
    return ", ".join(f"{use.mentioned.replace(':', '').replace(',', '')}: {library.short_hash(use.file)}"
                     for use in uses)


@contextmanager
def _quiet_adapter_loading() -> Iterator[None]:
    # transformers reports the text encoder's base weights as "MISSING ... newly initialized" when diffusers
    # loads an adapter into it; they are untouched (tests check the pixels), so the warning would only alarm.
    # peft warns about "multiple adapters in the model" from the second LoRA of a job on: that is the intent.
    # transformers also draws a "Loading weights" bar per text encoder for the few adapter tensors.
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("transformers.integrations.peft")
    level = logger.level
    bars = transformers_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()


class LoraNetwork:
    """The extra-network handler for ``<lora:...>`` (see ``ExtraNetworkHandler``)."""

    def __init__(self, library: LoraLibrary):
        self.library = library
        #: Adapter names we loaded, by the id of the pipeline they live in.
        self._loaded: dict[int, list[str]] = {}

    def activate(self, model: LoadedModel, tags: Sequence[ExtraNetworkTag]) -> Mapping[str, object]:
        """Load the tags' LoRAs into ``model.pipe`` with their weights; returns ``{"Lora hashes": ...}``."""
        uses = resolve(self.library, tags)
        if not uses:
            return {}
        params = {"Lora hashes": hashes_param(self.library, uses)}
        # Loaded in file order, so that the same LoRAs give the same pixels whatever the order of their tags.
        active = sorted((use for use in uses if not use.off), key=lambda use: str(use.file.path))
        if not active:
            return params
        pipe: Any = model.pipe  # a diffusers pipeline with the LoRA loader mix-in
        names: list[str] = []
        self._loaded[id(pipe)] = names
        try:
            for index, use in enumerate(active):
                names.append(f"{ADAPTER_PREFIX}{index}")  # before loading: a half-loaded adapter is removed too
                self._load(pipe, use, names[-1], model)
            present = pipe.get_list_adapters()
            pipe.set_adapters(names, [_part_weights(present, name, use) for name, use in zip(names, active)])
        except BaseException:
            # The engine only calls deactivate after activate returned: undo a half-done activation here.
            self.deactivate(model)
            raise
        return params

    def _load(self, pipe, use: LoraUse, adapter: str, model: LoadedModel) -> None:
        weights = self.library.weights(use.file)
        family = getattr(getattr(model, "family", None), "name", "this")
        try:
            with _quiet_adapter_loading():
                pipe.load_lora_weights(weights, adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError, IndexError) as error:
            raise LoraTagError(f"<lora:{use.mentioned}>: {use.file.path.name} does not fit the {family} model "
                               f"(a LoRA for another base model?): {error}") from error
        if not any(adapter in adapters for adapters in pipe.get_list_adapters().values()):
            raise LoraTagError(f"<lora:{use.mentioned}>: none of the weights in {use.file.path.name} fit the {family} "
                               "model (a LoRA for another base model?)")

    def deactivate(self, model: LoadedModel) -> None:
        """Delete the adapters this handler loaded; with none left, restore the plain modules."""
        pipe: Any = model.pipe  # a diffusers pipeline with the LoRA loader mix-in
        names = self._loaded.pop(id(pipe), [])
        if not names:
            return
        present = pipe.get_list_adapters()
        ours = [name for name in names if any(name in adapters for adapters in present.values())]
        if ours:
            pipe.delete_adapters(ours)
        if not any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()


def _part_weights(present: Mapping[str, Sequence[str]], adapter: str, use: LoraUse) -> dict[str, float]:
    """set_adapters' per-part weights, naming only the parts the adapter really has."""
    parts = {"unet": use.unet, **{encoder: use.te for encoder in _TEXT_ENCODERS}}
    return {part: weight for part, weight in parts.items() if adapter in present.get(part, ())}
