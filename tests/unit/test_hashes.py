"""Model file hashes (docs/compatibility.md §2) and their JSON cache."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipelines.models.hashes import HashCache, legacy_hash


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _content(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_sha256_and_short_hash_of_a_file_larger_than_one_block(tmp_path):
    data = _content(3 * 1024 * 1024 + 17)
    path = _write(tmp_path / "model.ckpt", data)
    cache = HashCache(tmp_path / "cache" / "hashes.json")
    expected = hashlib.sha256(data).hexdigest()
    assert cache.sha256(path) == expected
    assert cache.short_hash(path) == expected[:10]
    assert (tmp_path / "cache" / "hashes.json").is_file()


def test_cache_is_used_while_size_and_mtime_match_and_survives_restarts(tmp_path):
    path = _write(tmp_path / "model.safetensors", b"first version!")
    cache_file = tmp_path / "hashes.json"
    real = HashCache(cache_file).sha256(path)

    # Plant a different value for the same size and mtime: a fresh cache must return it unread.
    stored = json.loads(cache_file.read_text())
    entry = stored["sections"]["sha256"][str(path.resolve())]
    assert entry["size"] == len(b"first version!") and entry["sha256"] == real
    entry["sha256"] = "f" * 64
    cache_file.write_text(json.dumps(stored))
    assert HashCache(cache_file).sha256(path) == "f" * 64

    # Same size, new mtime: hashed again.
    path.write_bytes(b"other version!")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    cache = HashCache(cache_file)
    assert cache.sha256(path) == hashlib.sha256(b"other version!").hexdigest()
    assert json.loads(cache_file.read_text())["sections"]["sha256"][str(path.resolve())]["mtime_ns"] == 1_000_000_000


def test_cache_keys_are_absolute_paths(tmp_path, monkeypatch):
    path = _write(tmp_path / "a.ckpt", b"abc")
    monkeypatch.chdir(tmp_path)
    cache = HashCache(tmp_path / "hashes.json")
    assert cache.sha256("a.ckpt") == hashlib.sha256(b"abc").hexdigest()
    sections = json.loads((tmp_path / "hashes.json").read_text())["sections"]
    assert list(sections["sha256"]) == [str(path.resolve())]


def test_unreadable_cache_file_is_replaced(tmp_path, caplog):
    cache_file = tmp_path / "hashes.json"
    cache_file.write_text("{not json")
    path = _write(tmp_path / "m.ckpt", b"data")
    cache = HashCache(cache_file)
    assert "unreadable" in caplog.text
    assert cache.sha256(path) == hashlib.sha256(b"data").hexdigest()
    assert json.loads(cache_file.read_text())["format"] == 1


def test_addnet_hash_skips_the_safetensors_header(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(path), metadata={"a": "b"})
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    cache = HashCache(tmp_path / "hashes.json")
    addnet = cache.addnet_hash(path)
    assert addnet == hashlib.sha256(raw[8 + header_length:]).hexdigest()[:12]
    assert addnet != cache.sha256(path)[:12]
    # Changing only the metadata in the header keeps the addnet hash.
    other = tmp_path / "renamed.safetensors"
    save_file({"lora_up.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(other),
              metadata={"ss_output_name": "something much longer"})
    assert cache.addnet_hash(other) == addnet
    sections = json.loads((tmp_path / "hashes.json").read_text())["sections"]
    assert set(sections) == {"sha256", "addnet"}


def test_addnet_hash_of_other_files_is_of_the_whole_file(tmp_path):
    path = _write(tmp_path / "lora.pt", _content(5000, seed=3))
    assert HashCache(tmp_path / "h.json").addnet_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_addnet_hash_rejects_a_broken_safetensors_file(tmp_path):
    path = _write(tmp_path / "bad.safetensors", struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ValueError, match="runs past the end"):
        HashCache(tmp_path / "h.json").addnet_hash(path)
    short = _write(tmp_path / "short.safetensors", b"abc")
    with pytest.raises(ValueError, match="too short"):
        HashCache(tmp_path / "h.json").addnet_hash(short)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        HashCache(tmp_path / "h.json").sha256(tmp_path / "nope.safetensors")


def test_legacy_hash(tmp_path):
    data = _content(0x100000 + 0x10000 + 500, seed=1)
    path = _write(tmp_path / "old.ckpt", data)
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = _write(tmp_path / "small.ckpt", b"tiny")
    assert legacy_hash(small) == hashlib.sha256(b"").hexdigest()[:8]


def test_threads_share_one_cache(tmp_path):
    paths = [_write(tmp_path / f"m{i}.safetensors", _content(200_000 + i, seed=i)) for i in range(4)]
    expected = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    cache = HashCache(tmp_path / "hashes.json")

    def hash_eight(offset: int) -> list[tuple[object, str]]:
        chosen = [paths[(i + offset) % len(paths)] for i in range(8)]
        return [(path, cache.sha256(path)) for path in chosen]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = [pair for pairs in pool.map(hash_eight, range(6)) for pair in pairs]
    assert len(results) == 48
    assert all(value == expected[path] for path, value in results)
    stored = json.loads((tmp_path / "hashes.json").read_text())["sections"]["sha256"]
    assert {key: entry["sha256"] for key, entry in stored.items()} == {str(p.resolve()): v for p, v in expected.items()}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []
