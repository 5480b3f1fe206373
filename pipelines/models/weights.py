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
- :func:`read_safetensors_header`: metadata and key names of a ``.safetensors`` file, without its tensors;
- :func:`open_weights`: a :class:`WeightsStream` handing out one tensor at a time (a ``.safetensors`` file is
  read key by key with plain file reads, so only the tensor asked for is in memory; a pickled file can only
  be read whole, once, through :func:`read_weights`);
- :class:`SafetensorsWriter`: writes a ``.safetensors`` file tensor by tensor (header first, from the
  declared dtypes and shapes), so a whole model never has to be held to be saved.

No other module reads weight files itself (``tests/unit/test_weights.py`` checks that).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


#: safetensors dtype names (the format's header) <-> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
#: The largest header read (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor of a file is, known without reading it."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class WeightsStream:
    """The tensors of one weights file, handed out one at a time (see :func:`open_weights`).

    ``keys()``, ``info(key)`` and ``metadata`` need no tensor data; ``get(key)`` reads one tensor. For a
    ``.safetensors`` file nothing is memory-mapped: each ``get`` reads that tensor's bytes into a fresh
    CPU tensor, so a caller that drops each tensor after use holds one at a time. A pickled file is read
    whole once (safely, by :func:`read_weights`) and served from memory.
    """

    def __init__(self, path: Path | str):
        self.path = _existing_file(path)
        self.metadata: dict[str, str] = {}
        self._handle: io.BufferedReader | None = None
        self._loaded: dict[str, torch.Tensor] | None = None
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        suffix = self.path.suffix.lower()
        if suffix == SAFETENSORS_SUFFIX:
            self._open_safetensors()
        elif suffix in PICKLE_SUFFIXES:
            self._loaded = read_weights(self.path)
        else:
            raise _unsupported(self.path)

    def _bad(self, why: str) -> ValueError:
        return ValueError(f"{self.path} is not a readable safetensors file: {why}")

    def _open_safetensors(self) -> None:
        size = self.path.stat().st_size
        handle = self.path.open("rb")
        try:
            head = handle.read(8)
            if len(head) < 8:
                raise self._bad("shorter than its header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise self._bad(f"header length {length} does not fit the file ({size} bytes)")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise self._bad(f"header is not JSON ({error})") from error
            if not isinstance(header, dict):
                raise self._bad("header is not a JSON object")
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise self._bad("__metadata__ must map names to strings")
            self.metadata = {str(k): v for k, v in metadata.items()}
            data_start = 8 + length
            for key, entry in header.items():
                self._entries[key] = self._entry(key, entry, size - data_start, data_start)
        except BaseException:
            handle.close()
            raise
        self._handle = handle

    def _entry(self, key: str, entry: Any, data_size: int, data_start: int) -> tuple[TensorInfo, int, int]:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise self._bad(f"tensor {key!r}: bad header entry {entry!r}") from error
        info = TensorInfo(dtype, shape)
        if any(n < 0 for n in shape) or not 0 <= begin <= end <= data_size or end - begin != info.nbytes:
            raise self._bad(f"tensor {key!r}: offsets {begin}..{end} do not fit its shape, dtype or the file")
        return info, data_start + begin, end - begin

    def keys(self) -> list[str]:
        return list(self._loaded) if self._loaded is not None else list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in (self._loaded if self._loaded is not None else self._entries)

    def info(self, key: str) -> TensorInfo:
        if self._loaded is not None:
            tensor = self._loaded[key]
            return TensorInfo(tensor.dtype, tuple(tensor.shape))
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the CPU (KeyError when the file has none)."""
        if self._loaded is not None:
            return self._loaded[key]
        info, offset, nbytes = self._entries[key]
        if self._handle is None:
            raise ValueError(f"{self.path}: the stream is closed")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())  # type: ignore[arg-type]  # ndarray exports the buffer protocol
        self._handle.seek(offset)
        done = 0
        while done < nbytes:
            count = self._handle.readinto(view[done:])
            if not count:
                raise self._bad(f"tensor {key!r} is cut short")
            done += count
        return raw.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._loaded = None

    def __enter__(self) -> WeightsStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_weights(path: Path | str) -> WeightsStream:
    """A :class:`WeightsStream` over ``path`` (use it as a context manager). Raises like :func:`read_weights`:
    ``ValueError`` naming the file when unreadable, :class:`UnsafeCheckpointError`, ``FileNotFoundError``."""
    return WeightsStream(path)


class SafetensorsWriter:
    """Writes a ``.safetensors`` file one tensor at a time.

    The header (names, dtypes, shapes, offsets, string metadata) is written first from ``layout``; then each
    :meth:`write` must hand over the next tensor in ``layout`` order with exactly its declared dtype and shape.
    :meth:`close` checks that every tensor came. Only one tensor is ever held, by the caller.
    """

    def __init__(self, handle: BinaryIO, layout: list[tuple[str, TensorInfo]], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for key, info in layout:
            if key in header or key == "__metadata__":
                raise ValueError(f"tensor name {key!r} appears twice")
            nbytes = info.nbytes
            header[key] = {"dtype": _DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        self._handle = handle
        self._layout = layout
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise ValueError(f"tensor {key!r} was not declared")
        expected_key, info = self._layout[self._next]
        if key != expected_key or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(f"tensor {key!r} ({tensor.dtype}, {tuple(tensor.shape)}) does not match the declared "
                             f"{expected_key!r} ({info.dtype}, {info.shape})")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))  # type: ignore[arg-type]  # as in WeightsStream.get
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._layout):
            missing = self._layout[self._next][0]
            raise ValueError(f"the file is incomplete: tensor {missing!r} and {len(self._layout) - self._next - 1} "
                             "more were never written")
