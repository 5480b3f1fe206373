"""Reading upscaler model files safely and handing their weights to spandrel.

spandrel detects the architecture (ESRGAN/RRDB, Real-ESRGAN x4plus and anime 6B, SwinIR, Compact,
DAT, HAT, ...) and the scale from the weights alone. It is never given a file: a pickled ``.pth``
is read by the one weights reader, :mod:`pipelines.models.weights`, which refuses any pickle that would
import code, exactly as for checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import spandrel
import torch

from pipelines.models.weights import ModelFileError, read_weights


def read_upscaler_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file, unwrapped from the containers trainers save them in.

    Real-ESRGAN releases nest the weights under ``params_ema``/``params``, other trainers under
    ``model``, ``net`` or a ``module.`` prefix; ``.safetensors`` files are flat. A pickle that wants
    code raises :class:`pipelines.models.weights.UnsafeCheckpointError`.
    """
    # Non-tensor entries are kept so that a params_ema mapping survives; spandrel's rules undo the nesting.
    loaded = read_weights(path, keep_non_tensors=True, unwrap_state_dict=False)
    state = spandrel.canonicalize_state_dict(loaded)
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelFileError(path, f"{path} holds no tensors")
    return tensors


def load_upscaler_model(path: Path) -> spandrel.ImageModelDescriptor:
    """Load an upscaler file on the CPU in float32, in eval mode; ModelFileError (a ValueError) if spandrel does
    not know it, cannot build it from these weights, or it is not a 3-channel image-to-image upscaler (a face restorer
    such as GFPGAN, an inpainting model)."""
    state = read_upscaler_state_dict(path)
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError as error:
        raise ModelFileError(path, f"{path}: not an upscaler architecture spandrel knows ({error})") from error
    except (KeyError, RuntimeError, TypeError, AssertionError) as error:
        # Weights that match an architecture's key pattern but not its shapes or hyperparameters make
        # spandrel fail while building the module; to the user it is one more unusable file.
        reason = f"{type(error).__name__}: {error}"
        raise ModelFileError(path, f"{path}: spandrel could not build the model ({reason})") from error
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise ModelFileError(path, f"{path}: a {model.architecture.name} model needs a mask; it is not an upscaler")
    if model.purpose == "FaceSR":
        # Face restorers expect one aligned face at a fixed size; they do not upscale whole images.
        raise ModelFileError(path, f"{path}: {model.architecture.name} is a face restoration model, not an upscaler")
    if model.input_channels != 3 or model.output_channels != 3:
        raise ModelFileError(
            path, f"{path}: a {model.architecture.name} model with {model.input_channels} input and "
            f"{model.output_channels} output channels; only RGB upscalers are supported"
        )
    return model.eval()


def inference_dtype(model: spandrel.ImageModelDescriptor, device: torch.device, half: bool) -> torch.dtype:
    """fp16 on an accelerator when asked and the architecture supports it (else bf16 if it does), fp32 otherwise."""
    if not half or device.type == "cpu":
        return torch.float32
    if model.supports_half:
        return torch.float16
    if model.supports_bfloat16:
        return torch.bfloat16
    return torch.float32
