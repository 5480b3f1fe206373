"""The family interface: everything the engine needs to know about one kind of diffusion model.

A family is one module in this package that defines one :class:`Family` named ``FAMILY``; the registry
(:mod:`pipelines.models.families`) lists the modules in one place. What a family declares:

- detection: :attr:`Family.claims_keys` (a single file's tensor names) and :attr:`Family.folder_classes`
  (the ``_class_name`` of a diffusers folder's ``model_index.json``);
- its shipped configs (:attr:`Family.config_dir`) and how a file or folder becomes a pipeline
  (:attr:`Family.load`);
- conditioning and sampling (:attr:`Family.encode`, :attr:`Family.sample`); None means the shared
  UNet path (``prompts/encoding.py`` and ``sampling/denoise.py``);
- the samplers it runs and the request defaults it changes (:attr:`Family.samplers`, :attr:`Family.defaults`);
- LoRA key mapping (:attr:`Family.lora_keys`) and its own infotext keys (:attr:`Family.infotext_fields`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family. ``name`` is what :class:`~pipelines.models.checkpoints.ModelFamily` carries."""

    name: str
    #: What users read: "SD 1.x", "Flux.1", shown in sd-models and error messages.
    label: str
    #: True if a single file with these tensor names is of this family (checked in registry order).
    claims_keys: Callable[[Collection[str]], bool]
    #: ``model_index.json`` ``_class_name`` values of this family's diffusers folders.
    folder_classes: tuple[str, ...] = ()
    #: The shipped configs (``pipelines/models/configs/<family>/``), None when the family ships none.
    config_dir: Path | None = None
    #: ``load(path, torch_dtype=..., cache_dir=..., text_encoders=...) -> (pipeline, ModelFamily)``; None: the
    #: shared Stable Diffusion loader in ``pipelines/models/checkpoints.py``.
    load: Callable[..., tuple[Any, Any]] | None = None
    #: ``encode(model, prompts, negative_prompts, steps, request) -> (conditioning, warnings)``; None: CLIP
    #: prompt weighting (``prompts/encoding.py``).
    encode: Callable[..., tuple[Any, list[str]]] | None = None
    #: ``sample(model, latents, conditioning, request, generators, on_step) -> latents``; None: the UNet loop.
    sample: Callable[..., Any] | None = None
    #: Sampler names of the sampler table this family runs; empty: all of them.
    samplers: tuple[str, ...] = ()
    #: Schedule types it runs (empty: all); the first is used for any other.
    schedules: tuple[str, ...] = ()
    #: Request fields (API names) and the values this family uses when a request leaves them unset.
    defaults: Mapping[str, object] = field(default_factory=dict)
    #: ``variant_defaults(path) -> {field: value}``: one model file's defaults beyond :attr:`defaults`, read
    #: cheaply from it (Flux.1 schnell, distilled to few steps: 4 steps); None: :attr:`defaults` for every file.
    variant_defaults: Callable[[Path], Mapping[str, object]] | None = None
    #: Shown in the negative prompt box for models that read it only sometimes (Flux.1: with real CFG only);
    #: None: the family always uses the negative prompt.
    negative_prompt_note: str | None = None
    #: ``lora_keys(state_dict) -> state_dict`` in the layout diffusers' LoRA loader reads; None: as is.
    lora_keys: Callable[[dict], dict] | None = None
    #: ``infotext_fields(request, model) -> {request field: value}`` written beyond the common ones.
    infotext_fields: Callable[[Any, Any], dict[str, object]] | None = None
    #: True for families whose denoiser is a UNet (ControlNet, step caching, hires' latent checks apply).
    unet: bool = True

    def defaults_for(self, path: Path) -> dict[str, object]:
        """The request defaults of the model file or folder at ``path``: the family's, then its variant's."""
        extra = self.variant_defaults(Path(path)) if self.variant_defaults is not None else {}
        return {**self.defaults, **extra}
