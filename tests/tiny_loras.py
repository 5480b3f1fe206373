"""Tiny random LoRAs for the tiny test models, in the two file formats users have.

``write_tiny_loras(lora_dir, family)`` writes, for ``family`` "sd1", "sd2" or "sdxl" (file names say sd15, sd21,
sdxl)::

    tiny-<family>-lora-kohya.safetensors   kohya / A1111 keys (lora_unet_..., lora_te_... / lora_te1_, lora_te2_,
                                           .lora_down / .lora_up / .alpha), kohya training metadata with
                                           ``ss_output_name`` (the alias), a LoCon 3x3 convolution included
    tiny-<family>-lora-peft.safetensors    diffusers / peft keys (unet.<module>.lora_A / lora_B, text_encoder...)

Each LoRA targets the attention projections of the UNet's transformer blocks and of every text encoder's
layers. SDXL kohya files name UNet modules the way kohya's SDXL trainer does, after the original
(``input_blocks.4.1...``) layout; SD 1.x / 2.x kohya files use diffusers' module names, as kohya's trainer does.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from tests.tiny_models import tiny_components, unet_to_original

RANK = 4
#: The alias (``ss_output_name``) of each family's kohya LoRA.
ALIASES = {"sd1": "tinyDetailSD15", "sd2": "tinyDetailSD21", "sdxl": "tinyDetailSDXL"}
_FAMILY_TAGS = {"sd1": ("sd15", "sd_v1", "stable-diffusion-v1/lora", 512),
                "sd2": ("sd21", "sd_v2_768_v", "stable-diffusion-v2-768-v/lora", 768),
                "sdxl": ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024)}
_UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def _linear_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(suffixes)]


def _pair(generator: torch.Generator, module: torch.nn.Module, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) weights of one LoRA module: down (rank, in[, k, k]), up (out, rank[, 1, 1])."""
    if isinstance(module, torch.nn.Conv2d):
        k = module.kernel_size
        down = torch.randn(RANK, module.in_channels, *k, generator=generator) * scale
        up = torch.randn(module.out_channels, RANK, 1, 1, generator=generator) * scale
    else:
        down = torch.randn(RANK, module.in_features, generator=generator) * scale
        up = torch.randn(module.out_features, RANK, generator=generator) * scale
    return down.half(), up.half()


def _text_encoders(family: str, components: dict) -> list[tuple[str, str, torch.nn.Module]]:
    """(kohya prefix, diffusers prefix, model) of each text encoder."""
    if family == "sdxl":
        return [("lora_te1_", "text_encoder.", components["text_encoder"]),
                ("lora_te2_", "text_encoder_2.", components["text_encoder_2"])]
    return [("lora_te_", "text_encoder.", components["text_encoder"])]


def _kohya_unet_name(family: str, unet, name: str) -> str:
    """A UNet module's kohya key stem: diffusers names for SD 1.x, original (SGM) names for SDXL."""
    if family != "sdxl":
        return "lora_unet_" + name.replace(".", "_")
    original = _original_unet_names(unet)[name + ".weight"]
    return "lora_unet_" + original.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")


def _original_unet_names(unet) -> dict[str, str]:
    # unet_to_original keeps the state dict's order, so the two key lists line up one to one.
    return dict(zip(unet.state_dict(), unet_to_original(unet), strict=True))


def kohya_lora(family: str, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny ``family`` model in kohya / A1111 key format (alpha = rank / 2)."""
    components = tiny_components(family)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    unet = components["unet"]
    targets = _linear_targets(unet, _UNET_TARGETS)
    # One LoCon module (a 3x3 convolution of a ResNet), the LyCORIS variant diffusers reads.
    conv_name = next(name for name, module in unet.named_modules()
                     if isinstance(module, torch.nn.Conv2d) and name.endswith("resnets.0.conv1"))
    targets.append((conv_name, unet.get_submodule(conv_name)))
    stems = [(_kohya_unet_name(family, unet, name), module) for name, module in targets]
    for kohya_prefix, _, encoder in _text_encoders(family, components):
        stems += [(kohya_prefix + name.replace(".", "_"), module)
                  for name, module in _linear_targets(encoder, _TEXT_TARGETS)]
    for stem, module in stems:
        down, up = _pair(generator, module, scale)
        state[f"{stem}.lora_down.weight"] = down
        state[f"{stem}.lora_up.weight"] = up
        state[f"{stem}.alpha"] = torch.tensor(RANK / 2, dtype=torch.float16)
    return state


def peft_lora(family: str, seed: int = 1, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny ``family`` model in diffusers / peft key format (no alphas: scale 1)."""
    components = tiny_components(family)
    generator = torch.Generator().manual_seed(seed)
    modules = [("unet." + name, module) for name, module in _linear_targets(components["unet"], _UNET_TARGETS)]
    for _, prefix, encoder in _text_encoders(family, components):
        modules += [(prefix + name, module) for name, module in _linear_targets(encoder, _TEXT_TARGETS)]
    state: dict[str, torch.Tensor] = {}
    for name, module in modules:
        down, up = _pair(generator, module, scale)
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    return state


def kohya_metadata(family: str) -> dict[str, str]:
    """Training metadata as kohya's trainer writes it (values are strings)."""
    short, base, architecture, resolution = _FAMILY_TAGS[family]
    return {
        "ss_output_name": ALIASES[family],
        "ss_base_model_version": base,
        "ss_sd_model_name": f"tiny-{short}.safetensors",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(RANK / 2),
        "ss_num_epochs": "3",
        "ss_tag_frequency": json.dumps({"img": {"tiny": 4, "detail": 2}}),
        "modelspec.architecture": architecture,
        "modelspec.resolution": f"{resolution}x{resolution}",
    }


def write_tiny_loras(lora_dir: Path, family: str = "sd1") -> dict[str, Path]:
    """Write the kohya and the peft tiny LoRA of ``family`` into ``lora_dir``; returns name -> path."""
    short = _FAMILY_TAGS[family][0]
    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    paths = {f"{short}-kohya": lora_dir / f"tiny-{short}-lora-kohya.safetensors",
             f"{short}-peft": lora_dir / f"tiny-{short}-lora-peft.safetensors"}
    safetensors.torch.save_file(kohya_lora(family), str(paths[f"{short}-kohya"]), metadata=kohya_metadata(family))
    safetensors.torch.save_file(peft_lora(family), str(paths[f"{short}-peft"]), metadata={"format": "pt"})
    return paths
