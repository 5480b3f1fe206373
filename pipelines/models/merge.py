"""The Checkpoint Merger: weighted sum, add difference, or no interpolation, written tensor by tensor.

As A1111's Checkpoint Merger (the UI tab in ``webui/ui/merger.py`` is a thin client of this):

- **Weighted sum**: ``A * (1 - M) + B * M``;
- **Add difference**: ``A + (B - C) * M``;
- **No interpolation**: A alone, to convert it (``.ckpt`` -> ``.safetensors``, float16) or bake in a VAE.

Only keys with ``model`` in their name are merged (all of an SD checkpoint's UNet, VAE and text encoder keys);
others, and keys that B lacks, are A's. A 9-channel (inpainting) or 8-channel (instruct-pix2pix) A merges with
a plain B in its first four input channels. *Bake in VAE* replaces A's ``first_stage_model.*`` keys with the
VAE file's weights; *Discard weights with matching name* drops keys matching a regular expression; *Copy
config from* copies the sidecar ``<name>.yaml`` of A, B or C to the new model.

Memory: the output is a ``.safetensors`` file written key by key (:class:`SafetensorsWriter`): the header is
planned from the inputs' headers, then each merged tensor is computed from one tensor of A, B and C, written
and dropped. A ``.safetensors`` input is read key by key too (:func:`open_weights`), so two SDXL models merge
holding a few tensors at a time. A pickled ``.ckpt`` input can only be read whole (safely), so it costs its
size. Diffusers folders are not merge inputs (their weights are split over components with other names):
choosing one is refused naming the field. The output is ``.safetensors`` only: it is the format that can be
written tensor by tensor, and it holds no code; "No interpolation" converts a ``.ckpt`` to it.

The file is written under a hidden temporary name in the first checkpoint folder and renamed when complete,
so a failed or interrupted merge leaves nothing behind and the model list never shows half a file. The
safetensors metadata carries A1111's ``sd_merge_recipe`` and ``sd_merge_models`` JSON.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.files import atomic_output
from pipelines.job_control import JobControl
from pipelines.models.catalog import ModelFile, ModelRegistry
from pipelines.models.hashes import legacy_hash
from pipelines.models.weights import (
    SAFETENSORS_SUFFIX,
    SafetensorsWriter,
    TensorInfo,
    WeightsStream,
    open_weights,
    read_weights,
)

log = logging.getLogger(__name__)

InterpMethod = Literal["No interpolation", "Weighted sum", "Add difference"]
ConfigSource = Literal["A, B or C", "B", "C", "Don't"]
INTERP_METHODS: tuple[str, ...] = ("No interpolation", "Weighted sum", "Add difference")
CONFIG_SOURCES: tuple[str, ...] = ("A, B or C", "B", "C", "Don't")
#: Keys never merged (A's value is kept), as A1111's ``checkpoint_dict_skip_on_merge``.
SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
VAE_PREFIX = "first_stage_model."
_BAD_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


class MergeSettings(BaseModel):
    """One merge, with A1111's field names (``run_modelmerger``'s arguments)."""

    model_config = ConfigDict(extra="forbid")

    primary_model_name: str = Field(description="Primary model (A): a checkpoint title, file name or hash.")
    secondary_model_name: str = Field("", description="Secondary model (B); needed by Weighted sum and Add "
                                                      "difference.")
    tertiary_model_name: str = Field("", description="Tertiary model (C); needed by Add difference.")
    interp_method: InterpMethod = Field("Weighted sum", description="Interpolation Method.")
    multiplier: float = Field(0.3, ge=0.0, le=1.0, description="Multiplier (M) - set to 0 to get model A.")
    save_as_half: bool = Field(False, description="Save as float16: float32 tensors are stored as float16.")
    custom_name: str = Field("", description="Custom Name (Optional): the new file's name without extension.")
    checkpoint_format: Literal["safetensors"] = Field(
        "safetensors", description="Checkpoint format: safetensors only (written tensor by tensor, holds no code).")
    config_source: ConfigSource = Field("A, B or C", description="Copy config from: whose sidecar .yaml to copy.")
    bake_in_vae: str = Field("None", description="Bake in VAE: a VAE file name, or None.")
    discard_weights: str = Field("", description="Discard weights with matching name (a regular expression).")
    save_metadata: bool = Field(True, description="Save metadata.")
    add_merge_recipe: bool = Field(True, description="Add merge recipe metadata (sd_merge_recipe, sd_merge_models).")
    copy_metadata_fields: bool = Field(True, description="Copy metadata from merged models.")

    @field_validator("custom_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        value = value.strip()
        if value and (_BAD_NAME.search(value) or value.startswith(".") or value in ("..",)):
            raise ValueError(f"custom_name: a plain file name without folders or any of \\ / : * ? \" < > | "
                             f"and not starting with '.', got {value!r}")
        return value

    @field_validator("discard_weights")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"discard_weights: not a regular expression ({error})") from error
        return value

    @property
    def uses_b(self) -> bool:
        return self.interp_method != "No interpolation"

    @property
    def uses_c(self) -> bool:
        return self.interp_method == "Add difference"


@dataclass
class MergeResult:
    path: Path
    #: The new model as the checkpoint list shows it ("name [hash]").
    title: str
    config: Path | None
    metadata: dict[str, str]
    inpainting: bool


def _find(registry: ModelRegistry, name: str, field: str, role: str) -> ModelFile:
    if not name.strip():
        raise ValueError(f"{field}: choose the {role} model")
    try:
        model = registry.find_checkpoint(name)
    except LookupError as error:
        raise LookupError(f"{field}: {error}") from None
    if model.is_folder:
        raise ValueError(f"{field}: {model.name} is a diffusers folder; the merger reads single-file checkpoints "
                         "(.safetensors, .ckpt) only")
    return model


def _out_dtype(dtypes: list[torch.dtype], half: bool) -> torch.dtype:
    """The stored dtype of a merged key: the widest input dtype (as torch would give it), float16 when asked."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return torch.float16 if half and dtype == torch.float32 else dtype


