"""Load A1111-style checkpoints offline: single files (original LDM key layout) and diffusers folders.

A single file carries weights only. The configs that describe its components come from the
folders shipped in ``pipelines/models/configs/`` (one per family, in diffusers layout), adjusted for what
the weights say (inpainting UNet, prediction type) and for a sidecar ``<stem>.yaml`` beside the file.
The resulting config folder is written once into a cache folder, keyed by its content, and handed to
diffusers' ``from_single_file(state_dict, config=..., local_files_only=True)`` (UNet, VAE) and to the
CLIP converter diffusers' pipeline loader uses (text encoders), so nothing is fetched from the hub.
The file itself is read once, by :func:`read_state_dict` (the one weights reader,
:mod:`pipelines.models.weights`), which never unpickles code.

Sidecar (A1111 semantics, docs/compatibility.md §3): the original LDM inference config overrides detection
(``model.params.parameterization: "v"`` marks v-prediction). Because an LDM config cannot describe
text encoders of other sizes, our sidecar may also hold a top-level ``diffusers:`` mapping of
per-component config overrides (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``,
``scheduler``) merged over the family's shipped configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.models.weights import UnsafeCheckpointError as UnsafeCheckpointError
from pipelines.models.weights import read_weights

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
#: One shared copy of the CLIP BPE files, used by every tokenizer of every family (see configs/make_tokenizer.py).
TOKENIZER_FILES_DIR = CONFIGS_DIR / "clip_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
FAMILY_CONFIG_DIRS = {"sd1": CONFIGS_DIR / "sd15", "sd2": CONFIGS_DIR / "sd2", "sdxl": CONFIGS_DIR / "sdxl"}
#: The SDXL refiner: family "sdxl" (same latent space, VAE and scheduler) with ``ModelFamily.refiner`` set.
SDXL_REFINER_CONFIG_DIR = CONFIGS_DIR / "sdxl_refiner"
#: Components a sidecar ``diffusers:`` mapping may override, and where each config lives in a folder.
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
PREDICTION_TYPES = ("epsilon", "v_prediction")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."
#: An empty tensor some v-prediction checkpoints (SDXL v-pred fine-tunes) carry to say so.
V_PRED_MARKER = "v_pred"
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"


@dataclass(frozen=True)
class ModelFamily:
    """What a checkpoint is, as far as loading and sampling need to know.

    ``config_dir`` is the family's shipped config folder (``pipelines/models/configs/<family>``), or the
    model's own folder for a diffusers folder.
    """

    name: str  # "sd1" | "sd2" | "sdxl"
    inpainting: bool
    prediction_type: str  # "epsilon" | "v_prediction"
    config_dir: Path
    #: An SDXL refiner (family "sdxl"): only the OpenCLIP-G text encoder, aesthetic-score conditioning.
    refiner: bool = False


@dataclass(frozen=True)
class _Sidecar:
    """What a ``<stem>.yaml`` beside a checkpoint says; None where it says nothing."""

    path: Path
    family: str | None
    prediction_type: str | None
    overrides: dict[str, dict[str, Any]]


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint or VAE file without ever executing code from it.

    :func:`pipelines.models.weights.read_weights`: a pickle that needs anything beyond tensors and plain
    containers raises :class:`UnsafeCheckpointError`; a ``state_dict`` nesting is unwrapped and non-tensor
    entries (``global_step`` ...) are dropped.
    """
    return read_weights(path, device=device)


def _read_sidecar(path: Path | None) -> _Sidecar | None:
    if path is None:
        return None
    sidecar_path = Path(path).with_suffix(".yaml")
    if not sidecar_path.is_file():
        return None
    try:
        data = yaml.safe_load(sidecar_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{sidecar_path}: invalid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{sidecar_path}: expected a mapping at the top level")  # noqa: TRY004 (bad file)
    overrides = data.get("diffusers") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"{sidecar_path}: 'diffusers' must map component names to config mappings")
    unknown = sorted(set(overrides) - set(CONFIG_FILES))
    if unknown:
        raise ValueError(
            f"{sidecar_path}: unknown components under 'diffusers': {unknown}; known: {sorted(CONFIG_FILES)}"
        )
    family, prediction_type = _read_ldm_config(data.get("model"))
    prediction_type = overrides.get("scheduler", {}).get("prediction_type", prediction_type)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{sidecar_path}: unsupported prediction type {prediction_type!r}")
    return _Sidecar(sidecar_path, family, prediction_type, overrides)


