"""SD 2.x: one OpenCLIP ViT-H text encoder, a 4-channel UNet (512 epsilon and 768 v-prediction models).

Loading (with the v-prediction test) is shared in ``pipelines/models/checkpoints.py``.
"""

from __future__ import annotations

from collections.abc import Collection

from pipelines.models.checkpoints import FAMILY_CONFIG_DIRS, SD2_TEXT_PREFIX, UNET_CONV_IN
from pipelines.models.families.base import Family


def _claims(keys: Collection[str]) -> bool:
    return UNET_CONV_IN in keys and any(key.startswith(SD2_TEXT_PREFIX) for key in keys)


FAMILY = Family(
    name="sd2",
    label="SD 2.x",
    claims_keys=_claims,
    config_dir=FAMILY_CONFIG_DIRS["sd2"],
)
