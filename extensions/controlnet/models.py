"""ControlNet model files: finding them, naming them ``name [8hex]``, loading them as diffusers models.

Two layouts are read: single files (``.safetensors``, ``.pth``) in the original ControlNet key layout
(``control_model.input_blocks...``, as lllyasviel's releases and A1111 users have them), converted with
diffusers' converter; and diffusers folders (``config.json`` + weights). A single file carries no config:
the shapes come from its weights and the rest from the shipped UNet config of its family, so nothing is
downloaded.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, T2IAdapter
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from webui.extension_api import ModelFileError, read_weights

from .annotators import AnnotatorCache
from .ip_adapter import is_ip_adapter, load_ip_adapter

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "models" / "configs"
SUFFIXES = (".safetensors", ".pth")
#: Family config folder by the cross-attention width of real models (SD 1.x 768, SD 2.x 1024, SDXL 2048).
FAMILY_BY_CONTEXT = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_ORIGINAL_PREFIX = "control_model."
_CACHE_SIZE = 3


@dataclass(frozen=True)
class ControlNetEntry:
    """One ControlNet model on disk."""

    name: str
    path: Path
    sha256: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.sha256[:8]}]"


class ControlNetLibrary:
    """The ControlNet models in the model folders, and a small cache of loaded ones."""

    def __init__(self, folders: Callable[[], tuple[Path, ...]], file_hash: Callable[[Path], str],
                 device: Callable[[], torch.device], dtype: Callable[[], torch.dtype],
                 annotator_folders: Callable[[], tuple[Path, ...]],
                 memory_mode: Callable[[], str] = lambda: "normal",
                 clip_vision_folders: Callable[[], tuple[Path, ...]] = lambda: ()):
        self._folders = folders
        #: The network preprocessors' loaded detectors (weights in the annotator folders) and the CLIP vision
        #: encoders of the IP-Adapter modules.
        self.annotators = AnnotatorCache(annotator_folders, device, memory_mode,
                                         clip_vision_folders=clip_vision_folders)
        self._annotator_folders = annotator_folders
        self._hash = file_hash
        self._device = device
        self._dtype = dtype
        self._entries: list[ControlNetEntry] | None = None
        self._loaded: OrderedDict[tuple[Path, float, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def folders(self) -> tuple[Path, ...]:
        return self._folders()

    def annotator_folders(self) -> tuple[Path, ...]:
        """Where preprocessors' own weights go (``models/ControlNet/annotators``): not ControlNet models."""
        return self._annotator_folders()

    def refresh(self) -> list[ControlNetEntry]:
        """Scan the folders again (single files and diffusers folders, one level of sub-folders)."""
        entries = []
        annotators = [folder.resolve() for folder in self._annotator_folders()]
        for folder in self._folders():
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*"), key=lambda p: str(p).lower()):
                if any(part.startswith(".") for part in path.relative_to(folder).parts):
                    continue
                if any(path.resolve().is_relative_to(annotator) for annotator in annotators):
                    continue
                weights = _weights_file(path)
                if weights is not None:
                    entries.append(ControlNetEntry(path.stem if path.is_file() else path.name, path,
                                                   self._hash(weights)))
        with self._lock:
            self._entries = entries
        return entries

    def entries(self) -> list[ControlNetEntry]:
        """The models found by the last scan (scanning now if none ran yet)."""
        with self._lock:
            entries = self._entries
        return entries if entries is not None else self.refresh()

    def titles(self) -> list[str]:
        return [entry.title for entry in self.entries()]

    def find(self, query: str) -> ControlNetEntry:
        """The model a unit names: its title, its name (with or without the file ending), a prefix of the
        name, or its hash in brackets. Scans again once before giving up; LookupError lists the models."""
        for attempt in range(2):
            entries = self.entries() if attempt == 0 else self.refresh()
            found = _match(entries, query)
            if found is not None:
                return found
        known = ", ".join(self.titles()) or f"none found in {', '.join(map(str, self._folders()))}"
        raise LookupError(f"no ControlNet model matches {query!r}; available: {known}")

    def load(self, entry: ControlNetEntry) -> Any:
        """``entry`` as a ControlNetModel on the app's device and dtype (cached, least recently used out)."""
        device, dtype = self._device(), self._dtype()
        key = (entry.path, entry.path.stat().st_mtime, str(device), str(dtype))
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        if is_ip_adapter(entry.path):
            model: Any = load_ip_adapter(entry.path)  # its weights go into the UNet per job
        else:
            model = load_controlnet(entry.path).to(device=device, dtype=dtype).eval()
            model.requires_grad_(False)
        with self._lock:
            self._loaded[key] = model
            while len(self._loaded) > _CACHE_SIZE:
                self._loaded.popitem(last=False)
        return model


def _weights_file(path: Path) -> Path | None:
    if is_ip_adapter(path) and path.suffix.lower() in (*SUFFIXES, ".bin"):
        return path
    if path.is_file() and path.suffix.lower() in SUFFIXES:
        # a weights file inside a diffusers folder belongs to that folder's entry
        return None if (path.parent / "config.json").is_file() else path
    if path.is_dir() and (path / "config.json").is_file():
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
    return None


