"""The model registry (titles, hashes, lookups) and the model manager (cache, switching, VAE)."""

from __future__ import annotations

import ast
import hashlib
import weakref
from pathlib import Path

import numpy as np
import pytest

from pipelines.images.infotext import parse_infotext
from tests.helpers import pixels, txt2img

ROOT = Path(__file__).resolve().parents[2]


def test_titles_carry_the_short_sha256(engine, tiny_models):
    path = tiny_models / "Stable-diffusion" / "tiny-sd15.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = engine.registry.find_checkpoint("tiny-sd15.safetensors")
    assert model.title == f"tiny-sd15.safetensors [{digest[:10]}]"
    titles = {m.name for m in engine.registry.checkpoints}
    assert {"tiny-sd15.safetensors", "tiny-sd21-v.safetensors", "tiny-sdxl.safetensors",
            "tiny-sd15-inpainting.safetensors", "tiny-sd15-diffusers"} <= titles
    assert [m.name for m in engine.registry.vaes] == ["tiny-vae.safetensors"]


@pytest.mark.parametrize("how", ["title", "name", "model_name", "short_hash", "sha256"])
def test_a_model_is_found_by_title_file_name_name_or_hash(engine, how):
    model = engine.registry.find_checkpoint("tiny-sd15.safetensors")
    assert engine.registry.find_checkpoint(getattr(model, how)) == model


def test_a1111_short_titles_are_found_by_hash_then_by_name(engine):
    model = engine.registry.find_checkpoint("tiny-sd15.safetensors")
    other = engine.registry.find_checkpoint("tiny-sdxl.safetensors")
    assert engine.registry.find_checkpoint(f"tiny-sd15 [{model.short_hash}]") == model  # A1111's "Hires checkpoint"
    assert engine.registry.find_checkpoint(f"renamed [{model.short_hash}]") == model  # the hash decides
    assert engine.registry.find_checkpoint("tiny-sdxl [0123456789]") == other  # an unknown hash: by name
    with pytest.raises(LookupError, match="no model matches 'missing \\[0123456789\\]'"):
        engine.registry.find_checkpoint("missing [0123456789]")


def test_hashes_are_cached(engine_factory, monkeypatch):
    engine = engine_factory()
    import pipelines.models.hashes as hashes

    calls = []
    original = hashes._sha256_file
    monkeypatch.setattr(hashes, "_sha256_file", lambda p: calls.append(p) or original(p))
    engine.registry.refresh()
    assert calls == []  # every file was hashed once already, when the engine started
    assert (engine.paths.cache_dir / "hashes.json").is_file()


def test_lru_cache_of_one_frees_the_old_model(engine_factory):
    engine = engine_factory(checkpoint_cache=1)
    first = engine.models.get("tiny-sd15.safetensors")
    ref = weakref.ref(first.unet)
    del first
    engine.models.get("tiny-sd21-v.safetensors")
    assert ref() is None, "switching models must free the old one"
    assert [m.file.name for m in engine.models._loaded.values()] == ["tiny-sd21-v.safetensors"]


def test_lru_cache_keeps_recent_models(engine_factory):
    engine = engine_factory(checkpoint_cache=2)
    a = engine.models.get("tiny-sd15.safetensors")
    engine.models.get("tiny-sd21-v.safetensors")
    assert engine.models.get("tiny-sd15.safetensors") is a  # from the cache, not loaded again
    engine.models.get("tiny-sdxl.safetensors")  # pushes out the least recently used: sd21
    assert sorted(m.file.name for m in engine.models._loaded.values()) == ["tiny-sd15.safetensors",
                                                                            "tiny-sdxl.safetensors"]


def test_vae_choice(engine_factory):
    engine = engine_factory()
    own = engine.generate(txt2img())
    other = engine.generate(txt2img(vae="tiny-vae.safetensors"))
    assert not np.array_equal(pixels(own.images[0]), pixels(other.images[0]))
    parsed = parse_infotext(other.infotexts[0])
    vae = engine.registry.find_vae("tiny-vae.safetensors")
    assert parsed["VAE"] == "tiny-vae.safetensors" and parsed["VAE hash"] == vae.short_hash
    back = engine.generate(txt2img(vae="Automatic"))
    assert np.array_equal(pixels(back.images[0]), pixels(own.images[0]))
    assert "VAE" not in parse_infotext(back.infotexts[0])


def test_unload_and_reload(engine_factory):
    engine = engine_factory()
    engine.generate(txt2img())
    engine.models.unload()
    assert engine.models.current is None
    assert len(engine.generate(txt2img()).images) == 1
    assert engine.models.reload().file.name == "tiny-sd15.safetensors"


def test_no_models_gives_a_clear_message(tmp_path):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    engine = Engine(EngineSettings(paths=Paths.under(tmp_path), device="cpu"))
    with pytest.raises(LookupError, match="no checkpoints found; put a .safetensors file or a diffusers folder"):
        engine.generate(txt2img(checkpoint=None))


def test_engine_library_imports_no_ui_or_server():
    """pipelines/ is a plain library: it never imports gradio, fastapi, webui/ or extensions/."""
    forbidden = {"gradio", "fastapi", "webui", "extensions", "uvicorn", "starlette"}
    for path in (ROOT / "pipelines").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
