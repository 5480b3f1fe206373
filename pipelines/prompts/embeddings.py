"""Textual inversion embeddings from the ``embeddings/`` folder (docs/compatibility.md §3).

A prompt that names an embedding by its file stem gets the embedding's vectors in place of the
name's tokens (see :mod:`pipelines.prompts.encoding`). Formats read:

- SD 1.x / SD 2.x: A1111's ``.pt`` (``string_to_param``), ``emb_params`` (safetensors), or a file
  holding a single tensor (diffusers' ``learned_embeds.bin``: ``{"<token>": tensor}``).
- SDXL: ``clip_l`` and ``clip_g`` tensors, one per text encoder.

Files are read by the one weights reader, :mod:`pipelines.models.weights`: pickled files (``.pt``, ``.bin``)
are only ever opened with ``torch.load(weights_only=True)``, and one that wants code is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.models.weights import read_weights_raw

logger = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pt", ".bin")
# Key of the vectors of a one-encoder embedding (SD 1.x, SD 2.x); SDXL ones use "clip_l"/"clip_g".
SINGLE_KEY = "clip"
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError)


@dataclass(frozen=True, eq=False)
class TextualInversion:
    """One embedding: its name (the file stem), vectors per text encoder and A1111 short hash."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]  # key -> (vector_count, dim), float32 on the CPU
    shorthash: str  # first 12 hex digits of the file's SHA-256, as in A1111's "TI hashes"
    step: int | None = None
    sd_checkpoint_name: str | None = None

    @property
    def vector_count(self) -> int:
        """How many token slots the embedding takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]


def sha256_short(path: Path, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-256 of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _as_matrix(value: object, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{path}: expected a tensor, found {type(value).__name__}")
    tensor = value.detach().to(device="cpu", dtype=torch.float32)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise ValueError(f"{path}: expected vectors of shape (count, dim), found {tuple(tensor.shape)}")
    return tensor.contiguous()


def _vectors_from_data(data: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the vectors in any of the known layouts."""
    if isinstance(data, torch.Tensor):
        return {SINGLE_KEY: _as_matrix(data, path)}
    if not isinstance(data, Mapping):
        raise TypeError(f"{path}: not an embedding (top level is {type(data).__name__})")
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": _as_matrix(data["clip_l"], path), "clip_g": _as_matrix(data["clip_g"], path)}
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise ValueError(f"{path}: string_to_param must hold exactly one tensor")
        return {SINGLE_KEY: _as_matrix(next(iter(params.values())), path)}
    if "emb_params" in data:
        return {SINGLE_KEY: _as_matrix(data["emb_params"], path)}
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if len(data) == 1 and len(tensors) == 1:
        return {SINGLE_KEY: _as_matrix(tensors[0], path)}
    raise ValueError(f"{path}: unknown embedding layout (keys: {sorted(map(str, data))[:8]})")


def load_textual_inversion(path: Path | str) -> TextualInversion:
    """Load one embedding file; raise ``ValueError``/``OSError`` and friends if it is not one."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise ValueError(f"{path}: not an embedding file ({', '.join(EXTENSIONS)})")
    # Not read_weights: an embedding file may hold a bare tensor, and its string_to_param/step entries matter.
    data: object = read_weights_raw(path)
    step = data.get("step") if isinstance(data, Mapping) else None
    checkpoint = data.get("sd_checkpoint_name") if isinstance(data, Mapping) else None
    return TextualInversion(
        name=path.stem,
        path=path,
        vectors=_vectors_from_data(data, path),
        shorthash=sha256_short(path),
        step=step if isinstance(step, int) else None,
        sd_checkpoint_name=checkpoint if isinstance(checkpoint, str) else None,
    )


@dataclass
class _Stamp:
    size: int
    mtime_ns: int
    item: TextualInversion | None = None
    error: str | None = None


class EmbeddingDatabase:
    """The embeddings found in one folder (searched recursively), looked up by file stem.

    ``refresh()`` rescans the folder and reloads only files whose size or time changed;
    ``generation`` goes up whenever the set of embeddings changes, so users can cache on it.
    Files that fail to load are logged and listed in ``errors`` (path -> message).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.generation = 0
        self.errors: dict[str, str] = {}
        self._items: dict[str, TextualInversion] = {}
        self._stamps: dict[Path, _Stamp] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder, loading new or changed files and dropping removed ones."""
        files = []
        if self.folder.is_dir():
            files = sorted(
                path
                for path in self.folder.rglob("*")
                if path.suffix.lower() in EXTENSIONS
                and path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(self.folder).parts)
            )
        stamps: dict[Path, _Stamp] = {}
        for path in files:
            stat = path.stat()
            old = self._stamps.get(path)
            if old and old.size == stat.st_size and old.mtime_ns == stat.st_mtime_ns:
                stamps[path] = old
                continue
            stamp = _Stamp(stat.st_size, stat.st_mtime_ns)
            try:
                stamp.item = load_textual_inversion(path)
            except _LOAD_ERRORS as error:
                stamp.error = f"{type(error).__name__}: {error}"
                logger.warning("Skipping embedding %s: %s", path, stamp.error)
            stamps[path] = stamp

        items: dict[str, TextualInversion] = {}
        for path, stamp in stamps.items():
            if stamp.item is None:
                continue
            if stamp.item.name in items:
                logger.warning("Embedding %s ignored: %s has the same name", path, items[stamp.item.name].path)
                continue
            items[stamp.item.name] = stamp.item
        changed = items.keys() != self._items.keys() or any(items[n] is not self._items[n] for n in items)
        self._stamps = stamps
        self._items = items
        self.errors = {str(path): stamp.error for path, stamp in stamps.items() if stamp.error}
        if changed:
            self.generation += 1

    def get(self, name: str) -> TextualInversion | None:
        """The embedding whose file stem is ``name``, or None."""
        return self._items.get(name)

    def names(self) -> list[str]:
        """All embedding names, sorted."""
        return sorted(self._items)

    def items(self) -> list[TextualInversion]:
        """All loaded embeddings, sorted by name."""
        return [self._items[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


def format_ti_hashes(used: Iterable[TextualInversion]) -> str | None:
    """The infotext value of ``TI hashes``: ``"name: hash, name2: hash2"``, or None when none was used."""
    text = ", ".join(f"{item.name}: {item.shorthash}" for item in used)
    return text or None
