"""THE FAMILY REGISTRY: every model family the engine runs, one module each (see ``base.Family``).

To add a family, write its module beside these and add its ``FAMILY`` to :data:`FAMILIES` (ARCHITECTURE.md,
"How to add a model family"). Order matters for single files: the first family whose ``claims_keys`` accepts
a file's tensor names loads it; a file no family claims goes to the shared Stable Diffusion loader, whose
errors say what the file holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from pipelines.models import checkpoints
from pipelines.models.families import flux, sd1, sd2, sd3, sdxl
from pipelines.models.families.base import Family
from pipelines.models.weights import read_safetensors_header

FAMILIES: tuple[Family, ...] = (flux.FAMILY, sd3.FAMILY, sdxl.FAMILY, sd2.FAMILY, sd1.FAMILY)
_BY_NAME = {family.name: family for family in FAMILIES}


def get(name: str) -> Family:
    """The family called ``name`` (``ModelFamily.name``); ValueError lists the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_BY_NAME)}") from None


def family_of_keys(keys: Sequence[str] | set[str]) -> Family | None:
    """The family of a single file with these tensor names, or None when no family claims them."""
    names = keys if isinstance(keys, (set, frozenset)) else set(keys)
    return next((family for family in FAMILIES if family.claims_keys(names)), None)


def family_of_folder(folder: Path) -> Family | None:
    """The family of a diffusers folder by its ``model_index.json`` class, or None."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    return next((family for family in FAMILIES if class_name in family.folder_classes), None)


def family_of_path(path: Path) -> Family | None:
    """The family of a model file or folder, read cheaply (a safetensors header, a folder's model index);
    None when that does not tell (a ``.ckpt``, an unknown layout)."""
    path = Path(path)
    if path.is_dir():
        return family_of_folder(path)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        _, keys = read_safetensors_header(path)
    except ValueError:
        return None
    return family_of_keys(set(keys))


def unsupported(request, family: Family) -> tuple[str, str] | None:
    """(field, message) when ``family`` cannot run ``request`` (a size its own loop does not take, a refiner);
    None when it can. A family with its own loop works on 2x2 patches of 8x latents: sizes are multiples of 16."""
    if family.sample is None:
        return None
    if getattr(request, "refiner_checkpoint", None):
        return "refiner_checkpoint", (f"the Refiner runs on SD 1.x, SD 2.x and SDXL models, not {family.label} "
                                      "models; leave it off (Hires. fix can switch to another checkpoint)")
    for name in ("width", "height"):
        if getattr(request, name) % 16:
            return name, f"{name} must be a multiple of 16 for {family.label} models, got {getattr(request, name)}"
    if request.enable_hr and any(side % 16 for side in request.hires_size):
        width, height = request.hires_size
        name = "hr_scale"
        if request.hr_resize_x or request.hr_resize_y:
            name = "hr_resize_x" if (width % 16 and request.hr_resize_x) or not request.hr_resize_y else "hr_resize_y"
        return name, (f"the Hires. fix size ({width}x{height}) must be a multiple of 16 for {family.label} models; "
                      f"choose another {name}")
    return None


def load_checkpoint(path: Path, *, torch_dtype: torch.dtype, cache_dir: Path, modules: Sequence[Path] = (),
                    search: dict[str, Sequence[Path]] | None = None):
    """Load a checkpoint of any family, fully offline: ``(pipeline, ModelFamily)``.

    ``modules`` are separate files completing a checkpoint stored without them (text encoders, VAE: Forge's
    "VAE / Text Encoder" list); ``search`` maps a model kind (``text_encoder``, ``vae``) to the folders named
    in messages about a missing one."""
    family = family_of_path(path)
    if family is not None and family.load is not None:
        return family.load(path, torch_dtype=torch_dtype, cache_dir=cache_dir, modules=modules, search=search)
    if modules:
        names = ", ".join(Path(module).name for module in modules)
        raise ValueError(f"additional_modules: {Path(path).name} is a {family.label if family else 'Stable Diffusion'}"
                         f" checkpoint that carries its own text encoders; {names} are for models stored without "
                         "them (Flux.1)")
    return checkpoints.load_checkpoint(path, torch_dtype=torch_dtype, cache_dir=cache_dir)
