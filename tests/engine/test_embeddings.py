"""Textual inversion files: every known layout, safe loading, hashes, refresh."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from pipelines.prompts.embeddings import (
    SINGLE_KEY,
    EmbeddingDatabase,
    format_ti_hashes,
    load_textual_inversion,
)


class NotATensor:
    """Pickling an instance of this class makes a file that weights_only loading must refuse."""


def _sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_a1111_pt_format(tmp_path):
    vectors = torch.randn(3, 16)
    path = tmp_path / "style-a.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vectors)},
            "name": "style-a",
            "step": 1500,
            "sd_checkpoint": "abcdef01",
            "sd_checkpoint_name": "v1-5",
        },
        path,
    )
    item = load_textual_inversion(path)
    assert item.name == "style-a" and item.vector_count == 3
    assert torch.equal(item.vectors[SINGLE_KEY], vectors)
    assert item.step == 1500 and item.sd_checkpoint_name == "v1-5"
    assert item.shorthash == _sha12(path)


def test_single_tensor_formats(tmp_path):
    save_file({"emb_params": torch.ones(2, 8)}, tmp_path / "emb-params.safetensors")
    torch.save({"<cat-toy>": torch.ones(8)}, tmp_path / "learned_embeds.bin")  # diffusers' layout
    torch.save(torch.ones(4, 8, dtype=torch.float16), tmp_path / "bare.pt")
    shapes = {item.name: tuple(item.vectors[SINGLE_KEY].shape) for item in EmbeddingDatabase(tmp_path).items()}
    assert shapes == {"bare": (4, 8), "emb-params": (2, 8), "learned_embeds": (1, 8)}
    assert EmbeddingDatabase(tmp_path).get("bare").vectors[SINGLE_KEY].dtype == torch.float32


def test_sdxl_format(tmp_path):
    save_file({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, tmp_path / "xl.safetensors")
    item = EmbeddingDatabase(tmp_path).get("xl")
    assert {key: tuple(value.shape) for key, value in item.vectors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}


def test_unsafe_and_broken_files_are_skipped_and_reported(tmp_path):
    torch.save({"string_to_param": {"*": torch.ones(1, 8)}, "extra": NotATensor()}, tmp_path / "evil.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    save_file({"a": torch.ones(1, 8), "b": torch.ones(1, 8)}, tmp_path / "two.safetensors")
    save_file({"emb_params": torch.ones(1, 8)}, tmp_path / "good.safetensors")
    (tmp_path / "notes.txt").write_text("ignored")
    database = EmbeddingDatabase(tmp_path)
    assert database.names() == ["good"]
    assert sorted(os.path.basename(path) for path in database.errors) == [
        "evil.pt", "garbage.safetensors", "two.safetensors"
    ]
    assert "weights_only=True" in database.errors[str(tmp_path / "evil.pt")]
    assert "NotATensor" in database.errors[str(tmp_path / "evil.pt")]


def test_refresh_sees_new_changed_and_removed_files(tmp_path):
    database = EmbeddingDatabase(tmp_path / "embeddings")  # missing folder: empty, no error
    assert len(database) == 0 and database.errors == {}
    folder = tmp_path / "embeddings" / "sub"
    folder.mkdir(parents=True)
    save_file({"emb_params": torch.ones(1, 8)}, folder / "one.safetensors")
    generation = database.generation
    database.refresh()
    assert "one" in database and database.generation == generation + 1
    first = database.get("one")
    database.refresh()
    assert database.get("one") is first and database.generation == generation + 1  # unchanged: not reloaded

    save_file({"emb_params": torch.ones(3, 8)}, folder / "one.safetensors")
    os.utime(folder / "one.safetensors", ns=(1, 1))
    database.refresh()
    assert database.get("one").vector_count == 3
    (folder / "one.safetensors").unlink()
    database.refresh()
    assert "one" not in database


def test_ti_hashes_text(tmp_path):
    save_file({"emb_params": torch.ones(1, 8)}, tmp_path / "a.safetensors")
    save_file({"emb_params": torch.zeros(1, 8)}, tmp_path / "b.safetensors")
    database = EmbeddingDatabase(tmp_path)
    text = format_ti_hashes([database.get("b"), database.get("a")])
    assert text == f"b: {_sha12(tmp_path / 'b.safetensors')}, a: {_sha12(tmp_path / 'a.safetensors')}"
    assert format_ti_hashes([]) is None


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not an embedding"):
        load_textual_inversion(path)
