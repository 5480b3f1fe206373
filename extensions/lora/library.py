"""The LoRA files on disk: ``models/Lora`` and ``--lora-dir``, their names, aliases, metadata and hashes.

A LoRA is named by its file stem; its alias is the ``ss_output_name`` that kohya's trainer writes into the
safetensors metadata. Scanning reads only the safetensors header (metadata and key names), so a large
library lists quickly; the weights themselves are read when a job first uses a LoRA and then kept in memory
(keyed by path and modification time) for the next jobs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from webui.extension_api import ModelFileError, read_safetensors_header, read_weights

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt")
#: Parsed state dicts kept in memory, by total tensor bytes (the LoRAs of a job are never evicted mid-job).
STATE_CACHE_BYTES = 2 << 30

_BASE_MODELS = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sd_v2_768_v": "SD 2.x 768-v", "sdxl_base_v1-0": "SDXL",
                "flux1": "Flux.1"}
_ARCHITECTURES = {"stable-diffusion-v1": "SD 1.x", "stable-diffusion-v2": "SD 2.x", "stable-diffusion-xl": "SDXL",
                  "stable-diffusion-3": "SD 3.5", "flux-1": "Flux.1"}
#: Module names only a Flux.1 LoRA has: original blocks (kohya, ComfyUI, XLabs), diffusers' single blocks.
_FLUX_NAMES = ("double_blocks", "single_blocks", "single_transformer_blocks")


class LoraTagError(ValueError, LookupError):
    """A ``<lora:...>`` tag the job cannot use (bad weight, unknown name, LoRA for another model).

    A LookupError too: the API answers those with a 422 carrying the message, as it does for a missing model,
    instead of a bare 500.
    """


class UnknownLoraError(LoraTagError):
    """A prompt names a LoRA that is not on disk."""


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file and what its header says."""

    name: str  # the file stem: what ``<lora:name:1>`` uses
    path: Path
    mtime_ns: int
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Key names, read from the header: they tell which model family the LoRA is for when metadata does not.
    keys: tuple[str, ...] = ()

    @property
    def alias(self) -> str:
        """``ss_output_name`` from the training metadata, or the name."""
        alias = self.metadata.get("ss_output_name")
        return alias if isinstance(alias, str) and alias else self.name

    @property
    def base_model(self) -> str | None:
        """"SD 1.x", "SD 2.x", "SDXL", "SD 3.5" or "Flux.1" from the metadata or, failing that, from the key names;
        None if unknown."""
        base = self.metadata.get("ss_base_model_version")
        if isinstance(base, str) and base in _BASE_MODELS:
            return _BASE_MODELS[base]
        architecture = str(self.metadata.get("modelspec.architecture", ""))
        for prefix, label in _ARCHITECTURES.items():
            if architecture.startswith(prefix):
                return label
        return _base_model_of_keys(self.keys)

    @property
    def resolution(self) -> str | None:
        """Training resolution like "512" or "1024x768", if the metadata says."""
        value = self.metadata.get("ss_resolution") or self.metadata.get("modelspec.resolution")
        if not isinstance(value, str):
            return None
        numbers = [part for part in value.replace("(", " ").replace(")", " ").replace(",", " ").replace("x", " ")
                   .split() if part.isdigit()]
        if len(numbers) == 2:
            return numbers[0] if numbers[0] == numbers[1] else f"{numbers[0]}x{numbers[1]}"
        return None


def _base_model_of_keys(keys: Sequence[str]) -> str | None:
    """The model family key names tell: Flux.1 and SD 3.5 by their transformer's modules (original or diffusers
    names), SDXL by its second text encoder; None for SD 1.x / 2.x, which share their key names."""
    if any(name in key for key in keys for name in _FLUX_NAMES):
        return "Flux.1"
    # A diffusers-layout transformer LoRA without Flux.1's single blocks is for SD 3.5's joint blocks.
    if any("joint_blocks" in key or key.startswith("transformer.transformer_blocks.") for key in keys):
        return "SD 3.5"
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in keys):
        return "SDXL"
    return None


def read_header(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(metadata, key names) from a .safetensors header; empty for other formats.

    Metadata values that hold JSON objects or lists (``ss_tag_frequency``, ...) are decoded, as A1111's
    ``/sdapi/v1/loras`` returns them.
    """
    if path.suffix.lower() != ".safetensors":
        return {}, ()
    raw, keys = read_safetensors_header(path)
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        metadata[key] = value
        if isinstance(value, str) and value[:1] in "{[":
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                pass  # not JSON after all: keep the text
    return metadata, keys


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA file, on the CPU (``.pt`` files are read without unpickling code)."""
    state = read_weights(path, keep_non_tensors=True)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name} is not a LoRA: expected a dict of tensors")
    return state


class LoraLibrary:
    """The LoRAs in the LoRA folders. Thread-safe; scanned on first use and by :meth:`refresh`."""

    def __init__(self, folders: Callable[[], Sequence[Path]], addnet_hash: Callable[[Path], str],
                 cache_bytes: int = STATE_CACHE_BYTES):
        self._folders = folders
        self._addnet_hash = addnet_hash
        self._cache_bytes = cache_bytes
        self._files: list[LoraFile] | None = None
        #: Files of the folders that cannot be read (left out of the list), with why, by file stem.
        self._unusable: dict[str, tuple[Path, str]] = {}
        self._lock = threading.RLock()
        self._weights: OrderedDict[tuple[Path, int], dict[str, torch.Tensor]] = OrderedDict()
        #: How many times a file was read from disk (tests check that a second use is cached).
        self.disk_reads = 0

    # --- listing -------------------------------------------------------------------------------

    def refresh(self) -> list[LoraFile]:
        """Scan the folders again; files whose mtime did not change keep their parsed header."""
        with self._lock:
            known = {(f.path, f.mtime_ns): f for f in self._files or []}
            files: list[LoraFile] = []
            seen: set[Path] = set()
            self._unusable = {}
            for folder in self._folders():
                if not folder.is_dir():
                    continue
                for path in sorted(folder.rglob("*"), key=lambda p: str(p).lower()):
                    if path.suffix.lower() not in EXTENSIONS or not path.is_file() or path.resolve() in seen:
                        continue
                    seen.add(path.resolve())
                    mtime = path.stat().st_mtime_ns
                    file = known.get((path, mtime))
                    if file is None:
                        file = self._read(path, mtime)
                    if file is not None:
                        files.append(file)
            self._files = files
            return list(files)

    def _read(self, path: Path, mtime: int) -> LoraFile | None:
        try:
            metadata, keys = read_header(path)
        except (OSError, ValueError) as error:
            log.warning("skipping unreadable LoRA %s: %s", path, error)
            self._unusable.setdefault(path.stem, (path, str(error)))
            return None
        return LoraFile(path.stem, path, mtime, metadata, keys)

    def files(self) -> list[LoraFile]:
        """Every LoRA found, in folder then path order."""
        with self._lock:
            return list(self._files) if self._files is not None else self.refresh()

    def get(self, name: str) -> LoraFile | None:
        """The LoRA ``name`` means: a file stem, then an alias (when only one file has it), then a stem
        ignoring case. The first folder wins when two files share a stem."""
        files = self.files()
        for match in (
            [f for f in files if f.name == name],
            [f for f in files if f.alias == name],
            [f for f in files if f.name.lower() == name.lower()],
        ):
            if len(match) == 1 or (match and match[0].name == name):
                return match[0]
        return None

    def find(self, name: str) -> LoraFile:
        """Like :meth:`get`, scanning again once if ``name`` is missing (a file just copied in);
        ``ModelFileError`` saying why when ``name`` is a file that cannot be read, :class:`UnknownLoraError`
        listing the available names otherwise."""
        file = self.get(name)
        if file is None:
            self.refresh()
            file = self.get(name)
        unusable = self._unusable.get(name)
        if file is None and unusable is not None:
            # Named like a file that is there but cannot be read: say why, as the log did when listing.
            path, reason = unusable
            raise ModelFileError(path, f"<lora:{name}:...>: {path.name} cannot be used: {reason}")
        if file is None:
            names = ", ".join(sorted({f.name for f in self.files()}, key=str.lower)) or "none"
            folders = ", ".join(str(folder) for folder in self._folders())
            raise UnknownLoraError(f"<lora:{name}:...>: no LoRA called {name!r} in {folders}; available: {names}")
        return file

    # --- hashes --------------------------------------------------------------------------------

    def short_hash(self, file: LoraFile) -> str:
        """The 12-hex "addnet" hash of ``Lora hashes`` (docs/compatibility.md §2), cached by the app's hash cache."""
        return self._addnet_hash(file.path)[:12]

    def find_by_hash(self, short_hash: str) -> LoraFile | None:
        """The local LoRA whose short hash is ``short_hash`` (hashes every file once; the cache keeps them)."""
        wanted = short_hash.strip().lower()
        if len(wanted) < 8:
            return None
        for file in self.files():
            try:
                if self.short_hash(file).startswith(wanted):
                    return file
            except OSError as error:
                log.warning("cannot hash LoRA %s: %s", file.path, error)
        return None

    # --- weights -------------------------------------------------------------------------------

    def weights(self, file: LoraFile) -> dict[str, torch.Tensor]:
        """The tensors of ``file`` (read once per path and mtime; callers must not change them)."""
        key = (file.path, file.mtime_ns)
        with self._lock:
            cached = self._weights.get(key)
            if cached is not None:
                self._weights.move_to_end(key)
                return cached
        state = load_weights(file.path)
        with self._lock:
            self.disk_reads += 1
            for old in [k for k in self._weights if k[0] == file.path]:
                del self._weights[old]  # an older version of the same file
            self._weights[key] = state
            self._evict(keep=key)
        return state

    def _evict(self, keep: tuple[Path, int]) -> None:
        def size(state: dict[str, torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in state.values())

        total = sum(size(state) for state in self._weights.values())
        for key in list(self._weights):
            if total <= self._cache_bytes:
                break
            if key != keep:
                total -= size(self._weights.pop(key))
