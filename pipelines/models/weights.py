"""The one reader of model weight files: checkpoints, VAEs, embeddings, TAESD, upscalers, LoRA, ControlNet.

Nothing from a file is ever executed. ``.safetensors`` files are read with safetensors (which holds
tensors only); pickled files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers and nothing else. A pickle
that wants more (a class, a function such as ``os.system``) raises :class:`UnsafeCheckpointError` naming
the file and what it wanted. Every other unreadable file raises :class:`ModelFileError` (a ``ValueError``)
naming the file (``FileNotFoundError`` when there is none). :func:`model_file_field` marks such an error
with the request field that chose the file (``checkpoint``, ``hr_upscaler``, ...), so that the API can answer
422 naming both.

- :func:`read_weights`: a file's contents as a dict (``state_dict`` nesting undone, non-tensor entries
  dropped unless asked for): what every loader uses;
- :func:`read_weights_raw`: whatever the file holds (a dict, a bare tensor ...), for formats such as
  embeddings whose files need not hold a dict;
- :func:`read_safetensors_header`: metadata and key names of a ``.safetensors`` file, without its tensors.

No other module reads weight files itself (``tests/unit/test_weights.py`` checks that).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)


class ModelFileError(ValueError):
    """A model file that cannot be used (unreadable, truncated, not of its kind, unsafe); the message names it.

    ``path`` is the file; ``field`` the request field that chose it, once known (see :func:`model_file_field`).
    """

    def __init__(self, path: Path | str, message: str, field: str | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.field = field

    def __str__(self) -> str:
        return str(self.args[0])


class UnsafeCheckpointError(ModelFileError):
    """A pickled weights file needs more than tensors to load, so it could run code; it is refused."""


@contextmanager
def model_file_field(field: str) -> Iterator[None]:
    """A :class:`ModelFileError` raised inside gets ``field`` (the request field that chose the file) unless it
    already names one."""
    try:
        yield
    except ModelFileError as error:
        if error.field is None:
            error.field = field
        raise


def _existing_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def _unsupported(path: Path) -> ModelFileError:
    return ModelFileError(
        path, f"{path}: unsupported checkpoint type {path.suffix.lower()!r}; weights are read from "
        f"{', '.join(WEIGHT_SUFFIXES)} files"
    )


def _read_pickle(path: Path) -> Any:
    """What a pickled file holds, unpickled with ``torch.load(weights_only=True)`` only."""
    # mmap avoids a second copy of multi-GB files; torch only supports it for its zip format.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for bad files; all are reported with the path
        message = str(error)
        if "Weights only load failed" not in message:
            reason = f"{type(error).__name__}: {error}"
            raise ModelFileError(path, f"{path} is not a readable weights file: {reason}") from error
        wanted = re.search(r"GLOBAL ([\w.]+)", message)
        reason = (
            f"it wanted to import {wanted.group(1)}"
            if wanted
            else f"it uses pickle features beyond plain tensors ({message.splitlines()[-1].strip() or 'unknown'})"
        )
        raise UnsafeCheckpointError(
            path, f"refusing to load {path}: {reason}. Pickled files may carry code, so they are read with "
            "torch.load(weights_only=True) only and nothing from them is executed; convert the file to "
            ".safetensors with a tool you trust."
        ) from error


def read_weights_raw(path: Path | str, *, device: str = "cpu") -> Any:
    """Whatever a weights file holds, read without executing code from it.

    A ``.safetensors`` file gives a dict of tensors on ``device``; a pickled one whatever weights-only
    unpickling gives (usually a dict, possibly nested, or a bare tensor), on the CPU. Raises
    :class:`UnsafeCheckpointError` for a pickle that wants code, ``ValueError`` naming the file for an
    unreadable or unsupported one, ``FileNotFoundError`` for a missing one.
    """
    path = _existing_file(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return load_file(str(path), device=device)
        except SafetensorError as error:
            raise ModelFileError(path, f"{path} is not a readable safetensors file: {error}") from error
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise _unsupported(path)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(item) for item in value)
    return False


def read_weights(
    path: Path | str, *, device: str = "cpu", keep_non_tensors: bool = False, unwrap_state_dict: bool = True
) -> dict[str, Any]:
    """The weights of a file as a dict, read without executing code from it (see :func:`read_weights_raw`).

    ``unwrap_state_dict``: a dict nested under ``state_dict`` (as trainers save them) is returned instead
    of its container. ``keep_non_tensors``: keep entries that are not tensors (``step``, nested dicts such
    as an embedding's ``string_to_param`` or an upscaler's ``params_ema``) instead of dropping them. A file
    that holds no dict, or no tensor at all, raises ``ValueError`` naming it. Tensors are on ``device``.
    """
    path = Path(path)
    loaded = read_weights_raw(path, device=device)
    while unwrap_state_dict and isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        # A bad file, not a bad argument: ValueError like every other unreadable file.
        raise ModelFileError(path, f"{path} does not hold a state dict (found {type(loaded).__name__})")
    if not keep_non_tensors:
        loaded = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not _holds_tensor(loaded):
        raise ModelFileError(path, f"{path} holds no tensors")
    if device != "cpu" and path.suffix.lower() != SAFETENSORS_SUFFIX:
        loaded = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in loaded.items()}
    return loaded


def read_safetensors_header(path: Path | str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(metadata, tensor names) of a ``.safetensors`` file, reading only its header.

    ``ValueError`` naming the file when it is not a readable ``.safetensors`` file.
    """
    path = _existing_file(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ModelFileError(path, f"{path}: not a {SAFETENSORS_SUFFIX} file; only those carry a header")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), tuple(handle.keys())
    except SafetensorError as error:
        raise ModelFileError(path, f"{path} is not a readable safetensors file: {error}") from error