def _read_ldm_config(model: Any) -> tuple[str | None, str | None]:
    """Family and prediction type from the ``model:`` section of an original LDM/SGM config."""
    if not isinstance(model, dict):
        return None, None
    params = model.get("params") or {}
    cond_target = str((params.get("cond_stage_config") or {}).get("target", ""))
    if str(model.get("target", "")).startswith("sgm.") or "network_config" in params:
        family = "sdxl"
    elif cond_target.endswith("FrozenOpenCLIPEmbedder"):
        family = "sd2"
    elif cond_target.endswith("FrozenCLIPEmbedder"):
        family = "sd1"
    else:
        family = None
    # An LDM config without "parameterization" means eps; SGM (SDXL) configs name a scaling class instead.
    denoiser = (params.get("denoiser_config") or {}).get("params") or {}
    scaling = str((denoiser.get("scaling_config") or {}).get("target", ""))
    is_v = params.get("parameterization") == "v" or scaling.endswith("VScaling")
    return family, "v_prediction" if is_v else "epsilon"


# --------------------------------------------------------------------------- detection


def _key_prefixes(keys: Iterable[str]) -> list[str]:
    return sorted({".".join(key.split(".")[:2]) for key in keys})


def _family_name_from_keys(state_dict: dict[str, torch.Tensor], path: Path | None) -> str:
    where = str(path) if path is not None else "state dict"
    prefixes = (UNET_PREFIX, VAE_PREFIX, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_REFINER_TEXT_PREFIX)
    has = {prefix: any(key.startswith(prefix) for key in state_dict) for prefix in (*prefixes, *SDXL_TEXT_PREFIXES)}
    found = ", ".join(_key_prefixes(state_dict)[:12])
    if not has[UNET_PREFIX]:
        raise ValueError(
            f"{where} is not a Stable Diffusion checkpoint: no UNet weights ({UNET_PREFIX}*); found {found}"
        )
    if not has[VAE_PREFIX]:
        raise ValueError(f"{where} has no VAE weights ({VAE_PREFIX}*); found {found}")
    if all(has[prefix] for prefix in SDXL_TEXT_PREFIXES):
        return "sdxl"
    if has[SDXL_REFINER_TEXT_PREFIX]:
        return "sdxl"  # the refiner (see _is_sdxl_refiner)
    if has[SD2_TEXT_PREFIX]:
        return "sd2"
    if has[SD1_TEXT_PREFIX]:
        return "sd1"
    raise ValueError(f"{where}: no text encoder of a known family (SD 1.x, SD 2.x, SDXL); found {found}")


def _plan(state_dict: dict[str, torch.Tensor], path: Path | None) -> tuple[ModelFamily, _Sidecar | None, bool]:
    """Family from the weights and the sidecar; the flag says the prediction type is still unknown."""
    sidecar = _read_sidecar(path)
    name = _family_name_from_keys(state_dict, path)
    if sidecar is not None and sidecar.family is not None and sidecar.family != name:
        raise ValueError(f"{sidecar.path} describes a {sidecar.family} model but {path} holds {name} weights")
    in_channels = state_dict[UNET_CONV_IN].shape[1]
    if in_channels not in (4, 9):
        raise ValueError(f"{path}: UNet with {in_channels} input channels is unsupported (4 normal, 9 inpainting)")
    inpainting = in_channels == 9
    prediction_type = sidecar.prediction_type if sidecar is not None else None
    if prediction_type is None and V_PRED_MARKER in state_dict:
        prediction_type = "v_prediction"
    # SD 2.x comes as 512 eps and 768 v models with identical key names; 2.x inpainting is eps.
    unknown = prediction_type is None and name == "sd2" and not inpainting
    family = ModelFamily(name, inpainting, prediction_type or "epsilon", FAMILY_CONFIG_DIRS[name])
    if _is_sdxl_refiner(state_dict):
        family = replace(family, config_dir=SDXL_REFINER_CONFIG_DIR, refiner=True)
    return family, sidecar, unknown


