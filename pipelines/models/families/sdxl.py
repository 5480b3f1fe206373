"""SDXL: CLIP ViT-L + OpenCLIP ViT-bigG text encoders, a UNet with size/crop micro-conditioning.

Loading is shared in ``pipelines/models/checkpoints.py`` (its SDXL paths); the pooled embeddings and
``add_time_ids`` are handled by the shared UNet path (``processing._sample_batch``, ``sampling/denoise.py``).
"""

from __future__ import annotations

from collections.abc import Collection

from pipelines.models.checkpoints import FAMILY_CONFIG_DIRS, SDXL_TEXT_PREFIXES, UNET_CONV_IN
from pipelines.models.families.base import Family


def _claims(keys: Collection[str]) -> bool:
    return UNET_CONV_IN in keys and all(any(key.startswith(prefix) for key in keys) for prefix in SDXL_TEXT_PREFIXES)


FAMILY = Family(
    name="sdxl",
    label="SDXL",
    claims_keys=_claims,
    folder_classes=("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"),
    config_dir=FAMILY_CONFIG_DIRS["sdxl"],
)
