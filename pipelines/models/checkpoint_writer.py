"""Writing a model as a single-file checkpoint in the ORIGINAL Stable Diffusion key layout.

The inverse of what :mod:`pipelines.models.checkpoints` reads (through diffusers' single-file converters):
diffusers components -> ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (SD 1.x, OpenAI CLIP as transformers stores it) /
``cond_stage_model.model.*`` (SD 2.x, OpenCLIP with fused q/k/v) / ``conditioner.embedders.0.transformer.*`` +
``conditioner.embedders.1.model.*`` (SDXL), the layout A1111, ComfyUI, kohya's tools and diffusers'
``from_single_file`` all read.

Block numbering is derived from the model's own config (levels, layers per block, which levels have
attention), so any UNet or VAE size converts, the tiny test models included.

Memory: :func:`original_entries` only renames; a tensor that must be built (OpenCLIP's fused q/k/v, a
transposed projection) is a :class:`Lazy` made when written. :func:`write_checkpoint` streams the entries
through :class:`~pipelines.models.weights.SafetensorsWriter` into a hidden file renamed into place
(:func:`~pipelines.files.atomic_output`), so a checkpoint never exists half written and the model is never
held twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.files import atomic_output
from pipelines.models.checkpoints import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_REFINER_TEXT_PREFIX,
    SDXL_TEXT_PREFIXES,
    UNET_PREFIX,
    V_PRED_MARKER,
    VAE_PREFIX,
)
from pipelines.models.weights import SafetensorsWriter, TensorInfo


@dataclass(frozen=True)
class Lazy:
    """A tensor built only when it is written (its shape and dtype known before)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


Entry = torch.Tensor | Lazy


def materialize(entry: Entry) -> torch.Tensor:
    return entry.make() if isinstance(entry, Lazy) else entry


def _info(entry: Entry) -> TensorInfo:
    if isinstance(entry, Lazy):
        return TensorInfo(entry.dtype, entry.shape)
    return TensorInfo(entry.dtype, tuple(entry.shape))


# --------------------------------------------------------------------------- UNet

_RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET_NAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(f"no original name for UNet resnet weight {rest}")


def _layers_per_block(value: int | list[int] | tuple[int, ...]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"layers_per_block: a UNet with different layers per level ({list(value)}) has no "
                         "original layout")
    return int(value[0])


def unet_to_original(state: Mapping[str, Entry], layers_per_block: int | list[int],
                     prefix: str = UNET_PREFIX) -> dict[str, Entry]:
    """UNet weights (diffusers names) in the LDM layout, in the same order; nothing is copied.

    Level ``i`` of ``n`` has ``layers_per_block`` resnets (+ attentions) down and one more up, so with
    ``b = layers_per_block + 1``: ``down_blocks.i.resnets.j`` -> ``input_blocks.{1 + i*b + j}.0``, its
    downsampler -> ``input_blocks.{(i+1)*b}.0.op``; ``up_blocks.i.resnets.j`` -> ``output_blocks.{i*b + j}.0``,
    its upsampler -> ``output_blocks.{i*b + b-1}.{2 if the level has attention else 1}``; attentions sit at
    ``.1`` beside their resnet; the mid block is ``middle_block.0`` / ``.1`` (attention) / ``.2``."""
    per_block = _layers_per_block(layers_per_block) + 1
    up_has_attention = {int(key.split(".")[1]) for key in state
                        if key.startswith("up_blocks.") and ".attentions." in key}
    out: dict[str, Entry] = {}
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
        out[prefix + new] = tensor
    return out


# --------------------------------------------------------------------------- VAE

_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_original(state: Mapping[str, torch.Tensor], levels: int, prefix: str = VAE_PREFIX) -> dict[str, Entry]:
    """VAE weights in the LDM layout (``encoder.down.N.block.M``, ``decoder.up.N`` counted from the bottom,
    ``mid.attn_1`` with its projections as 1x1 convolutions); ``levels`` = the number of blocks."""
    out: dict[str, Entry] = {}
    for key, tensor in state.items():
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


# --------------------------------------------------------------------------- text encoders


