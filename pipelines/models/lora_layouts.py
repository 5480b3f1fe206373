"""LoRA files that name modules of an original model layout -> the diffusers / peft keys diffusers' loader reads.

Trainers publish LoRAs for the transformer families (Flux.1, SD 3.5) in the key layout of the original model:
kohya sd-scripts writes ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.lora_up.weight`` and
``.alpha`` (module names with ``_`` for ``.``), ComfyUI ``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight``.
A family says which diffusers module(s) each original module is (:class:`Target`, by the module name with ``.``
turned into ``_``); :func:`to_peft` then writes the peft layout (``transformer.<module>.lora_A.weight`` /
``lora_B.weight``) for any model width:

- the alpha is folded into the up weight (scale alpha / rank; no alpha: 1), so the result needs no alphas;
- a fused projection (qkv, Flux's ``linear1``) keeps one down weight for each of its diffusers modules and has its
  up weight split by rows;
- a (shift, scale) modulation has the halves of its up weight swapped to diffusers' (scale, shift) order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

log = logging.getLogger(__name__)

#: Key endings of one LoRA module's tensors, and which part each is.
_PARTS = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up", ".lora_B.weight": "up",
          ".alpha": "alpha"}
#: A CLIP text encoder's layer modules LoRAs target (attention and MLP), in the ``_`` spelling of kohya's names.
_CLIP_MODULE = re.compile(r"(?:text_model_)?encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])")


@dataclass(frozen=True)
class Target:
    """The diffusers module(s) one original-layout LoRA module becomes (names with their component prefix)."""

    modules: tuple[str, ...]
    #: Rows of the up weight per module, from its total rows; None: equal parts.
    rows: Callable[[int], Sequence[int]] | None = None
    #: Swap the halves of the up weight: True, or a test of (rows of up, columns of down).
    swap: bool | Callable[[int, int], bool] = False

    def within(self, prefix: str) -> Target:
        """This target with ``prefix`` (a block's path) before each module name."""
        return replace(self, modules=tuple(prefix + module for module in self.modules))


def underscored(stem: str, prefixes: Sequence[str]) -> str | None:
    """``stem`` without the first of ``prefixes`` it starts with, with ``.`` as ``_``; None if none matches."""
    prefix = next((prefix for prefix in prefixes if stem.startswith(prefix)), None)
    return None if prefix is None else stem[len(prefix):].replace(".", "_")


def clip_target(stem: str, encoders: Mapping[str, str]) -> Target | None:
    """The CLIP text-encoder module of ``stem`` (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``,
    ``text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1``): ``encoders`` maps a key prefix to
    the pipeline's component (``text_encoder``, ``text_encoder_2``)."""
    for prefix, component in encoders.items():
        rest = underscored(stem, (prefix,))
        match = _CLIP_MODULE.fullmatch(rest) if rest is not None else None
        if match is not None:
            part = match[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return Target((f"{component}.text_model.encoder.layers.{match[1]}.{part}",))
    return None


def to_peft(state_dict: dict[str, torch.Tensor], target_of: Callable[[str], Target | None],
            ignored: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """``state_dict`` in the peft layout; ``state_dict`` itself when it is not in an original layout ``target_of``
    knows (some key is no LoRA tensor, or names a module ``target_of`` does not map), for diffusers' own loader.

    ``target_of`` maps a module's key stem (the key without ``.lora_down.weight`` ...) to its :class:`Target`;
    modules whose stem starts with one of ``ignored`` (a text encoder the pipeline loads no LoRA into) are left out,
    with a log line."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        ending = next((ending for ending in _PARTS if key.endswith(ending)), None)
        if ending is None:
            return state_dict
        modules.setdefault(key[:-len(ending)], {})[_PARTS[ending]] = value
    out: dict[str, torch.Tensor] = {}
    left_out = [stem for stem in modules if stem.startswith(tuple(ignored))]
    for stem, parts in modules.items():
        if stem in left_out:
            continue
        target = target_of(stem)
        if target is None or "down" not in parts or "up" not in parts:
            return state_dict
        out.update(_peft_pairs(stem, parts, target))
    if left_out:
        log.warning("LoRA: %d modules of a text encoder that takes no LoRA here are left out, e.g. %s",
                    len(left_out), left_out[0])
    return out


def _peft_pairs(stem: str, parts: dict[str, torch.Tensor], target: Target) -> dict[str, torch.Tensor]:
    """The lora_A / lora_B weights of ``target``'s modules for one original module (alpha folded into up)."""
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else rank
    up = up.float() * (alpha / rank)
    swap = target.swap(up.shape[0], down.shape[1]) if callable(target.swap) else target.swap
    if swap:
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    count = len(target.modules)
    rows = list(target.rows(up.shape[0])) if target.rows else [up.shape[0] // count] * count
    if sum(rows) != up.shape[0] or any(size <= 0 for size in rows):
        raise ValueError(f"LoRA module {stem}: {up.shape[0]} output rows do not split over {', '.join(target.modules)}")
    out: dict[str, torch.Tensor] = {}
    for module, piece in zip(target.modules, torch.split(up, rows, dim=0), strict=True):
        out[f"{module}.lora_A.weight"] = down
        out[f"{module}.lora_B.weight"] = piece.contiguous()
    return out
