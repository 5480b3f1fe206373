"""Shared fixtures: the tiny random-weight model tree, and engines on it (CPU, fp32)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network or the user's Hugging Face cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A models/ folder in A1111 layout holding every tiny model (written once per test session)."""
    from tests.fixtures.tiny_models import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def engine_factory(tiny_models, tmp_path_factory):
    """Build an engine on the tiny models with its own data dir; keyword args go to EngineSettings."""
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    def make(**settings) -> Engine:
        data = tmp_path_factory.mktemp("data")
        paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs")
        return Engine(EngineSettings(paths=paths, device="cpu", **settings))

    return make


@pytest.fixture(scope="session")
def engine(engine_factory):
    """One engine shared by the tests that only generate (its model cache holds all tiny models)."""
    return engine_factory(checkpoint_cache=5)


@pytest.fixture(scope="session")
def face_models(tmp_path_factory) -> Path:
    """A folder with GFPGAN/ (GFPGANv1.4.pth, detection_Resnet50_Final.pth) and Codeformer/
    (codeformer-v0.1.0.pth), random weights in the published layouts (written once per session, ~380 MB)."""
    from tests.fixtures.tiny_faces import write_face_models

    root = tmp_path_factory.mktemp("face-models")
    write_face_models(root)
    return root


@pytest.fixture(scope="session")
def face_engine(tiny_models, face_models, tmp_path_factory):
    """An engine on the tiny models that also finds the face models (as --gfpgan/--codeformer-models-path)."""
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    data = tmp_path_factory.mktemp("face-data")
    paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs",
                  extra_dirs={"gfpgan": (face_models / "GFPGAN",), "codeformer": (face_models / "Codeformer",)})
    return Engine(EngineSettings(paths=paths, device="cpu"))
