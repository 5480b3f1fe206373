"""Fixtures of the engine tests on the flow-matching families (Flux.1, SD 3.5)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory):
    """(models root, {"flux": paths, "sd3": paths}): the tiny Flux.1 and SD 3.5 models in every layout."""
    from tests.fixtures.tiny_flux import write_tiny_flux
    from tests.fixtures.tiny_sd3 import write_tiny_sd3

    root = tmp_path_factory.mktemp("flow-models")
    return root, {"flux": write_tiny_flux(root), "sd3": write_tiny_sd3(root)}


@pytest.fixture(scope="session")
def flow_engine(flow_models, tmp_path_factory):
    """One CPU engine on :func:`flow_models` keeping a model of each family loaded."""
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    data = tmp_path_factory.mktemp("flow-data")
    paths = Paths(data_dir=data, models_dir=flow_models[0], outputs_dir=data / "outputs")
    return Engine(EngineSettings(paths=paths, device="cpu", checkpoint_cache=3))