def _match(entries: list[ControlNetEntry], query: str) -> ControlNetEntry | None:
    query = query.strip()
    wanted_hash = None
    bracket = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]{8,64})\]", query)
    if bracket:
        query, wanted_hash = bracket.group(1), bracket.group(2).lower()
    name = query.lower()
    for suffix in (*SUFFIXES, ".bin"):
        name = name.removesuffix(suffix)
    if wanted_hash:
        for entry in entries:
            if entry.sha256.startswith(wanted_hash) and (not name or entry.name.lower() == name):
                return entry
    exact = [entry for entry in entries if entry.name.lower() == name]
    if exact:
        return exact[0]
    prefixed = sorted((entry for entry in entries if name and entry.name.lower().startswith(name)),
                      key=lambda entry: len(entry.name))
    return prefixed[0] if prefixed else None


# --------------------------------------------------------------------------- loading


#: The model classes a diffusers folder may hold (its config.json's ``_class_name``).
FOLDER_CLASSES = {"ControlNetModel": ControlNetModel, "ControlNetUnionModel": ControlNetUnionModel,
                  "T2IAdapter": T2IAdapter}


def load_controlnet(path: Path) -> ControlNetModel | ControlNetUnionModel | T2IAdapter:
    """Load a diffusers folder (a ControlNet, a ControlNet Union such as ProMax, or a T2I-Adapter) or a
    single ControlNet file in the original layout (float32, on the CPU)."""
    if path.is_dir():
        kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_class_name", "ControlNetModel")
        cls = FOLDER_CLASSES.get(kind)
        if cls is None:
            raise ModelFileError(path, f"{path.name}: config.json names a {kind!r}; a ControlNet folder holds one "
                                       f"of {', '.join(FOLDER_CLASSES)}")
        return cls.from_pretrained(path, local_files_only=True)
    state = read_weights(path)  # never unpickles code from a model file; a state_dict nesting is undone
    if any(key.startswith(_ORIGINAL_PREFIX) for key in state):
        state = {key[len(_ORIGINAL_PREFIX):]: value for key, value in state.items() if key.startswith(_ORIGINAL_PREFIX)}
    if "time_embed.0.weight" not in state:
        raise ModelFileError(path, f"{path.name}: not a ControlNet in the original layout (no "
                                   "control_model.time_embed weights); diffusers-layout models must be a folder "
                                   "with their config.json")
    config = original_config(state)
    converted = convert_controlnet_checkpoint(state, config)
    for index in (0, 2):  # SDXL's size/pooled-text embedding; diffusers' converter leaves it out
        for kind in ("weight", "bias"):
            if f"label_emb.0.{index}.{kind}" in state:
                converted[f"add_embedding.linear_{index // 2 + 1}.{kind}"] = state[f"label_emb.0.{index}.{kind}"]
    model = ControlNetModel.from_config(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ModelFileError(path, f"{path.name}: weights do not fit the ControlNet they describe "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.float()


def original_config(state: dict[str, torch.Tensor]) -> dict:
    """The ControlNetModel config of original-layout weights (``control_model.`` prefix removed): shapes
    from the weights, the rest (attention heads, time embedding sizes) from the family's shipped UNet config."""
    blocks = sorted({int(key.split(".")[1]) for key in state if key.startswith("input_blocks.")})
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in state]
    layers_per_block = downsamplers[0] - 1 if downsamplers else len(blocks) - 1
    levels = len(blocks) // (layers_per_block + 1)
    first_of_level = [1 + level * (layers_per_block + 1) for level in range(levels)]
    channels = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first_of_level]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in state for i in first_of_level]
    depth = [len({key.split(".")[4] for key in state if key.startswith(f"input_blocks.{i}.1.transformer_blocks.")})
             for i in first_of_level]
    to_k = next(value for key, value in state.items() if key.endswith("attn2.to_k.weight"))
    proj_in = next(state[f"input_blocks.{i}.1.proj_in.weight"] for i, has in zip(first_of_level, attention) if has)
    hint = sorted({int(key.split(".")[1]) for key in state if key.startswith("input_hint_block.")})
    embedding = [state[f"input_hint_block.{hint[0]}.weight"].shape[0]] + [
        state[f"input_hint_block.{i}.weight"].shape[0] for i in hint[2:-1:2]]
    is_sdxl = "label_emb.0.0.weight" in state
    family = FAMILY_BY_CONTEXT.get(to_k.shape[1], "sdxl" if is_sdxl else "sd15")
    base = json.loads((CONFIGS_DIR / family / "unet" / "config.json").read_text(encoding="utf-8"))
    heads = base.get("attention_head_dim", 8)
    if isinstance(heads, list) and len(heads) != levels:
        heads = heads[0]
    config = {
        **base,
        "in_channels": state["input_blocks.0.0.weight"].shape[1],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if has else "DownBlock2D" for has in attention],
        "transformer_layers_per_block": [max(d, 1) for d in depth],
        "cross_attention_dim": to_k.shape[1],
        "use_linear_projection": proj_in.ndim == 2,
        "attention_head_dim": heads,
        "conditioning_channels": state[f"input_hint_block.{hint[0]}.weight"].shape[1],
        "conditioning_embedding_out_channels": embedding,
        "addition_embed_type": "text_time" if is_sdxl else None,
    }
    if is_sdxl:
        config["projection_class_embeddings_input_dim"] = state["label_emb.0.0.weight"].shape[1]
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    return {key: value for key, value in config.items() if key in accepted}