def clip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Entry]:
    """OpenAI CLIP in the transformers layout, as SD 1.x / SDXL store it (``<prefix>text_model.*``)."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state.items()}


def _fused(parts: list[torch.Tensor]) -> Lazy:
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return Lazy(tuple(shape), parts[0].dtype, lambda: torch.cat([p.detach() for p in parts]))


def open_clip_to_original(state: Mapping[str, torch.Tensor], layers: int, hidden_size: int,
                          prefix: str) -> dict[str, Entry]:
    """OpenCLIP layout (``transformer.resblocks.N``, fused q/k/v ``in_proj``) as SD 2.x / SDXL store it."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    first = state["final_layer_norm.weight"]
    out: dict[str, Entry] = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": first,
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    # OpenCLIP multiplies by text_projection on the right; SD 2.x files carry one though SD 2.x does not use it.
    projection = state.get("text_projection.weight")
    if projection is not None:
        out[prefix + "text_projection"] = Lazy((projection.shape[1], projection.shape[0]), projection.dtype,
                                               lambda: projection.detach().T.contiguous())
    else:
        out[prefix + "text_projection"] = Lazy((hidden_size, hidden_size), first.dtype,
                                               lambda: torch.eye(hidden_size, dtype=first.dtype))
    for layer in range(layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = _fused([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


# --------------------------------------------------------------------------- whole checkpoints


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach() for key, value in module.state_dict().items()}


def original_entries(family: str, components: Mapping[str, Any], *,
                     prediction_type: str = "epsilon") -> dict[str, Entry]:
    """Every weight of a ``family`` ("sd1", "sd2", "sdxl", "sdxl_refiner") model from its diffusers ``components``
    (``unet``, ``vae``, ``text_encoder`` and for SDXL ``text_encoder_2``; a refiner has only ``text_encoder_2``),
    keyed as the original single file keys them.

    A v-prediction model gets the empty ``v_pred`` marker tensor our loader (and ComfyUI) read."""
    if family not in ("sd1", "sd2", "sdxl", "sdxl_refiner"):
        raise ValueError(f"family: {family!r} has no original single-file layout here; "
                         "allowed: sd1, sd2, sdxl, sdxl_refiner")
    unet, vae = components["unet"], components["vae"]
    entries = {**unet_to_original(_state(unet), unet.config.layers_per_block),
               **vae_to_original(_state(vae), len(vae.config.up_block_types))}
    if family == "sdxl_refiner":  # one embedder: OpenCLIP-G as conditioner.embedders.0
        second = components["text_encoder_2"]
        entries.update(open_clip_to_original(_state(second), second.config.num_hidden_layers,
                                             second.config.hidden_size, SDXL_REFINER_TEXT_PREFIX))
        if prediction_type == "v_prediction":
            entries[V_PRED_MARKER] = torch.zeros(0)
        return entries
    encoder = components["text_encoder"]
    if family == "sd1":
        entries.update(clip_to_original(_state(encoder), SD1_TEXT_PREFIX))
    elif family == "sd2":
        entries.update(open_clip_to_original(_state(encoder), encoder.config.num_hidden_layers,
                                             encoder.config.hidden_size, SD2_TEXT_PREFIX))
    else:
        second = components["text_encoder_2"]
        entries.update(clip_to_original(_state(encoder), SDXL_TEXT_PREFIXES[0]))
        entries.update(open_clip_to_original(_state(second), second.config.num_hidden_layers,
                                             second.config.hidden_size, SDXL_TEXT_PREFIXES[1]))
    if prediction_type == "v_prediction":
        entries[V_PRED_MARKER] = torch.zeros(0)
    return entries


def to_original(family: str, components: Mapping[str, Any], *, dtype: torch.dtype | None = None,
                prediction_type: str = "epsilon") -> dict[str, torch.Tensor]:
    """:func:`original_entries` as plain tensors (on the CPU, floating ones in ``dtype`` when given)."""
    out = {}
    for key, entry in original_entries(family, components, prediction_type=prediction_type).items():
        tensor = materialize(entry).detach().to("cpu")
        out[key] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
    return out


def write_checkpoint(path: Path, entries: Mapping[str, Entry], *, dtype: torch.dtype = torch.float16,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``entries`` as a ``.safetensors`` file at ``path``: floating tensors stored in ``dtype``, one tensor
    in memory at a time, into a hidden file renamed into place when complete."""
    layout = []
    for key, entry in entries.items():
        info = _info(entry)
        layout.append((key, TensorInfo(dtype if info.dtype.is_floating_point else info.dtype, info.shape)))
    with atomic_output(path, prefix=".checkpoint-") as handle:
        writer = SafetensorsWriter(handle, layout, dict(metadata or {}))
        for key, info in layout:
            writer.write(key, materialize(entries[key]).detach().to("cpu", info.dtype))
        writer.close()


__all__ = ["Entry", "Lazy", "clip_to_original", "materialize", "open_clip_to_original", "original_entries",
           "to_original", "unet_to_original", "vae_to_original", "write_checkpoint"]
