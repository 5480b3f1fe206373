"""Image upscalers: ESRGAN-family models through spandrel, tiled, plus the Lanczos/Nearest/None built-ins.

Used by hires fix (image upscalers), the Extras tab and ``/sdapi/v1/upscalers``. Start from
:class:`Upscalers`; :func:`tiled_upscale` is the tensor-level tiler underneath.
"""

from pipelines.upscaling.library import (
    BUILTIN_UPSCALERS,
    TileProgress,
    UpscalerInfo,
    Upscalers,
    pil_to_tensor,
    target_size,
    tensor_to_pil,
)
from pipelines.upscaling.models import inference_dtype, load_upscaler_model, read_upscaler_state_dict
from pipelines.upscaling.tiling import count_tiles, tile_starts, tiled_upscale

__all__ = [
    "BUILTIN_UPSCALERS",
    "TileProgress",
    "UpscalerInfo",
    "Upscalers",
    "count_tiles",
    "inference_dtype",
    "load_upscaler_model",
    "pil_to_tensor",
    "read_upscaler_state_dict",
    "target_size",
    "tensor_to_pil",
    "tile_starts",
    "tiled_upscale",
]
