"""Tiny random-weight Stable Diffusion models in the A1111 file layout, for fast CPU tests.

``python -m tests.tiny_models OUT_DIR`` writes::

    OUT_DIR/Stable-diffusion/tiny-sd15.safetensors            (+ tiny-sd15.yaml sidecar)
    OUT_DIR/Stable-diffusion/tiny-sd21-v.safetensors          (+ sidecar: v-prediction)
    OUT_DIR/Stable-diffusion/tiny-sdxl.safetensors            (+ sidecar)
    OUT_DIR/Stable-diffusion/tiny-sd15-inpainting.safetensors (+ sidecar; 9-channel UNet)
    OUT_DIR/Stable-diffusion/tiny-sd15-diffusers/             (diffusers folder)
    OUT_DIR/VAE/tiny-vae.safetensors                          (+ sidecar)

Components use diffusers' own test sizes (UNet channels (32, 64), CLIP hidden 32 with 5 layers)
with the real 49408-token vocabulary, are seeded, and are rounded to float16 values so that the
float16 files hold them exactly. Files keep the ORIGINAL key layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``, ``conditioner.embedders.*``) so that they go through
the real single-file loader; the diffusers -> original converter below is the inverse of the
mapping in diffusers' ``loaders/single_file_utils.py`` (Apache-2.0). Each sidecar carries a
``diffusers:`` mapping with the tiny sizes, merged by ``pipelines.models.checkpoints`` over the shipped configs.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import sys
from pathlib import Path

import safetensors.torch
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import PNDMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tests.tiny_upscalers import write_tiny_esrgan

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "models" / "configs"
FAMILY_DIRS = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}
#: Tiny checkpoint kinds: family, inpainting.
KINDS = {"sd15": ("sd1", False), "sd21-v": ("sd2", False), "sdxl": ("sdxl", False), "sd15-inpainting": ("sd1", True)}
SEEDS = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "standalone_vae": 11}

_SD_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
}
_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "projection_dim": 32,
}
# Four blocks, so the VAE downsamples by 8 like every real one: image sizes map to the same latent sizes
# as with a real model (a 512 px image is 64 latents, not 256, which would make attention explode).
_VAE = {
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "sample_size": 64,
}
#: Sidecar ``diffusers:`` overrides per family: everything that differs from the shipped real configs.
TINY_OVERRIDES: dict[str, dict[str, dict]] = {
    "sd1": {"unet": {**_SD_UNET, "attention_head_dim": 8}, "vae": _VAE, "text_encoder": _CLIP},
    "sd2": {"unet": {**_SD_UNET, "attention_head_dim": [2, 4]}, "vae": _VAE, "text_encoder": _CLIP},
    "sdxl": {
        "unet": {
            **_SD_UNET,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            # Context = both encoders' hidden states side by side; pooled projection + 6 size/crop values.
            "cross_attention_dim": 32 + 40,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        },
        "vae": _VAE,
        "text_encoder": _CLIP,
        # Wider than the first encoder, as in SDXL; diffusers tells the two apart by their width.
        "text_encoder_2": {**_CLIP, "hidden_size": 40},
    },
}
_LDM = "ldm.models.diffusion.ddpm."
_CLIP_EMBEDDER = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
_OPEN_CLIP_EMBEDDER = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"}
_EPS_SCALING = {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"}
#: The LDM/SGM part of each sidecar, as A1111 users write it (only the keys detection reads).
LDM_SIDECARS = {
    "sd15": {
        "target": _LDM + "LatentDiffusion",
        "params": {"cond_stage_config": _CLIP_EMBEDDER, "unet_config": {"params": {"in_channels": 4}}},
    },
    "sd21-v": {
        "target": _LDM + "LatentDiffusion",
        "params": {"parameterization": "v", "cond_stage_config": _OPEN_CLIP_EMBEDDER},
    },
    "sdxl": {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "network_config": {"params": {"in_channels": 4}},
            "denoiser_config": {"params": {"scaling_config": _EPS_SCALING}},
        },
    },
    "sd15-inpainting": {
        "target": _LDM + "LatentInpaintDiffusion",
        "params": {"cond_stage_config": _CLIP_EMBEDDER, "unet_config": {"params": {"in_channels": 9}}},
    },
}


# --------------------------------------------------------------------------- diffusers components


def _shipped(family: str, relative: str) -> dict:
    return json.loads((CONFIGS_DIR / FAMILY_DIRS[family] / relative).read_text(encoding="utf-8"))


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    model = build()
    # Round to float16 values so the float16 files reproduce the model exactly.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model.eval()


def tiny_components(family: str, *, inpainting: bool = False) -> dict[str, torch.nn.Module]:
    """The seeded diffusers models a tiny checkpoint of ``family`` is made from (float32, fresh copies)."""
    return copy.deepcopy(_built_components(family, inpainting))


@functools.cache
def _built_components(family: str, inpainting: bool) -> dict[str, torch.nn.Module]:
    # Seeded construction is the slow part (random init of a 49408-token embedding); build once.
    tiny = TINY_OVERRIDES[family]
    unet_config = {**_shipped(family, "unet/config.json"), **tiny["unet"], "in_channels": 9 if inpainting else 4}
    vae_config = {**_shipped(family, "vae/config.json"), **tiny["vae"]}
    components = {
        "unet": _seeded(SEEDS["unet"], lambda: UNet2DConditionModel.from_config(unet_config)),
        "vae": _seeded(SEEDS["vae"], lambda: AutoencoderKL.from_config(vae_config)),
    }
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if name in tiny:
            config = CLIPTextConfig(**{**_shipped(family, f"{name}/config.json"), **tiny[name]})
            components[name] = _seeded(SEEDS[name], lambda cls=cls, config=config: cls(config))
    return components


def tiny_standalone_vae(family: str = "sd1") -> AutoencoderKL:
    """The seeded VAE written to ``VAE/tiny-vae.safetensors`` (differs from every checkpoint's VAE)."""
    config = {**_shipped(family, "vae/config.json"), **TINY_OVERRIDES[family]["vae"]}
    return _seeded(SEEDS["standalone_vae"], lambda: AutoencoderKL.from_config(config))


# --------------------------------------------------------------------------- diffusers -> original layout

_RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET_NAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """UNet weights in the LDM ``model.diffusion_model.*`` layout."""
    per_block = unet.config.layers_per_block + 1  # input/output blocks per resolution level
    state = unet.state_dict()
    up_has_attention = {
        int(key.split(".")[1]) for key in state if key.startswith("up_blocks.") and ".attentions." in key
    }
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        top = next((name for name in _UNET_TOP if key.startswith(name + ".")), None)
        if top is not None:
            new = _UNET_TOP[top] + key[len(top):]
        elif parts[0] == "down_blocks" and parts[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv.*
            new = f"input_blocks.{(int(parts[1]) + 1) * per_block}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "up_blocks" and parts[2] == "upsamplers":  # up_blocks.i.upsamplers.0.conv.*
            block = int(parts[1])
            slot = 2 if block in up_has_attention else 1
            new = f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{'.'.join(parts[5:])}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            index = 1 + block * per_block + layer if parts[0] == "down_blocks" else block * per_block + layer
            where = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
            new = f"{where}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{where}.{index}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * layer}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:
            raise KeyError(f"no original name for UNet weight {key}")
        out["model.diffusion_model." + new] = tensor
    return out


_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_original(vae: AutoencoderKL, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """VAE weights in the LDM layout (``encoder.down.N.block.M`` ..., 1x1-conv attention)."""
    levels = len(vae.config.up_block_types)
    out = {}
    for key, tensor in vae.state_dict().items():
        parts = key.split(".")
        side, head = parts[0], parts[1] if len(parts) > 1 else ""
        if head in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if head == "down_blocks" else levels - 1 - int(parts[2])
            name = "down" if head == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{side}.{name}.{level}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                sampler = "downsample" if head == "down_blocks" else "upsample"
                new = f"{side}.{name}.{level}.{sampler}.{'.'.join(parts[5:])}"
            new = new.replace("conv_shortcut", "nin_shortcut")
        elif head == "mid_block" and parts[2] == "resnets":
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}".replace("conv_shortcut", "nin_shortcut")
        elif head == "mid_block":
            rest = ".".join(parts[4:])
            for diffusers_name, ldm_name in _VAE_ATTENTION:
                if rest.startswith(diffusers_name + "."):
                    rest = ldm_name + rest[len(diffusers_name):]
                    break
            new = f"{side}.mid.attn_1.{rest}"
            if tensor.ndim == 2:  # LDM keeps attention projections as 1x1 convolutions
                tensor = tensor[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[prefix + new] = tensor
    return out


def clip_to_original(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP in the transformers layout, as SD 1.x / SDXL store it (``<prefix>text_model.*``)."""
    state = model.state_dict()
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state.items()}


def open_clip_to_original(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (``transformer.resblocks.N``, fused qkv ``in_proj``) as SD 2.x / SDXL store it."""
    state = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    # OpenCLIP multiplies by text_projection on the right; SD 2.x ships one though it does not use it.
    projection = state.get("text_projection.weight")
    out[prefix + "text_projection"] = projection.T.contiguous() if projection is not None else torch.eye(
        model.config.hidden_size, dtype=state["final_layer_norm.weight"].dtype)
    for layer in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def to_original(family: str, components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """A whole checkpoint of ``family`` in the original single-file layout, float16."""
    state = {**unet_to_original(components["unet"]), **vae_to_original(components["vae"])}
    if family == "sd1":
        state.update(clip_to_original(components["text_encoder"], "cond_stage_model.transformer."))
    elif family == "sd2":
        state.update(open_clip_to_original(components["text_encoder"], "cond_stage_model.model."))
    else:
        state.update(clip_to_original(components["text_encoder"], "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_original(components["text_encoder_2"], "conditioner.embedders.1.model."))
    return {key: _half(value) for key, value in state.items()}


def _half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().half().contiguous() if tensor.is_floating_point() else tensor.detach().contiguous()


# --------------------------------------------------------------------------- writers


def _write_sidecar(path: Path, data: dict) -> None:
    path.with_suffix(".yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def write_tiny_checkpoint(
    path: Path, kind: str, *, ldm_sidecar: bool = True, unet_output_bias: float | None = None
) -> Path:
    """Write one tiny checkpoint of ``kind`` (a key of ``KINDS``) and its sidecar ``<stem>.yaml``.

    ``ldm_sidecar=False`` leaves the LDM part out of the sidecar (only the tiny sizes remain), so the
    loader has to detect the rest itself. ``unet_output_bias`` zeroes the UNet's last convolution and
    sets its bias, fixing what the UNet answers (used to test v-prediction detection).
    """
    family, inpainting = KINDS[kind]
    components = tiny_components(family, inpainting=inpainting)
    if unet_output_bias is not None:
        with torch.no_grad():
            components["unet"].conv_out.weight.zero_()
            components["unet"].conv_out.bias.fill_(unet_output_bias)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(to_original(family, components), str(path))
    sidecar = {"model": LDM_SIDECARS[kind]} if ldm_sidecar else {}
    _write_sidecar(path, {**sidecar, "diffusers": TINY_OVERRIDES[family]})
    return path


def write_tiny_ckpt(path: Path) -> Path:
    """Write the tiny SD 1.5 model as a pickled ``.ckpt`` (tensors only, nested under ``state_dict``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_original("sd1", tiny_components("sd1"))
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    _write_sidecar(path, {"model": LDM_SIDECARS["sd15"], "diffusers": TINY_OVERRIDES["sd1"]})
    return path


class _ShellCommand:
    """Unpickling this runs a shell command: the payload of a malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_malicious_ckpt(path: Path, marker: Path) -> Path:
    """Write a ``.ckpt`` whose unpickling would call ``os.system`` to create ``marker``.

    Never load it with a full unpickler: the refusal test checks that it is rejected and that
    ``marker`` still does not exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    script = f"open({str(marker)!r}, 'w').close()"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "callbacks": _ShellCommand(command)}
    torch.save(payload, path)
    return path


def write_tiny_vae(path: Path, family: str = "sd1") -> Path:
    """Write the standalone tiny VAE (LDM layout without prefix, like vae-ft-mse-840000) and its sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: _half(value) for key, value in vae_to_original(tiny_standalone_vae(family), prefix="").items()}
    safetensors.torch.save_file(state, str(path))
    _write_sidecar(path, {"diffusers": {"vae": TINY_OVERRIDES[family]["vae"]}})
    return path


def write_tiny_diffusers(folder: Path) -> Path:
    """Write the tiny SD 1.5 model as a diffusers folder (float16 safetensors)."""
    components = tiny_components("sd1")
    pipe = StableDiffusionPipeline(
        **components,
        tokenizer=CLIPTokenizer.from_pretrained(CONFIGS_DIR / "clip_tokenizer", model_max_length=77),
        scheduler=PNDMScheduler.from_config(_shipped("sd1", "scheduler/scheduler_config.json")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_tiny_models(out_dir: Path) -> dict[str, Path]:
    """Write the whole tiny A1111-style model tree under ``out_dir``; returns name -> path."""
    checkpoints = Path(out_dir) / "Stable-diffusion"
    paths = {kind: write_tiny_checkpoint(checkpoints / f"tiny-{kind}.safetensors", kind) for kind in KINDS}
    paths["sd15-diffusers"] = write_tiny_diffusers(checkpoints / "tiny-sd15-diffusers")
    paths["vae"] = write_tiny_vae(Path(out_dir) / "VAE" / "tiny-vae.safetensors")
    paths["esrgan"] = write_tiny_esrgan(Path(out_dir) / "ESRGAN" / "tiny-esrgan-4x.pth")
    # Imported here, not at the top: these modules build on this one.
    from tests.tiny_controlnets import write_tiny_controlnets
    from tests.tiny_loras import write_tiny_loras

    for family in ("sd1", "sd2", "sdxl"):
        paths.update(write_tiny_loras(Path(out_dir) / "Lora", family))
    paths.update(write_tiny_controlnets(Path(out_dir) / "ControlNet"))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m tests.tiny_models OUT_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.tiny_models OUT_DIR", file=sys.stderr)
        return 2
    for name, path in write_tiny_models(Path(args[0])).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
