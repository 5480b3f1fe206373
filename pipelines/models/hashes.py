"""Model file hashes as A1111 shows them (docs/compatibility.md §2), cached in a JSON file.

- ``sha256``: of the whole file; its first 10 hex digits are the "Model hash" / short hash.
- ``addnet_hash``: of a .safetensors file's tensor data (everything after the header), first 12 hex
  digits; used in "Lora hashes".
- ``legacy_hash``: of the 64 KiB at offset 1 MiB, first 8 hex digits; old A1111 model hashes.

Hashing a multi-gigabyte checkpoint takes a while, so results are cached by absolute path, size
and modification time; a file that changes is hashed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pipelines.files import write_atomically

logger = logging.getLogger(__name__)

_BLOCK = 1024 * 1024
_CACHE_FORMAT = 1


def _hash_stream(stream: io.BufferedIOBase) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    while True:
        count = stream.readinto(buffer)
        if not count:
            return digest.hexdigest()
        digest.update(view[:count])


def _safetensors_data_offset(path: Path, stream: BinaryIO) -> int:
    size = os.fstat(stream.fileno()).st_size
    head = stream.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: too short to be a .safetensors file")
    (header_length,) = struct.unpack("<Q", head)
    if 8 + header_length > size:
        raise ValueError(f"{path}: header length {header_length} runs past the end of the file ({size} bytes)")
    return 8 + header_length


def legacy_hash(path: Path) -> str:
    """A1111's old model hash: SHA-256 of the 64 KiB at offset 0x100000, first 8 hex digits.

    A file shorter than 1 MiB hashes the empty string, as A1111 does.
    """
    with open(path, "rb") as stream:
        stream.seek(0x100000)
        return hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]


class HashCache:
    """SHA-256 hashes of model files, remembered in a JSON file across runs.

    Entries are keyed by absolute path and hold the file's size and mtime; a mismatch means the
    file changed and it is hashed again. The cache file is rewritten atomically after each new
    hash. One instance may be shared by several threads; a file being hashed by one thread is not
    hashed again by another meanwhile.
    """

    def __init__(self, cache_file: Path):
        self.cache_file = Path(cache_file)
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}
        self._sections: dict[str, dict[str, dict[str, object]]] = self._load()

    def _load(self) -> dict[str, dict[str, dict[str, object]]]:
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            # Only a cache: losing it costs time, not data, so start afresh rather than refuse to run.
            logger.warning("hash cache %s is unreadable (%s); starting an empty one", self.cache_file, error)
            return {}
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
            logger.warning("hash cache %s has an unknown layout; starting an empty one", self.cache_file)
            return {}
        return {name: dict(entries) for name, entries in data.get("sections", {}).items()}

    def _save(self) -> None:
        # Called with self._lock held.
        payload = json.dumps({"format": _CACHE_FORMAT, "sections": self._sections}, indent=1, sort_keys=True)
        write_atomically(self.cache_file, payload.encode("utf-8"))

    def _cached(self, section: str, path: Path, compute: Callable[[Path], str]) -> str:
        key = str(Path(path).resolve())
        with self._lock:
            path_lock = self._path_locks.setdefault(f"{section}:{key}", threading.Lock())
        with path_lock:
            before = os.stat(key)
            with self._lock:
                entry = self._sections.get(section, {}).get(key)
            if entry and entry.get("size") == before.st_size and entry.get("mtime_ns") == before.st_mtime_ns:
                return str(entry["sha256"])
            value = compute(Path(key))
            after = os.stat(key)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                # Changed while we read it: the hash matches neither version, so do not keep it.
                logger.warning("%s changed while it was being hashed; not caching the result", key)
                return value
            with self._lock:
                self._sections.setdefault(section, {})[key] = {
                    "size": before.st_size,
                    "mtime_ns": before.st_mtime_ns,
                    "sha256": value,
                }
                self._save()
            return value

    def sha256(self, path: Path) -> str:
        """Full hex SHA-256 of the file (cached). Raises FileNotFoundError for a missing file."""
        return self._cached("sha256", path, _sha256_file)

    def short_hash(self, path: Path) -> str:
        """The 10 hex digits A1111 shows as "Model hash" and in titles like ``name [abcdef0123]``."""
        return self.sha256(path)[:10]

    def addnet_hash(self, path: Path) -> str:
        """12 hex digits for "Lora hashes": SHA-256 of the tensor data of a .safetensors file
        (everything after ``8 + header length``), or of the whole file for other formats (cached)."""
        return self._cached("addnet", path, _addnet_sha256)[:12]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as stream:
        return _hash_stream(stream)


def _addnet_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        if path.suffix.lower() == ".safetensors":
            stream.seek(_safetensors_data_offset(path, stream))
        return _hash_stream(stream)
