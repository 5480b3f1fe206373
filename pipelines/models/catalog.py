"""The model catalog: which checkpoints and VAEs exist, A1111 titles and hashes (docs/compatibility.md §2, §3)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.models.hashes import HashCache, legacy_hash
from pipelines.settings import MODEL_EXTENSIONS, Paths

#: In a diffusers folder, the file whose hash stands for the model (the UNet carries the weights that differ).
_FOLDER_HASH_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
)


@dataclass(frozen=True)
class ModelFile:
    """One model the user has: a file, or a diffusers folder."""

    path: Path
    name: str  # path relative to its models folder, with extension ("sub/model.safetensors")
    sha256: str

    @property
    def model_name(self) -> str:
        """The name without folder or extension, as A1111 shows it."""
        stem = Path(self.name).name
        for ext in MODEL_EXTENSIONS["checkpoint"] + MODEL_EXTENSIONS["vae"]:
            if stem.endswith(ext):
                return stem[: -len(ext)]
        return stem

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]"

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def hash_file(self) -> Path:
        return _hash_file(self.path)


def _hash_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for rel in _FOLDER_HASH_FILES:
        if (path / rel).is_file():
            return path / rel
    return path / "model_index.json"


def _scan(folders: tuple[Path, ...], extensions: tuple[str, ...], with_folders: bool) -> list[tuple[Path, str]]:
    """(path, name relative to its folder) of each model file, and of each diffusers folder if asked."""
    found: list[tuple[Path, str]] = []
    for root in folders:
        if not root.is_dir():
            continue
        model_dirs = {p.parent for p in root.rglob("model_index.json")} if with_folders else set()
        for path in sorted(root.rglob("*")):
            parts = path.relative_to(root).parts
            if any(part.startswith(".") for part in parts):
                continue
            if path in model_dirs:
                found.append((path, path.relative_to(root).as_posix()))
            elif path.is_file() and path.suffix.lower() in extensions and not model_dirs.intersection(path.parents):
                found.append((path, path.relative_to(root).as_posix()))
    return found


class ModelRegistry:
    """Scans the model folders; finds a model by title, file name, name or hash."""

    def __init__(self, paths: Paths, hashes: HashCache | None = None):
        self.paths = paths
        self.hashes = hashes or HashCache(paths.cache_dir / "hashes.json")
        self._lock = threading.Lock()
        self._checkpoints: list[ModelFile] = []
        self._vaes: list[ModelFile] = []
        self._text_encoders: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders. Hashes come from the cache unless a file changed (size or mtime)."""
        checkpoints = [
            ModelFile(path, rel, self.hashes.sha256(_hash_file(path)))
            for path, rel in _scan(self.paths.model_dirs("checkpoint"), MODEL_EXTENSIONS["checkpoint"], True)
        ]
        # Diffusion-model-only files (a Flux.1 transformer) are checkpoints too, completed by modules.
        checkpoints += [
            ModelFile(path, rel, self.hashes.sha256(path))
            for path, rel in _scan(self.paths.model_dirs("unet"), MODEL_EXTENSIONS["unet"], False)
        ]
        vaes = [
            ModelFile(path, rel, self.hashes.sha256(path))
            for path, rel in _scan(self.paths.model_dirs("vae"), MODEL_EXTENSIONS["vae"], False)
        ]
        text_encoders = [
            ModelFile(path, rel, self.hashes.sha256(path))
            for path, rel in _scan(self.paths.model_dirs("text_encoder"), MODEL_EXTENSIONS["text_encoder"], False)
        ]
        with self._lock:
            self._checkpoints, self._vaes, self._text_encoders = checkpoints, vaes, text_encoders

    @property
    def checkpoints(self) -> list[ModelFile]:
        with self._lock:
            return list(self._checkpoints)

    @property
    def vaes(self) -> list[ModelFile]:
        with self._lock:
            return list(self._vaes)

    @property
    def modules(self) -> list[ModelFile]:
        """Files that complete a checkpoint stored without them: text encoders, then VAEs (Forge's
        "VAE / Text Encoder" list)."""
        with self._lock:
            return [*self._text_encoders, *self._vaes]

    def find_module(self, query: str) -> ModelFile:
        """The text encoder or VAE file ``query`` names (file name, name, or hash); LookupError lists them."""
        found = _find(self.modules, query, legacy=False)
        if found is None:
            names = ", ".join(m.name for m in self.modules) or "none; put text encoders in " + str(
                self.paths.model_dirs("text_encoder")[0])
            raise LookupError(f"additional_modules: no text encoder or VAE matches {query!r}; available: {names}")
        return found

    def find_checkpoint(self, query: str) -> ModelFile:
        """The checkpoint that ``query`` names: its title, file name, name without extension, full or short
        SHA-256, or legacy 8-hex hash. LookupError lists what is available."""
        found = _find(self.checkpoints, query, legacy=True)
        if found is None:
            titles = ", ".join(m.title for m in self.checkpoints) or "none; put checkpoints in " + str(
                self.paths.model_dirs("checkpoint")[0])
            raise LookupError(f"checkpoint: no model matches {query!r}; available: {titles}")
        return found

    def find_vae(self, query: str) -> ModelFile:
        """The VAE that ``query`` names (file name, name, or hash). LookupError lists what is available."""
        found = _find(self.vaes, query, legacy=False)
        if found is None:
            names = ", ".join(["Automatic", *(m.name for m in self.vaes)])
            raise LookupError(f"vae: no VAE matches {query!r}; choose one of {names}")
        return found


_SHORT_TITLE = re.compile(r"(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]")


def _find(models: list[ModelFile], query: str, *, legacy: bool) -> ModelFile | None:
    query = query.strip()
    if not query:
        return None
    for key in (
        lambda m: m.title,
        lambda m: m.name,
        lambda m: Path(m.name).name,
        lambda m: m.model_name,
        lambda m: Path(m.name).with_suffix("").as_posix(),
    ):
        for m in models:
            if key(m) == query:
                return m
    lowered = query.lower().strip("[]")
    if len(lowered) >= 8 and all(c in "0123456789abcdef" for c in lowered):
        for m in models:
            if m.sha256.startswith(lowered):
                return m
        if legacy and len(lowered) == 8:
            for m in models:
                if not m.is_folder and legacy_hash(m.path) == lowered:
                    return m
    # A1111's short title, "name [hash]" (its "Hires checkpoint" infotext key): the hash decides, else the name.
    titled = _SHORT_TITLE.fullmatch(query)
    if titled:
        return _find(models, titled["hash"], legacy=legacy) or _find(models, titled["name"], legacy=legacy)
    return None