def _parse_json(value: str | None) -> object:
    if not isinstance(value, str) or not value.startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def default_name(settings: MergeSettings, a: ModelFile, b: ModelFile | None, c: ModelFile | None) -> str:
    """A1111's file name for a merge without a custom name."""
    m = settings.multiplier
    if settings.interp_method == "Weighted sum" and b is not None:
        return f"{round(1 - m, 2)}({a.model_name}) + {round(m, 2)}({b.model_name})"
    if settings.interp_method == "Add difference" and b is not None and c is not None:
        return f"{a.model_name} + {round(m, 2)}({b.model_name} - {c.model_name})"
    return a.model_name


class _Merge:
    """The plan of one merge: which keys come out, with which dtype and shape, computed how."""

    def __init__(self, settings: MergeSettings, a: WeightsStream, b: WeightsStream | None, c: WeightsStream | None,
                 vae: dict[str, torch.Tensor] | None):
        self.settings, self.a, self.b, self.c, self.vae = settings, a, b, c, vae
        self.inpainting = False
        discard = re.compile(settings.discard_weights) if settings.discard_weights else None
        self.layout: list[tuple[str, TensorInfo]] = []
        for key in a.keys():
            if discard is not None and discard.search(key):
                continue
            self.layout.append((key, self._plan(key)))

    def _merged(self, key: str) -> bool:
        return self.b is not None and "model" in key and key in self.b and key not in SKIP_ON_MERGE

    def _plan(self, key: str) -> TensorInfo:
        a = self.a.info(key)
        half = self.settings.save_as_half
        if self.vae is not None and key.startswith(VAE_PREFIX) and key[len(VAE_PREFIX):] in self.vae:
            baked = self.vae[key[len(VAE_PREFIX):]]
            if tuple(baked.shape) != a.shape:
                raise ValueError(f"bake_in_vae: {key} has shape {tuple(baked.shape)} in the VAE but {a.shape} in "
                                 "A; the VAE does not fit this model family")
            return TensorInfo(_out_dtype([baked.dtype], half), a.shape)
        if not self._merged(key) or not a.dtype.is_floating_point:
            return TensorInfo(_out_dtype([a.dtype], half), a.shape)
        assert self.b is not None
        b = self.b.info(key)
        dtypes = [a.dtype, b.dtype]
        if a.shape != b.shape:
            self._check_channels(key, a.shape, b.shape)
        if self.c is not None and key in self.c:
            c = self.c.info(key)
            if c.shape != b.shape:
                raise ValueError(f"tertiary_model_name: {key} has shape {c.shape} in C but {b.shape} in B; B and C "
                                 "must be models of the same family")
            dtypes.append(c.dtype)
        return TensorInfo(_out_dtype(dtypes, half), a.shape)

    def _check_channels(self, key: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        """An inpainting (9) or instruct-pix2pix (8) A with a plain (4) B; anything else is refused."""
        same_but_channels = len(a) == len(b) and len(a) > 1 and a[:1] + a[2:] == b[:1] + b[2:]
        if same_but_channels and a[1] == 4 and b[1] in (8, 9):
            raise ValueError("primary_model_name: when merging an inpainting or instruct-pix2pix model with a normal "
                             "one, A must be the inpainting / instruct-pix2pix model")
        if not (same_but_channels and a[1] in (8, 9) and b[1] == 4):
            raise ValueError(f"secondary_model_name: {key} has shape {b} in B but {a} in A; A and B must be models "
                             "of the same family")
        self.inpainting = self.inpainting or a[1] == 9

    def tensor(self, key: str, info: TensorInfo) -> torch.Tensor:
        """The output tensor of ``key`` (reads one tensor of each input)."""
        if self.vae is not None and key.startswith(VAE_PREFIX) and key[len(VAE_PREFIX):] in self.vae:
            return self.vae[key[len(VAE_PREFIX):]].to(info.dtype)
        a = self.a.get(key)
        if not self._merged(key) or not a.dtype.is_floating_point:
            return a.to(info.dtype)
        assert self.b is not None
        work = torch.float64 if info.dtype == torch.float64 else torch.float32
        b = self.b.get(key).to(work)
        m = self.settings.multiplier
        if self.c is not None:
            # A1111: a key that C lacks contributes no difference.
            diff = b - self.c.get(key).to(work) if key in self.c else torch.zeros_like(b)
            def combine(x: torch.Tensor) -> torch.Tensor:
                return x + diff * m
        else:
            def combine(x: torch.Tensor) -> torch.Tensor:
                return x * (1 - m) + b * m
        out = a.to(work)
        if tuple(a.shape) != tuple(b.shape):  # inpainting A: merge its first four input channels
            out = out.clone()
            out[:, 0:4] = combine(out[:, 0:4])
        else:
            out = combine(out)
        return out.to(info.dtype)


def _metadata(settings: MergeSettings, models: dict[str, ModelFile | None], streams: dict[str, WeightsStream | None],
              inpainting: bool) -> dict[str, str]:
    """A1111's metadata: the inputs' own (when asked), ``format``, ``sd_merge_recipe`` and ``sd_merge_models``."""
    if not settings.save_metadata:
        return {}
    metadata: dict[str, str] = {}
    if settings.copy_metadata_fields:
        for stream in streams.values():
            if stream is not None:
                metadata.update(stream.metadata)
    metadata["format"] = "pt"
    if settings.add_merge_recipe:
        a, b, c = models["A"], models["B"], models["C"]
        recipe = {
            "type": "webui",
            "primary_model_hash": a.sha256 if a else None,
            "secondary_model_hash": b.sha256 if b else None,
            "tertiary_model_hash": c.sha256 if c else None,
            "interp_method": settings.interp_method,
            "multiplier": settings.multiplier,
            "save_as_half": settings.save_as_half,
            "custom_name": settings.custom_name,
            "config_source": CONFIG_SOURCES.index(settings.config_source),
            "bake_in_vae": settings.bake_in_vae,
            "discard_weights": settings.discard_weights,
            "is_inpainting": inpainting,
            "is_instruct_pix2pix": False,
        }
        merged_models: dict[str, object] = {}
        for role in ("A", "B", "C"):
            model, stream = models[role], streams[role]
            if model is None or stream is None:
                continue
            merged_models[model.sha256] = {"name": model.name, "legacy_hash": legacy_hash(model.path),
                                           "sd_merge_recipe": _parse_json(stream.metadata.get("sd_merge_recipe"))}
            earlier = _parse_json(stream.metadata.get("sd_merge_models"))
            if isinstance(earlier, dict):
                merged_models.update(earlier)
        metadata["sd_merge_recipe"] = json.dumps(recipe)
        metadata["sd_merge_models"] = json.dumps(merged_models)
    return metadata


def _config_to_copy(settings: MergeSettings, models: dict[str, ModelFile | None]) -> Path | None:
    """The sidecar ``.yaml`` that "Copy config from" picks, if there is one."""
    roles = {"A, B or C": ("A", "B", "C"), "B": ("B",), "C": ("C",), "Don't": ()}[settings.config_source]
    for role in roles:
        model = models[role]
        if model is not None and model.path.with_suffix(".yaml").is_file():
            return model.path.with_suffix(".yaml")
    return None


def merge_checkpoints(registry: ModelRegistry, settings: MergeSettings,
                      control: JobControl | None = None) -> MergeResult:
    """Merge the checkpoints ``settings`` names into a new ``.safetensors`` file in the first checkpoint folder.

    Errors name the field: LookupError for a model that is not there, ValueError for a diffusers folder, a
    missing B or C, models of different families, a VAE that does not fit, or a name already taken.
    ``control`` reports progress (one step per key) and can interrupt (JobInterrupted; nothing is written).
    The registry is refreshed, so the new model is in the checkpoint list when this returns.
    """
    registry.refresh()
    a = _find(registry, settings.primary_model_name, "primary_model_name", "primary (A)")
    b = _find(registry, settings.secondary_model_name, "secondary_model_name", "secondary (B)") \
        if settings.uses_b else None
    c = _find(registry, settings.tertiary_model_name, "tertiary_model_name", "tertiary (C)") \
        if settings.uses_c else None
    vae_file = None
    if settings.bake_in_vae not in ("", "None"):
        try:
            vae_file = registry.find_vae(settings.bake_in_vae)
        except LookupError as error:
            raise LookupError(f"bake_in_vae: {error}") from None

    name = settings.custom_name or default_name(settings, a, b, c)
    folder = registry.paths.model_dirs("checkpoint")[0]
    models = {"A": a, "B": b, "C": c}
    notify: Callable[[str], None] = (lambda text: control.update(textinfo=text)) if control else (lambda _t: None)

    streams: dict[str, WeightsStream | None] = {"A": None, "B": None, "C": None}
    try:
        for role, model in models.items():
            if model is not None:
                notify(f"Reading {role}: {model.name}")
                streams[role] = open_weights(model.path)
        vae = None
        if vae_file is not None:
            # The VAE is small: read whole.
            vae = {key.removeprefix(VAE_PREFIX): value for key, value in read_weights(vae_file.path).items()}
            stream_a = streams["A"]
            assert stream_a is not None
            if not any(VAE_PREFIX + key in stream_a for key in vae):
                raise ValueError(f"bake_in_vae: no key of {vae_file.name} matches A's first_stage_model.* keys (a "
                                 "VAE in the original layout is needed, like vae-ft-mse-840000-ema-pruned)")
        assert streams["A"] is not None
        plan = _Merge(settings, streams["A"], streams["B"], streams["C"], vae)
        filename = name + (".inpainting" if plan.inpainting and not settings.custom_name else "") + SAFETENSORS_SUFFIX
        target = folder / filename
        if target.exists():
            raise ValueError(f"custom_name: {target} already exists; choose another Custom Name")
        metadata = _metadata(settings, models, streams, plan.inpainting)
        folder.mkdir(parents=True, exist_ok=True)
        _write(target, plan, metadata, control)
    finally:
        for stream in streams.values():
            if stream is not None:
                stream.close()

    config = _config_to_copy(settings, models)
    copied = None
    if config is not None:
        copied = target.with_suffix(".yaml")
        shutil.copyfile(config, copied)
    registry.refresh()
    created = next((m for m in registry.checkpoints if m.path == target), None)
    title = created.title if created is not None else target.name
    log.info("checkpoint merged into %s", target)
    if control is not None:
        control.update(textinfo="Checkpoint saved")
    return MergeResult(target, title, copied, metadata, plan.inpainting)


def _write(target: Path, plan: _Merge, metadata: dict[str, str], control: JobControl | None) -> None:
    """Write the merged tensors into a hidden temporary file beside ``target``, then rename it."""
    if control is not None:
        control.start(1, len(plan.layout))
        control.update(textinfo="Merging")
    with atomic_output(target, prefix=".merge-") as handle:
        writer = SafetensorsWriter(handle, plan.layout, metadata)
        for step, (key, info) in enumerate(plan.layout, start=1):
            if control is not None:
                control.check()
            writer.write(key, plan.tensor(key, info))
            if control is not None:
                control.update(step=step)
        writer.close()
