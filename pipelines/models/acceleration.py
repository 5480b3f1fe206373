"""Speed-ups applied to a loaded model: the defaults that keep the image, and the opt-in ``torch.compile``.

Defaults (:func:`apply_defaults`, on CUDA): cuDNN picks the fastest convolution algorithm for each shape
(results differ from the default pick by fp16 rounding at most). diffusers already runs attention through
PyTorch's scaled-dot-product attention (flash / memory-efficient kernels).

Opt-in (:func:`prepare`): ``torch.compile`` of the UNet with static shapes, which gives the fastest kernels
but compiles once per (batch, size). Compiled graphs are kept per shape, so going back to a size used
before does not compile again; the job's progress text says when a new size is being compiled.

Opt-in, for memory (:func:`store_fp8`, the ``fp8_storage`` option): the denoiser's weights kept in float8 and
cast layer by layer to the compute dtype while it runs (diffusers' layerwise casting, which leaves norms and
embeddings in the compute dtype).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import ModelMixin

log = logging.getLogger(__name__)

#: Compiled graphs kept per UNet (one per batch x size x prompt length); beyond this, dynamo recompiles.
COMPILED_SHAPES_KEPT = 32


def apply_defaults(device: torch.device) -> None:
    """Process-wide settings that make sampling faster without changing the image beyond fp16 noise."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


#: The ``fp8_storage`` option's values (A1111's "FP8 weight").
FP8_STORAGE_CHOICES = ("Disable", "Enable for SDXL", "Enable")


def fp8_wanted(choice: str, family: str, device: torch.device) -> bool:
    """Whether a model of ``family`` keeps its denoiser in fp8 under the ``fp8_storage`` option ``choice``.
    Apple's MPS has no float8 type: there the option does nothing (with a warning)."""
    if choice not in FP8_STORAGE_CHOICES:
        raise ValueError(f"fp8_storage: {choice!r} is not one of {', '.join(FP8_STORAGE_CHOICES)}")
    wanted = choice == "Enable" or (choice == "Enable for SDXL" and family == "sdxl")
    if wanted and device.type == "mps":
        log.warning("FP8 weight is on, but Apple MPS has no float8 type: the weights stay as they are")
        return False
    return wanted


def store_fp8(denoiser: ModelMixin, compute_dtype: torch.dtype) -> None:
    """Keep ``denoiser``'s Linear / Conv weights in float8 e4m3fn, upcast to ``compute_dtype`` per layer as it
    runs. Not reversible in place (the rounding is lossy): the model is loaded again to undo it.

    Each layer so stored also gets a ``compute_dtype`` attribute, the mark that peft reads for layers stored in
    one dtype and run in another: a LoRA loaded later then keeps its own weights in the compute dtype instead of
    being rounded to float8 with the layer's."""
    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    for module in denoiser.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.float8_e4m3fn:
            setattr(module, "compute_dtype", compute_dtype)  # noqa: B010 (a plain attribute, not a parameter)


def compile_supported(device: torch.device) -> bool:
    """True where ``torch.compile`` can build the UNet: a CUDA device with Triton available."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < COMPILED_SHAPES_KEPT:
            setattr(config, name, COMPILED_SHAPES_KEPT)


def is_compiled(unet: torch.nn.Module) -> bool:
    """True once :func:`compile_unet` wrapped this UNet."""
    return getattr(unet, "_compiled_call_impl", None) is not None


def compile_unet(unet: torch.nn.Module) -> None:
    """Compile ``unet`` in place (its attributes and weights stay as they are); compiling happens lazily,
    at the first call of each new input shape."""
    _raise_recompile_limit()
    unet.compile(dynamic=False, fullgraph=False)
    _set_seen_shapes(unet, set())


def uncompile_unet(unet: torch.nn.Module) -> None:
    """Back to eager execution (the compiled graphs are dropped)."""
    unet._compiled_call_impl = None
    _set_seen_shapes(unet, set())


def _set_seen_shapes(unet: torch.nn.Module, shapes: set[tuple[int, int, int]]) -> None:
    # A plain attribute (not a parameter, buffer or sub-module), which torch's typed ``Module.__setattr__``
    # does not describe.
    setattr(unet, "_sd_compiled_shapes", shapes)  # noqa: B010 (see above)


def new_shapes(unet: torch.nn.Module, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Which of ``shapes`` (batch rows, latent h, latent w) this compiled UNet has not seen; marks them seen."""
    seen = getattr(unet, "_sd_compiled_shapes", None)
    if seen is None:
        return []
    fresh = [shape for shape in dict.fromkeys(shapes) if shape not in seen]
    seen.update(fresh)
    return fresh


def prepare(model, enabled: bool, shapes: list[tuple[int, int, int]], device: torch.device) -> str | None:
    """Compile or un-compile ``model``'s UNet as the ``enabled`` option asks, before a job.

    ``shapes`` are the (batch rows, latent h, latent w) the job will run (first pass and hires, see
    :func:`job_shapes`). Returns a warm-up message for the job's progress text when one of them will be
    compiled by this job, else None.
    """
    unet = model.unet
    if enabled and not compile_supported(device):
        log.warning("torch.compile of the UNet is on, but it needs a CUDA GPU with Triton; running uncompiled")
        enabled = False
    if enabled and not is_compiled(unet):
        compile_unet(unet)
    elif not enabled and is_compiled(unet):
        uncompile_unet(unet)
    fresh = new_shapes(unet, shapes) if enabled else []
    if not fresh:
        return None
    factor = model.vae_scale_factor
    sizes = ", ".join(f"{w * factor}x{h * factor} (UNet batch {b})" for b, h, w in fresh)
    return f"Compiling the UNet for {sizes}: the first image at a new size takes about a minute"


def job_shapes(request, model) -> list[tuple[int, int, int]]:
    """The (UNet batch rows, latent h, latent w) a txt2img/img2img request will run through the UNet."""
    rows = request.batch_size * (2 if request.cfg_scale > 1.0 else 1)
    shapes = [(rows, *model.latent_size(request.width, request.height))]
    if getattr(request, "enable_hr", False):
        width, height = request.hires_size
        shapes.append((rows, *model.latent_size(width, height)))
    return shapes
