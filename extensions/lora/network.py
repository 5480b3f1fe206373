"""``<lora:name:weight>`` tags: diffusers adapters on the job's model for one job, removed afterwards.

``<lora:name>`` = weight 1; ``<lora:name:w>`` = w for the text encoder(s) and the UNet;
``<lora:name:te:unet>`` (or ``te=...``/``unet=...``) weighs them apart. Weight 0 turns a part off, negative
weights work. diffusers' ``load_lora_weights`` reads kohya / A1111, LyCORIS (LoCon) and diffusers / peft key
formats, after the model family's ``lora_keys`` hook converted the layouts it does not read (Flux.1 and SD 3.5
files from kohya sd-scripts or ComfyUI); ``set_adapters`` gives each part its weight. Deactivating deletes our
adapters and, when no adapter is left, takes the LoRA layers out of the modules, so the model is exactly what it
was before the job.
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

    # diffusers logs an ERROR listing every unmatched module of a LoRA for another base model: the caller
    # reports that in one line (and logs the details at INFO).
    logger = logging.getLogger("transformers.integrations.peft")
    diffusers_logger = logging.getLogger("diffusers.loaders.peft")
    level, diffusers_level = logger.level, diffusers_logger.level
    bars = transformers_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    diffusers_logger.setLevel(logging.CRITICAL)
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        logger.setLevel(level)
        diffusers_logger.setLevel(diffusers_level)
        if bars:
            transformers_logging.enable_progress_bar()


class LoraNetwork:
    """The extra-network handler for ``<lora:...>`` (see ``ExtraNetworkHandler``)."""

    def __init__(self, library: LoraLibrary):
        self.library = library
        #: Adapter names we loaded, by the id of the pipeline they live in.
        self._loaded: dict[int, list[str]] = {}
        #: Warnings of the last activation (LoRAs skipped), by the id of the pipeline, until read.
        self._warnings: dict[int, list[str]] = {}

    def activate(self, model: LoadedModel, tags: Sequence[ExtraNetworkTag]) -> Mapping[str, object]:
        """Load the tags' LoRAs into ``model.pipe`` with their weights; returns ``{"Lora hashes": ...}``."""
        uses = resolve(self.library, tags)
        if not uses:
            return {}
        params = {"Lora hashes": hashes_param(self.library, uses)}
        self._warnings.pop(id(model.pipe), None)
        # Loaded in file order, so that the same LoRAs give the same pixels whatever the order of their tags.
        active = sorted((use for use in uses if not use.off), key=lambda use: str(use.file.path))
        if not active:
            return params
        pipe: Any = model.pipe  # a diffusers pipeline with the LoRA loader mix-in
        names: list[str] = []
        loaded: list[LoraUse] = []
        self._loaded[id(pipe)] = names
        self._warnings[id(pipe)] = skipped = []
        try:
            for use in active:
                names.append(f"{ADAPTER_PREFIX}{len(names)}")  # before loading: a half-loaded adapter is removed too
                problem = self._load(pipe, use, names[-1], model)
                if problem is None:
                    loaded.append(use)
                    continue
                # As A1111 does: a LoRA that does not fit the model is left out, the job goes on without it.
                _drop_adapters(pipe, [names.pop()])
                skipped.append(problem)
            applied = [use for use in uses if use.off or use in loaded]
            params = {"Lora hashes": hashes_param(self.library, applied)} if applied else {}
            if names:
                present = pipe.get_list_adapters()
                pipe.set_adapters(names, [_part_weights(present, name, use) for name, use in zip(names, loaded)])
        except BaseException:
            # The engine only calls deactivate after activate returned: undo a half-done activation here.
            self.deactivate(model)
            raise
        return params

    def warnings(self, model: LoadedModel) -> list[str]:
        """One line per LoRA of the last activation that was skipped because it does not fit ``model``."""
        return self._warnings.pop(id(model.pipe), [])

    def _load(self, pipe, use: LoraUse, adapter: str, model: LoadedModel) -> str | None:
        """Load one LoRA as ``adapter``; the warning line when it does not fit the model (then it is skipped)."""
        weights = self.library.weights(use.file)
        family = getattr(getattr(model, "family", None), "name", "this")
        problem = (f"<lora:{use.mentioned}>: skipped, {use.file.path.name} does not fit the {family} model "
                   "(a LoRA for another base model?)")
        # A family whose LoRAs are published in other key layouts (Flux.1, SD 3.5) converts them first.
        convert = getattr(getattr(model, "spec", None), "lora_keys", None)
        try:
            if convert is not None:
                weights = convert(weights)
            with _quiet_adapter_loading():
                pipe.load_lora_weights(weights, adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError, IndexError) as error:
            # diffusers' message lists every module that did not match: the log keeps it, the user gets one line.
            log.info("%s: %s", problem, error)
            return problem
        if not any(adapter in adapters for adapters in pipe.get_list_adapters().values()):
            return problem
        return None

    def deactivate(self, model: LoadedModel) -> None:
        """Delete the adapters this handler loaded; with none left, restore the plain modules."""
        pipe: Any = model.pipe  # a diffusers pipeline with the LoRA loader mix-in
        names = self._loaded.pop(id(pipe), [])
        if not names:
            return
        _drop_adapters(pipe, names)


def _drop_adapters(pipe: Any, names: Sequence[str]) -> None:
    """Delete the adapters ``names`` that are present; with none left, restore the plain modules."""
    present = pipe.get_list_adapters()
    ours = [name for name in names if any(name in adapters for adapters in present.values())]
    if ours:
        pipe.delete_adapters(ours)
    if not any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()


def _part_weights(present: Mapping[str, Sequence[str]], adapter: str, use: LoraUse) -> dict[str, float]:
    """set_adapters' per-part weights, naming only the parts the adapter really has."""
    # The denoiser's weight goes to the UNet, or to the transformer of a family without one (Flux.1, SD 3.5).
    parts = {"unet": use.unet, "transformer": use.unet, **{encoder: use.te for encoder in _TEXT_ENCODERS}}
    return {part: weight for part, weight in parts.items() if adapter in present.get(part, ())}