@torch.no_grad()
def _is_v_prediction(unet: UNet2DConditionModel) -> bool:
    """Tell a v-prediction UNet from an epsilon one by how it answers at the last timestep.

    On latents of 0.5 at t=999 with an empty context, an epsilon model predicts noise close to
    its input, while a v model's answer lies far below it: the mean of (output - input) falls
    under -1 only for v-prediction (the test A1111 applies to SD 2.x).
    """
    weight = next(unet.parameters())
    latents = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=weight.dtype, device=weight.device)
    context = torch.zeros((1, 77, unet.config.cross_attention_dim), dtype=weight.dtype, device=weight.device)
    timestep = torch.tensor([999], device=weight.device)
    output = unet(latents, timestep, encoder_hidden_states=context).sample
    return (output.float() - latents.float()).mean().item() < -1


def detect_family(state_dict: dict[str, torch.Tensor], path: Path | None = None) -> ModelFamily:
    """Detect family, inpainting and prediction type of an original-layout checkpoint.

    ``path`` locates the sidecar ``<stem>.yaml``, which overrides detection. Without one, an
    SD 2.x model's prediction type is found by running its UNet once (see ``_is_v_prediction``).
    """
    family, sidecar, unknown = _plan(state_dict, path)
    if not unknown:
        return family
    configs = _merged_configs(family, sidecar)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    converted = convert_ldm_unet_checkpoint(state_dict, configs["unet"])
    unet.load_state_dict({key: value.float() for key, value in converted.items()})
    return replace(family, prediction_type="v_prediction" if _is_v_prediction(unet.eval()) else "epsilon")


# --------------------------------------------------------------------------- configs


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _merged_configs(family: ModelFamily, sidecar: _Sidecar | None) -> dict[str, dict[str, Any]]:
    """Every config of the family folder (keyed by relative path), adjusted for this model."""
    base = family.config_dir
    configs = {"model_index.json": _read_json(base / "model_index.json")}
    for component, relative in CONFIG_FILES.items():
        if (base / relative).is_file():
            configs[component] = _read_json(base / relative)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for name in TOKENIZER_CONFIG_FILES:
            if (base / tokenizer / name).is_file():
                configs[f"{tokenizer}/{name}"] = _read_json(base / tokenizer / name)
    if "scheduler" in configs:
        configs["scheduler"]["prediction_type"] = family.prediction_type
    if sidecar is not None:
        for component, values in sidecar.overrides.items():
            if component not in configs:
                raise ValueError(f"{sidecar.path}: {family.name} models have no {component}")
            configs[component] = {**configs[component], **values}
    if "unet" in configs:
        configs["unet"]["in_channels"] = 9 if family.inpainting else 4
    return configs


def _materialize(configs: dict[str, dict[str, Any]], cache_dir: Path, label: str) -> Path:
    """Write configs (plus the shared tokenizer files) as a diffusers folder in the cache; reuse it if present."""
    tokenizers = sorted({key.split("/")[0] for key in configs if key.startswith("tokenizer")})
    payload = json.dumps({"configs": configs, "tokenizers": tokenizers}, sort_keys=True).encode()
    digest = hashlib.sha256(payload).hexdigest()[:16]
    target = Path(cache_dir) / "diffusers-configs" / f"{label}-{digest}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=target.parent))
    for key, config in configs.items():
        relative = CONFIG_FILES.get(key, key)
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    for tokenizer in tokenizers:
        for name in TOKENIZER_FILES:
            _link_or_copy(TOKENIZER_FILES_DIR / name, staging / tokenizer / name)
    try:
        staging.rename(target)
    except OSError:
        # Another process wrote the same folder first; its content is identical by construction.
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def shipped_tokenizer(family: str = "sd1", subfolder: str = "tokenizer") -> CLIPTokenizer:
    """The CLIP tokenizer a family ships with, built from the files in ``pipelines/models/configs`` (no model needed).

    For token counting before a model is loaded, and for building models from the shipped configs.
    """
    config = json.loads((FAMILY_CONFIG_DIRS[family] / subfolder / "tokenizer_config.json").read_text("utf-8"))
    pad = config.get("pad_token", "<|endoftext|>")
    return CLIPTokenizer.from_pretrained(
        TOKENIZER_FILES_DIR, local_files_only=True, pad_token=pad["content"] if isinstance(pad, dict) else pad,
        model_max_length=config.get("model_max_length", 77),
    )


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # other file system, or links not allowed: a copy is only 1.5 MB
        shutil.copyfile(source, destination)


