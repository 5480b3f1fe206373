"""SD 1.x: one CLIP ViT-L text encoder, a 4-channel UNet (epsilon; inpainting 9 channels).

Loading, detection details (sidecar, inpainting) and the single-file key layout are shared with SD 2.x and
SDXL in ``pipelines/models/checkpoints.py``; conditioning and sampling are the shared UNet path.
"""

from __future__ import annotations

from collections.abc import Collection

from pipelines.models.checkpoints import FAMILY_CONFIG_DIRS, SD1_TEXT_PREFIX, UNET_CONV_IN
from pipelines.models.families.base import Family


def _claims(keys: Collection[str]) -> bool:
    return UNET_CONV_IN in keys and any(key.startswith(SD1_TEXT_PREFIX) for key in keys)


FAMILY = Family(
    name="sd1",
    label="SD 1.x",
    claims_keys=_claims,
    folder_classes=("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
    config_dir=FAMILY_CONFIG_DIRS["sd1"],
)
