"""Tiny random-weight ControlNets matching the tiny SD 1.5 UNet of ``tests/tiny_models.py``.

``write_tiny_controlnets(folder)`` writes the same model twice::

    folder/tiny-controlnet-sd15.safetensors   single file, original layout (control_model.*), float16
    folder/tiny-controlnet-sd15-diffusers/    diffusers folder (config.json + float16 safetensors)
    folder/tiny-controlnet-sdxl-diffusers/    for the tiny SDXL model, diffusers folder

The ControlNet starts as a copy of the tiny UNet's encoder (``ControlNetModel.from_unet``), then its zero
convolutions get seeded random weights, so that it really changes the image. Values are rounded to float16
so both files hold exactly the same model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch
from diffusers import ControlNetModel

from tests.tiny_models import tiny_components, unet_to_original

SEED = 21
#: Four entries make the six-block embedding every real ControlNet has (the original layout assumes it).
EMBEDDING_CHANNELS = (4, 8, 8, 16)
_UNET_PARTS = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "add_embedding.")


def tiny_controlnet(family: str = "sd1") -> ControlNetModel:
    """The seeded tiny ControlNet for the tiny UNet of ``family`` ("sd1" or "sdxl"; float32, exact in float16)."""
    controlnet = ControlNetModel.from_unet(tiny_components(family)["unet"],
                                           conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    generator = torch.Generator().manual_seed(SEED)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.05)
        for tensor in controlnet.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return controlnet.eval()


def controlnet_to_original(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """ControlNet weights in the original ``control_model.*`` layout (the inverse of diffusers' converter)."""
    state = controlnet.state_dict()
    # The encoder half is named like a UNet's; reuse the UNet mapping for it.
    encoder = SimpleNamespace(config=controlnet.config,
                              state_dict=lambda: {k: v for k, v in state.items() if k.startswith(_UNET_PARTS)})
    out = {"control_model." + key.removeprefix("model.diffusion_model."): value
           for key, value in unet_to_original(encoder).items()}
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("controlnet_cond_embedding.conv_in."):
            new = f"input_hint_block.0.{parts[-1]}"
        elif key.startswith("controlnet_cond_embedding.blocks."):
            new = f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[-1]}"
        elif key.startswith("controlnet_cond_embedding.conv_out."):
            new = f"input_hint_block.{2 * (blocks + 1)}.{parts[-1]}"
        elif key.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{parts[1]}.0.{parts[-1]}"
        elif key.startswith("controlnet_mid_block."):
            new = f"middle_block_out.0.{parts[-1]}"
        else:
            continue
        out["control_model." + new] = value
    return out


def write_tiny_controlnets(folder: Path) -> dict[str, Path]:
    """Write the tiny SD 1.5 ControlNet as a single file and as a diffusers folder, and the SDXL one, under
    ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    controlnet = tiny_controlnet()
    single = folder / "tiny-controlnet-sd15.safetensors"
    state = {key: value.detach().half().contiguous() for key, value in controlnet_to_original(controlnet).items()}
    safetensors.torch.save_file(state, str(single))
    diffusers_dir = folder / "tiny-controlnet-sd15-diffusers"
    controlnet.to(torch.float16).save_pretrained(diffusers_dir, safe_serialization=True)
    sdxl_dir = folder / "tiny-controlnet-sdxl-diffusers"
    tiny_controlnet("sdxl").to(torch.float16).save_pretrained(sdxl_dir, safe_serialization=True)
    return {"controlnet-sd15": single, "controlnet-sd15-diffusers": diffusers_dir,
            "controlnet-sdxl-diffusers": sdxl_dir}
