"""LoRA layers for training (peft adapters on the loaded UNet and text encoders) and the file they become.

Training adds a peft adapter named :data:`ADAPTER` to the model's modules; :func:`remove_adapter` takes it out
again, so the loaded model is what it was. :func:`kohya_state_dict` turns the adapter's weights into kohya's
/ A1111's key layout (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, text
encoders as ``lora_te_`` or, for SDXL, ``lora_te1_`` / ``lora_te2_``), which A1111, kohya's tools, ComfyUI
and diffusers' ``load_lora_weights`` all read; :func:`write_lora` writes it atomically with ``ss_*`` metadata.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch

from pipelines.files import write_atomically

ADAPTER = "sdui_training"
_A, _B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def add_adapter(module: torch.nn.Module, rank: int, alpha: float, targets: Iterable[str]) -> list[torch.nn.Parameter]:
    """Add the training adapter to ``module``'s layers whose names end with one of ``targets``; returns its
    parameters (fp32, trainable). The base weights are frozen by the caller."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params = []
    for name, param in module.named_parameters():
        if f".{ADAPTER}." in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    if not params:
        raise ValueError(f"targets: no layer of the {type(module).__name__} matches {', '.join(targets)}")
    return params


def adapter_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights by parameter name (a copy on the CPU)."""
    return {name: param.detach().float().cpu().clone() for name, param in module.named_parameters()
            if f".{ADAPTER}." in name}


def load_adapter_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = {name: param for name, param in module.named_parameters() if f".{ADAPTER}." in name}
    if set(params) != set(weights):
        raise ValueError("resume: the saved LoRA layers do not match this run's settings")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def remove_adapter(module: torch.nn.Module) -> None:
    """Take the training adapter out; with no other adapter left, put the plain layers back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        if ADAPTER in layer.lora_A:  # type: ignore[attr-defined]
            layer.delete_adapter(ADAPTER)
    if all(not getattr(layer, "lora_A", {}) for layer in layers):
        _unwrap(module)
    config = getattr(module, "peft_config", None)
    if isinstance(config, dict):
        config.pop(ADAPTER, None)
        if not config:
            del module.peft_config


def _unwrap(module: torch.nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _unwrap(child)


def kohya_state_dict(parts: dict[str, dict[str, torch.Tensor]], alpha: float,
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``{kohya prefix: adapter weights}`` (e.g. ``{"lora_unet_": ..., "lora_te_": ...}``) -> kohya keys."""
    out: dict[str, torch.Tensor] = {}
    for prefix, weights in parts.items():
        for name, tensor in weights.items():
            if name.endswith(_A):
                stem, kind = name[: -len(_A)], "lora_down"
            elif name.endswith(_B):
                stem, kind = name[: -len(_B)], "lora_up"
            else:
                continue
            key = prefix + stem.replace(".", "_")
            out[f"{key}.{kind}.weight"] = tensor.to(dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return dict(sorted(out.items()))


def tensor_hashes(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: SHA-256 of the tensor data of the
    serialized file (the header skipped), and the legacy 8-digit hash of the bytes at 1 MiB."""
    data = safetensors.torch.save(tensors)
    (header,) = struct.unpack("<Q", data[:8])
    stream = io.BytesIO(data)
    stream.seek(0x100000)
    return hashlib.sha256(data[8 + header:]).hexdigest(), hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]



def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save a LoRA file atomically, with kohya's tensor hashes added to ``metadata``."""
    model_hash, legacy = tensor_hashes(tensors)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    write_atomically(path, safetensors.torch.save(tensors, metadata=metadata))
