"""The one weights reader (pipelines/models/weights.py): formats, refusals, and that nobody else reads files."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pipelines.models import checkpoints
from pipelines.models.weights import (
    UnsafeCheckpointError,
    read_safetensors_header,
    read_weights,
    read_weights_raw,
)

ROOT = Path(__file__).resolve().parents[2]
READER = ROOT / "pipelines" / "models" / "weights.py"


class _RunsShell:
    """Pickling an instance makes a pickle that calls os.system when loaded by a plain unpickler."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.bias": torch.ones(3)}


def _assert_same(loaded: dict, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_safetensors_file_and_its_header(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_tensors(), str(path), metadata={"ss_output_name": "cat"})
    _assert_same(read_weights(path), _tensors())
    metadata, keys = read_safetensors_header(path)
    assert metadata == {"ss_output_name": "cat"}
    assert sorted(keys) == ["a.weight", "b.bias"]


def test_zip_ckpt_with_state_dict_nesting_and_extras(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _tensors(), "global_step": 12, "epoch": 1}, path)  # torch's zip format
    _assert_same(read_weights(path), _tensors())
    nested = read_weights(path, unwrap_state_dict=False, keep_non_tensors=True)
    assert nested["global_step"] == 12 and sorted(nested["state_dict"]) == ["a.weight", "b.bias"]
    with pytest.raises(ValueError, match=r"model\.ckpt holds no tensors"):
        read_weights(path, unwrap_state_dict=False)  # only a nested dict and numbers at the top


def test_legacy_pt_file(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 4)}, "step": 500}, path, _use_new_zipfile_serialization=False)
    raw = read_weights_raw(path)
    assert raw["step"] == 500 and torch.equal(raw["string_to_param"]["*"], torch.ones(2, 4))
    kept = read_weights(path, keep_non_tensors=True)
    assert kept["step"] == 500
    with pytest.raises(ValueError, match="holds no tensors"):
        read_weights(path)  # without keep_non_tensors the nested tensor is not a top-level weight


def test_bare_tensor_is_raw_content_but_not_a_state_dict(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(3, 4), path)
    assert torch.equal(read_weights_raw(path), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"bare\.pt does not hold a state dict \(found Tensor\)"):
        read_weights(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_naming_the_file_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "hook": _RunsShell(f"touch {marker}")}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_weights(path)
    message = str(error.value)
    assert str(path) in message and "refusing to load" in message
    assert "import posix.system" in message or "import nt.system" in message
    assert "weights_only=True" in message and ".safetensors" in message
    for reader in (read_weights_raw, lambda p: read_weights(p, keep_non_tensors=True)):
        with pytest.raises(UnsafeCheckpointError):
            reader(path)
    assert not marker.exists()
    # The old import place of the error is the same class (tests and callers import it from there).
    assert checkpoints.UnsafeCheckpointError is UnsafeCheckpointError


def test_plain_pickle_of_a_class_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"weight": torch.ones(1), "config": _RunsShell("true")}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"model\.bin"):
        read_weights(path)


def test_non_dict_file(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1), torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"list\.pth does not hold a state dict \(found list\)") as error:
        read_weights(path)
    assert not isinstance(error.value, UnsafeCheckpointError)


def test_file_without_tensors(tmp_path):
    path = tmp_path / "empty.ckpt"
    torch.save({"global_step": 3, "note": "nothing here"}, path)
    with pytest.raises(ValueError, match=r"empty\.ckpt holds no tensors"):
        read_weights(path)
    with pytest.raises(ValueError, match=r"empty\.ckpt holds no tensors"):
        read_weights(path, keep_non_tensors=True)
    empty = tmp_path / "empty.safetensors"
    safetensors.torch.save_file({}, str(empty))
    with pytest.raises(ValueError, match=r"empty\.safetensors holds no tensors"):
        read_weights(empty)


def test_unreadable_unsupported_and_missing_files_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage\.safetensors is not a readable safetensors file"):
        read_weights(garbage)
    with pytest.raises(ValueError, match=r"garbage\.safetensors is not a readable safetensors file"):
        read_safetensors_header(garbage)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match=r"broken\.pt is not a readable weights file") as error:
        read_weights(broken)
    assert not isinstance(error.value, UnsafeCheckpointError)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported checkpoint type '\.txt'"):
        read_weights(text)
    with pytest.raises(ValueError, match=r"notes\.txt: not a \.safetensors file"):
        read_safetensors_header(text)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.ckpt"):
        read_weights(tmp_path / "nowhere.ckpt")


def test_device_argument_moves_pickled_tensors(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(_tensors(), path)
    loaded = read_weights(path, device="meta")
    assert all(value.device.type == "meta" for value in loaded.values())
    assert sorted(loaded) == ["a.weight", "b.bias"]


# --------------------------------------------------------------------------- nobody else reads weight files

#: Names whose use means reading a weights file: ``torch.load``, safetensors' ``load_file`` / ``safe_open``
#: (also ``safetensors.torch.load`` of bytes).
_FORBIDDEN_NAMES = {"load_file", "safe_open"}


def weight_reads(source: str) -> list[tuple[int, str]]:
    """(line, what) for every reference to a weights-file reading function in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if node.attr in _FORBIDDEN_NAMES or (node.attr == "load" and owner in ("torch", "safetensors.torch")):
                found.append((node.lineno, f"{owner}.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in _FORBIDDEN_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "safetensors"):
            for alias in node.names:
                if alias.name in _FORBIDDEN_NAMES or alias.name == "load":
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    return found


def test_the_reader_check_sees_every_way_of_reading(tmp_path):
    source = (
        "import torch\nimport safetensors\nfrom safetensors.torch import load_file as lf\nfrom torch import load\n"
        "def f(p):\n    a = torch.load(p, weights_only=True)\n    b = safetensors.torch.load_file(p)\n"
        "    with safetensors.safe_open(p, 'pt') as h:\n        pass\n    loader = torch.load\n"
        "    return safetensors.torch.load(p.read_bytes())\n"
    )
    assert sorted(what for _, what in weight_reads(source)) == sorted([
        "from safetensors.torch import load_file", "from torch import load", "torch.load", "torch.load",
        "safetensors.torch.load_file", "safetensors.safe_open", "safetensors.torch.load",
    ])
    assert weight_reads("import torch\ntorch.save({}, 'x')\nsafetensors.torch.save_file({}, 'y')\n") == []


def test_only_the_one_reader_reads_weight_files():
    offenders = []
    for package in ("pipelines", "webui", "extensions", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == READER:
                continue
            for line, what in weight_reads(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, (
        "weight files are read only by pipelines/models/weights.py (read_weights, read_weights_raw, "
        "read_safetensors_header; extensions get them from webui.extension_api):\n" + "\n".join(offenders)
    )
    assert weight_reads(READER.read_text(encoding="utf-8")), "the reader itself must be seen by the check"