# --------------------------------------------------------------------------- loading


def _require_complete(model: torch.nn.Module, component: str, path: Path) -> None:
    # diffusers leaves weights it did not find on the meta device instead of failing.
    missing = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if missing:
        raise ValueError(f"{path}: {len(missing)} {component} weights are missing from the file, e.g. {missing[:3]}")


def _load_text_encoder(cls: type, state_dict: dict, config_dir: Path, subfolder: str, dtype: torch.dtype, path: Path):
    model = create_diffusers_clip_model_from_ldm(
        cls, state_dict, subfolder=subfolder, config=str(config_dir), torch_dtype=dtype, local_files_only=True
    )
    _require_complete(model, subfolder, path)
    return model


def _with_text_model_level(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Early SD 1.x files (saved by older transformers) lack the ``text_model.`` level diffusers expects."""
    fixed = {}
    for key, value in state_dict.items():
        if key.startswith(SD1_TEXT_PREFIX) and not key.startswith(SD1_TEXT_PREFIX + "text_model."):
            key = SD1_TEXT_PREFIX + "text_model." + key[len(SD1_TEXT_PREFIX):]
        fixed[key] = value
    return fixed


def _load_single_file(path: Path, torch_dtype: torch.dtype, cache_dir: Path) -> tuple[DiffusionPipeline, ModelFamily]:
    state_dict = _with_text_model_level(read_state_dict(path))
    family, sidecar, unknown = _plan(state_dict, path)
    config_dir = _materialize(_merged_configs(family, sidecar), cache_dir, family.name)
    common = {"config": str(config_dir), "local_files_only": True, "dtype": torch_dtype}
    unet = UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **common)
    _require_complete(unet, "unet", path)
    if unknown:
        # The UNet config does not depend on the prediction type, so the loaded UNet can answer it.
        family = replace(family, prediction_type="v_prediction" if _is_v_prediction(unet) else "epsilon")
        config_dir = _materialize(_merged_configs(family, sidecar), cache_dir, family.name)
        common["config"] = str(config_dir)
    vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", **common)
    _require_complete(vae, "vae", path)
    index = _read_json(config_dir / "model_index.json")
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    components = {
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler_class.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True),
    }
    if not family.refiner:  # the refiner has only the second (OpenCLIP-G) text encoder
        components["text_encoder"] = _load_text_encoder(CLIPTextModel, state_dict, config_dir, "text_encoder",
                                                        torch_dtype, path)
        components["tokenizer"] = CLIPTokenizer.from_pretrained(config_dir, subfolder="tokenizer",
                                                                local_files_only=True)
    if family.name == "sdxl":
        components["text_encoder_2"] = _load_text_encoder(
            CLIPTextModelWithProjection, state_dict, config_dir, "text_encoder_2", torch_dtype, path
        )
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(
            config_dir, subfolder="tokenizer_2", local_files_only=True
        )
    return _assemble(family, components, index), family


def _assemble(family: ModelFamily, components: dict[str, Any], index: dict[str, Any]) -> DiffusionPipeline:
    if family.refiner:
        return _refiner_pipeline(components, index)
    if family.name == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **components,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return pipe


def _family_of_folder(folder: Path) -> ModelFamily:
    unet = _read_json(folder / "unet" / "config.json")
    index = _read_json(folder / "model_index.json")
    text_encoder = folder / "text_encoder" / "config.json"
    hidden_act = _read_json(text_encoder).get("hidden_act") if text_encoder.is_file() else None
    if unet.get("addition_embed_type") == "text_time" or "text_encoder_2" in index:
        name = "sdxl"
    elif hidden_act == "gelu" or unet.get("cross_attention_dim") == 1024:  # OpenCLIP ViT-H of SD 2.x
        name = "sd2"
    else:
        name = "sd1"
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction_type = _read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    refiner = name == "sdxl" and _is_sdxl_refiner_folder(index)
    return ModelFamily(name, unet.get("in_channels", 4) == 9, prediction_type, folder, refiner=refiner)


def _load_folder(folder: Path, torch_dtype: torch.dtype) -> tuple[DiffusionPipeline, ModelFamily]:
    if not (folder / "model_index.json").is_file() or not (folder / "unet" / "config.json").is_file():
        raise ValueError(f"{folder} is not a diffusers model folder (model_index.json and unet/config.json expected)")
    family = _family_of_folder(folder)
    if family.refiner:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, add_watermarker=False
        )
    elif family.name == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, add_watermarker=False
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            dtype=torch_dtype,
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe, family


def load_checkpoint(
    path: Path, *, torch_dtype: torch.dtype, cache_dir: Path
) -> tuple[DiffusionPipeline, ModelFamily]:
    """Load a checkpoint file or diffusers folder into a pipeline, fully offline.

    Returns a ``StableDiffusionPipeline`` (SD 1.x / 2.x), ``StableDiffusionXLPipeline`` (SDXL) or
    ``StableDiffusionXLImg2ImgPipeline`` (SDXL refiner: no first text encoder), inpainting models included,
    holding unet, vae, text encoder(s), tokenizer(s) and scheduler; never a safety checker or feature
    extractor. Derived config folders go under ``cache_dir``.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _load_single_file(path, torch_dtype, Path(cache_dir))


def load_vae(path: Path, family: ModelFamily, *, torch_dtype: torch.dtype, cache_dir: Path) -> AutoencoderKL:
    """Load a separate VAE file (``models/VAE/``) for a model of ``family``.

    Accepts original LDM layout (with or without the ``first_stage_model.`` prefix) and diffusers
    layout. The config is the family's VAE config, overridden by ``diffusers: {vae: ...}`` in a
    sidecar ``<stem>.yaml``.
    """
    path = Path(path)
    state_dict = read_state_dict(path)
    if not any(key.endswith("decoder.conv_in.weight") for key in state_dict):
        found = ", ".join(_key_prefixes(state_dict)[:12])
        raise ValueError(f"{path} is not a VAE: no decoder weights (decoder.conv_in.weight); found {found}")
    sidecar = _read_sidecar(path)
    overrides = sidecar.overrides.get("vae", {}) if sidecar is not None else {}
    config = {**_read_json(family.config_dir / CONFIG_FILES["vae"]), **overrides}
    config_dir = _materialize({"vae": config}, Path(cache_dir), "vae")
    vae = AutoencoderKL.from_single_file(
        state_dict, config=str(config_dir), subfolder="vae", local_files_only=True, dtype=torch_dtype
    )
    _require_complete(vae, "vae", path)
    return vae


# --------------------------------------------------------------------------- the SDXL refiner


def _is_sdxl_refiner(state_dict: dict[str, torch.Tensor]) -> bool:
    """An original-layout SDXL refiner: the OpenCLIP-G encoder as ``conditioner.embedders.0`` and no CLIP-L."""
    keys = state_dict.keys()
    return any(key.startswith(SDXL_REFINER_TEXT_PREFIX) for key in keys) and not any(
        key.startswith(SDXL_TEXT_PREFIXES[0]) for key in keys)


def _is_sdxl_refiner_folder(index: dict[str, Any]) -> bool:
    """A diffusers refiner folder: aesthetic-score conditioning, or a second text encoder without a first."""
    no_first = not (index.get("text_encoder") or [None])[0] and bool((index.get("text_encoder_2") or [None])[0])
    return bool(index.get("requires_aesthetics_score")) or no_first


def _refiner_pipeline(components: dict[str, Any], index: dict[str, Any]) -> DiffusionPipeline:
    return StableDiffusionXLImg2ImgPipeline(
        **components, text_encoder=None, tokenizer=None,
        requires_aesthetics_score=index.get("requires_aesthetics_score", True),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", False),
        add_watermarker=False,
    )
