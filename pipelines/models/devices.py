"""Choosing the device and dtypes, and freeing memory."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from pipelines.settings import EngineSettings

PRECISIONS = ("auto", "full", "half", "bf16")
MEMORY_MODES = ("normal", "medvram", "lowvram")


@dataclass(frozen=True)
class DeviceConfig:
    """Where models run and in which precision."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    memory_mode: str

    @property
    def is_accelerator(self) -> bool:
        return self.device.type in ("cuda", "mps", "xpu")


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for "auto"; otherwise the device named."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_config(settings: EngineSettings) -> DeviceConfig:
    """Resolve the settings' device, precision and memory mode; ValueError names a bad value."""
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision: {settings.precision!r} is not one of {', '.join(PRECISIONS)}")
    if settings.memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode: {settings.memory_mode!r} is not one of {', '.join(MEMORY_MODES)}")
    device = pick_device(settings.device)
    if settings.precision == "full" or (settings.precision == "auto" and device.type == "cpu"):
        dtype = torch.float32
    elif settings.precision == "bf16":
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    vae_dtype = torch.float32 if settings.no_half_vae else dtype
    memory_mode = settings.memory_mode if device.type != "cpu" else "normal"
    return DeviceConfig(device, dtype, vae_dtype, memory_mode)


def free_memory() -> None:
    """Return freed tensors' memory to the system (after unloading a model or an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """True for the out-of-memory errors of any backend."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
