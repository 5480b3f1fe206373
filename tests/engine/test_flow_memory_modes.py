"""--medvram / --lowvram for the transformer families (Flux.1, SD 3.5), whose own loops call the transformer.

Both modes leave the weights on the CPU (model offload) or the meta device (sequential offload) between calls, and
accelerate's hooks move them to the GPU for each forward; the loops must then put latents and conditioning on the
hooks' device, not on the one the weights sit on. Runs on the CPU: the hooks are installed for CUDA (nothing moves
until a forward), or for the meta device where the loops' tensors must actually be made.
"""

from __future__ import annotations

import types

import pytest
import torch
from accelerate import cpu_offload_with_hook

from pipelines.models.catalog import ModelRegistry
from pipelines.models.families import flux, sd3
from pipelines.models.manager import ModelManager
from pipelines.request import GenerationRequest
from pipelines.settings import EngineSettings, Paths
from tests.fixtures.tiny_flux import tiny_flux_pipeline
from tests.fixtures.tiny_sd3 import tiny_sd3_pipeline

PIPELINES = {"flux": (flux, lambda: tiny_flux_pipeline(True)), "sd3": (sd3, lambda: tiny_sd3_pipeline(True))}


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


@pytest.mark.parametrize("family", PIPELINES)
def test_medvram_hooks_every_component_text_encoders_included(family, tmp_path):
    paths = Paths(data_dir=tmp_path, models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    manager = ModelManager(EngineSettings(paths=paths, device="cuda", memory_mode="medvram"), ModelRegistry(paths))
    pipe = PIPELINES[family][1]()
    manager._activate(types.SimpleNamespace(pipe=pipe))
    hooks = {name: getattr(module, "_hf_hook", None) for name, module in _modules(pipe).items()}
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= set(hooks)
    assert family != "sd3" or "text_encoder_3" in hooks
    assert all(hook is not None and hook.execution_device == torch.device("cuda", 0) for hook in hooks.values())
    assert pipe.transformer.device.type == "cpu"  # until its first forward


def _offloaded_to_meta(pipe):
    """The pipeline with an offload hook on each component executing on the meta device (not chained as
    diffusers chains them: offloading a module from the meta device back to the CPU would fail)."""
    for module in _modules(pipe).values():
        cpu_offload_with_hook(module, "meta")
    return pipe


class _Stop(Exception):
    pass


@pytest.mark.parametrize("family", PIPELINES)
def test_the_loops_put_their_tensors_on_the_offload_hooks_device(family):
    module, build = PIPELINES[family]
    pipe = _offloaded_to_meta(build())
    assert pipe.transformer.device.type == "cpu"
    model = types.SimpleNamespace(pipe=pipe, scheduler_config=dict(pipe.scheduler.config))
    # As the engine hands it to a family's loop: with the family's sampler and schedule type.
    request = GenerationRequest(prompt="a cat", steps=2, width=64, height=64, cfg_scale=1.0, sampler_name="Euler",
                                scheduler="Simple")
    conditioning, _ = module.encode(model, ["a cat"], [""], 2, request)
    assert conditioning.segments[0].cond.device.type == "meta"
    seen = {}

    def first_step(step: int, latents: torch.Tensor) -> None:
        seen["latents"] = latents
        raise _Stop  # before the transformer runs: its weights would be lost to the meta device

    with pytest.raises(_Stop):
        module.sample(model, torch.randn(1, 16, 8, 8), conditioning, request, first_step)
    assert seen["latents"].device.type == "meta"
