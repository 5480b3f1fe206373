"""The always-on script "controlnet": units in, one UNet patch per unit for the job.

Each enabled unit's image is preprocessed once per job; its map is fitted to the size of every UNet call
(so the hires pass gets it at the hires size) and fed to the ControlNet, whose residuals the engine adds
to the UNet's skip connections. Nothing on the checkpoint's model is changed, so nothing can leak into the
next job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from webui.extension_api import (
    AlwaysOnScript,
    GenerationRequest,
    Job,
    LoadedModel,
    UnetCall,
    UnetResiduals,
    model_file_field,
    validate_args,
)

from .ip_adapter import (
    CLIP_MODULES,
    IPAdapterPatch,
    IPAdapterWeights,
    encode,
    image_processor,
    install,
    is_ip_adapter,
)
from .models import ControlNetEntry, ControlNetLibrary
from .preprocessors import (
    NEEDS_WEIGHTS,
    Preprocessor,
    detect,
    lookup,
    module_names,
    resolve_thresholds,
    unavailable_reason,
)
from .units import UNION_CONTROL_TYPES, ControlNetArgs, ControlNetUnit

#: "My prompt is more important": each deeper residual keeps this fraction of the next one's strength.
SOFT_INJECTION_BASE = 0.825


@dataclass
class ParsedUnit:
    """An enabled unit, resolved: where it sits in the argument list, its preprocessor and model."""

    index: int
    unit: ControlNetUnit
    preprocessor: Preprocessor
    entry: ControlNetEntry


@dataclass
class UnitPatch:
    """The UNet patch of one unit for one job; the fitted control image is cached per call size."""

    unit: ControlNetUnit
    model: Any  # diffusers ControlNetModel
    detected: Image.Image
    label: str  # "ControlNet unit 0: model <title>", for errors
    union_type: int = 0  # a ControlNet Union's control type (index of UNION_CONTROL_TYPES)
    _images: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)

    def __call__(self, call: UnetCall) -> UnetResiduals | None:
        unit = self.unit
        if unit.weight == 0 or not unit.guidance_start <= call.progress < unit.guidance_end:
            return None
        if (unit.hr_option == "Low res only" and call.pass_index == 1) or (
                unit.hr_option == "High res only" and call.pass_index == 0):
            return None
        sample, hidden, added = call.sample, call.encoder_hidden_states, call.added_cond_kwargs
        if call.pass_index == 1:  # the first pass's checkpoint was checked before the job; a hires one was not
            kind = _family_mismatch(self.model, hidden.shape[-1], bool(added and "text_embeds" in added))
            if kind:
                raise ValueError(f"{self.label} is for {kind}; the hires checkpoint is not: set the unit's hires "
                                 "option (hr_option) to 'Low res only', or choose a hires checkpoint of its family")
        cond_only = call.cfg and unit.control_mode == "ControlNet is more important"
        if cond_only:  # the unconditional half runs without control, so CFG pushes towards it
            half = sample.shape[0] // 2
            sample, hidden = sample[half:], hidden[half:]
            added = {key: value[half:] for key, value in added.items()} if added else None
        dtype = self.model.dtype
        image = self._image(call.width, call.height, sample.shape[0]).to(device=sample.device, dtype=dtype)
        kind = model_kind(self.model)
        if kind == "t2i_adapter":
            if self.model.config.in_channels == 1:  # sketch adapters read one grey channel
                image = image.mean(dim=1, keepdim=True)
            residuals = [feature * unit.weight for feature in self.model(image)]
        else:
            extra: dict[str, Any] = {}
            if kind == "union":
                types = torch.zeros(sample.shape[0], self.model.config.num_control_type, dtype=dtype,
                                    device=sample.device)
                types[:, self.union_type] = 1
                extra = {"controlnet_cond": [image], "control_type": types, "control_type_idx": [self.union_type]}
            else:
                extra = {"controlnet_cond": image}
            down, mid = self.model(
                sample.to(dtype), call.timestep, encoder_hidden_states=hidden.to(dtype), **extra,
                conditioning_scale=unit.weight,
                added_cond_kwargs={k: v.to(dtype) for k, v in added.items()} if added else None, return_dict=False)
            residuals = [*down, mid]
        if unit.control_mode == "My prompt is more important":
            last = len(residuals) - 1
            residuals = [r * SOFT_INJECTION_BASE ** (last - i) for i, r in enumerate(residuals)]
        residuals = [r.to(call.sample.dtype) for r in residuals]
        if cond_only:
            residuals = [torch.cat([torch.zeros_like(r), r]) for r in residuals]
        if kind == "t2i_adapter":
            return UnetResiduals(intrablock=residuals)
        return UnetResiduals(residuals[:-1], residuals[-1])

    def _image(self, width: int, height: int, batch: int) -> torch.Tensor:
        key = (width, height, batch)
        if key not in self._images:
            fitted = fit_image(self.detected, width, height, self.unit.resize_mode)
            pixels = torch.from_numpy(np.asarray(fitted.convert("RGB"), dtype=np.float32) / 255.0)
            self._images[key] = pixels.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).contiguous()
        return self._images[key]


def model_kind(model: Any) -> str:
    """"controlnet", "union" (ControlNet Union / ProMax) or "t2i_adapter"."""
    name = type(model).__name__
    return {"ControlNetUnionModel": "union", "T2IAdapter": "t2i_adapter"}.get(name, "controlnet")


#: The union control type a preprocessor implies (by the start of its name), when the unit says "Unknown".
_UNION_TYPE_BY_MODULE = (("openpose", "OpenPose"), ("depth", "Depth"), ("softedge", "Soft Edge"),
                         ("scribble", "Soft Edge"), ("canny", "Hard Edge"), ("lineart", "Hard Edge"),
                         ("mlsd", "Hard Edge"), ("invert", "Hard Edge"), ("threshold", "Hard Edge"),
                         ("normal", "Normal Map"), ("seg", "Segmentation"), ("tile", "Tile"), ("inpaint", "Inpaint"))


def union_control_type(unit: ControlNetUnit, module: str, index: int) -> int:
    """The control type index a union model runs with: the unit's own, else the one its preprocessor implies."""
    name = unit.union_control_type
    if name == "Unknown":
        name = next((kind for prefix, kind in _UNION_TYPE_BY_MODULE if module.startswith(prefix)), "Unknown")
    if name == "Unknown":
        choices = ", ".join(UNION_CONTROL_TYPES[:-1])
        raise ValueError(f"ControlNet unit {index}: union_control_type: the model is a ControlNet Union and the "
                         f"preprocessor {module!r} implies no control type; choose one of {choices}")
    return UNION_CONTROL_TYPES.index(name)


def fit_image(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """``image`` brought to ``width`` x ``height`` by a unit's resize mode."""
    if image.size == (width, height):
        return image
    if resize_mode == "Just Resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if resize_mode == "Crop and Resize":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    inner = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)  # "Resize and Fill": pad with black
    canvas = Image.new("RGB", (width, height))
    canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return canvas


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: str) -> int:
    """The processor resolution at which the map needs no resampling once fitted to the output size."""
    raw_w, raw_h = image.size
    ratios = (height / raw_h, width / raw_w)
    scale = min(ratios) if resize_mode == "Resize and Fill" else max(ratios)
    return max(64, round(scale * min(raw_w, raw_h)))


def unit_infotext(parsed: ParsedUnit, resolution: int, union_type: str | None = None) -> str:
    """The value of the ``ControlNet N`` infotext key (with the union control type for a union model)."""
    unit = parsed.unit
    a, b = resolve_thresholds(parsed.preprocessor, unit.threshold_a, unit.threshold_b)
    return (f"Module: {parsed.preprocessor.name}, Model: {parsed.entry.title}, Weight: {unit.weight}, "
            f"Resize Mode: {unit.resize_mode}, Guidance Start: {unit.guidance_start:g}, "
            f"Guidance End: {unit.guidance_end:g}, Pixel Perfect: {unit.pixel_perfect}, "
            f"Control Mode: {unit.control_mode}, Processor Res: {resolution}, Threshold A: {a:g}, "
            f"Threshold B: {b:g}" + (f", Union Control Type: {union_type}" if union_type else ""))


class ControlNetScript(AlwaysOnScript[list[ParsedUnit]]):
    """ControlNet units as an always-on script (``alwayson_scripts["controlnet"]["args"] = [unit, ...]``).

    The arguments are :class:`ControlNetArgs`; ``job.args`` holds the enabled units with their preprocessor and
    model resolved."""

    name = "controlnet"
    title = "ControlNet"
    Args = ControlNetArgs

    def __init__(self, library: ControlNetLibrary):
        self.library = library

    def parse_args(self, args: Sequence[Any]) -> list[ParsedUnit] | None:
        """The enabled units, with preprocessor and model resolved; None when no unit is enabled."""
        parsed = []
        for index, unit in enumerate(validate_args(ControlNetArgs, args).root):
            if unit is None or not unit.enabled:
                continue
            preprocessor = lookup(unit.module)
            if preprocessor is None and unit.module.strip().lower() not in NEEDS_WEIGHTS:
                raise ValueError(f"unit {index}: module: unknown preprocessor {unit.module!r}; choose from "
                                 f"{', '.join(module_names())}")
            reason = unavailable_reason(unit.module, self.library.annotators)
            if preprocessor is None or reason is not None:
                raise ValueError(f"unit {index}: module: {unit.module!r} is unavailable: {reason}")
            if unit.model.strip().lower() in ("", "none"):
                raise ValueError(f"unit {index}: model: choose a ControlNet model; available: "
                                 f"{', '.join(self.library.titles()) or 'none installed'}")
            try:
                entry = self.library.find(unit.model)
            except LookupError as error:
                raise ValueError(f"unit {index}: model: {error}") from None
            ip_model = is_ip_adapter(entry.path)
            if ip_model != (preprocessor.clip_vision is not None):
                raise ValueError(f"unit {index}: module: " + (
                    f"the IP-Adapter model {entry.title} needs an IP-Adapter module: one of "
                    f"{', '.join(CLIP_MODULES)}" if ip_model else
                    f"{preprocessor.name!r} encodes an image prompt for an IP-Adapter model (ip-adapter_*); "
                    f"{entry.title} is not one"))
            parsed.append(ParsedUnit(index, unit, preprocessor, entry))
        if sum(is_ip_adapter(p.entry.path) for p in parsed) > 1:
            raise ValueError("units: one IP-Adapter unit per job")
        return parsed or None

    def before_job(self, job: Job[list[ParsedUnit]]) -> None:
        """Load each unit's model, detect its map, and add its UNet patch and infotext."""
        for parsed in job.args:
            if not job.model.spec.unet:  # Flux.1 / SD 3.5 sample with their own loops, which take no UNet patch
                raise ValueError(f"ControlNet unit {parsed.index}: ControlNet and IP-Adapter units work with SD 1.x, "
                                 f"SD 2.x and SDXL checkpoints here, not with {job.model.spec.label} models; turn "
                                 "the unit off or choose such a checkpoint")
            unit = parsed.unit
            image = unit.image or _init_image(job.request)
            if image is None:
                raise ValueError(f"ControlNet unit {parsed.index}: image: a control image is needed "
                                 "(img2img uses the init image when none is given)")
            with model_file_field(f"alwayson_scripts.controlnet.args.{parsed.index}.model"):
                model = self.library.load(parsed.entry)
            if isinstance(model, IPAdapterWeights):
                self._ip_adapter(job, parsed, model, image)
                continue
            _check_family(model, job.model, parsed)
            width, height = job.request.width, job.request.height
            resolution = unit.processor_res
            if unit.pixel_perfect:
                resolution = pixel_perfect_resolution(image, width, height, unit.resize_mode)
            elif resolution == -1:
                resolution = 512
            with model_file_field(f"alwayson_scripts.controlnet.args.{parsed.index}.module"):
                detected = detect(parsed.preprocessor, image, resolution, unit.threshold_a, unit.threshold_b,
                                  self.library.annotators)
            union_type = union_control_type(unit, parsed.preprocessor.name, parsed.index) \
                if model_kind(model) == "union" else 0
            job.add_unet_patch(UnitPatch(unit, model, detected, f"ControlNet unit {parsed.index}: model "
                                                                f"{parsed.entry.title}", union_type=union_type))
            job.infotext[f"ControlNet {parsed.index}"] = unit_infotext(
                parsed, resolution, UNION_CONTROL_TYPES[union_type] if model_kind(model) == "union" else None)
            if unit.save_detected_map and parsed.preprocessor.name != "none" and \
                    not job.options.control_net_no_detectmap:
                job.extra_images.append(fit_image(detected, width, height, unit.resize_mode))

    def _ip_adapter(self, job: Job[list[ParsedUnit]], parsed: ParsedUnit, weights: IPAdapterWeights,
                    image: Image.Image) -> None:
        """Encode the image prompt and put the adapter into the job's UNet (weight, start/end per step)."""
        unit, label = parsed.unit, f"ControlNet unit {parsed.index}: model {parsed.entry.title}"
        unet = job.model.unet
        if weights.cross_attention_dim != unet.config.cross_attention_dim:
            raise ValueError(f"{label} is an IP-Adapter for a UNet with {weights.cross_attention_dim}-wide text "
                             f"embeddings; the checkpoint is {job.model.family.name}")
        encoder_name = parsed.preprocessor.clip_vision
        assert encoder_name is not None
        encoder = self.library.annotators.clip_vision.load(encoder_name)
        positive, negative = encode(encoder, image_processor(encoder), image, weights.plus, job.device,
                                    unet.dtype)
        wanted = weights.embedding_width
        if wanted != positive.shape[-1]:
            raise ValueError(f"{label} takes image embeddings {wanted} wide; the encoder {encoder_name} of module "
                             f"{parsed.preprocessor.name!r} gives {positive.shape[-1]} (plain SD 1.5 and plus "
                             "adapters use ViT-H: ip-adapter_clip_sd15; SDXL ones ViT-bigG: ip-adapter_clip_sdxl)")
        processors = install(job, weights)
        job.add_unet_patch(IPAdapterPatch(unit.weight, unit.guidance_start, unit.guidance_end, unit.hr_option,
                                          processors, positive, negative))
        job.infotext[f"ControlNet {parsed.index}"] = unit_infotext(parsed, -1)


def _init_image(request: GenerationRequest) -> Image.Image | None:
    images = getattr(request, "init_images", None)
    return images[0] if images else None


def _check_family(controlnet: Any, loaded: LoadedModel, parsed: ParsedUnit) -> None:
    """A ControlNet works only with the UNet family it was trained for; say so instead of a shape error."""
    kind = _family_mismatch(controlnet, loaded.unet.config.cross_attention_dim, bool(loaded.is_sdxl))
    if kind is None and model_kind(controlnet) == "t2i_adapter":
        channels = list(controlnet.config.channels)
        if channels != list(loaded.unet.config.block_out_channels)[:len(channels)]:
            kind = f"a UNet with channels {channels}"
    if kind:
        raise ValueError(f"ControlNet unit {parsed.index}: model {parsed.entry.title} is for {kind}; "
                         f"the checkpoint is {loaded.family.name}")


def _family_mismatch(controlnet: Any, cross_attention_dim: int, is_sdxl: bool) -> str | None:
    """The kind of model ``controlnet`` is for, when a UNet with these traits is not one; else None."""
    if model_kind(controlnet) == "t2i_adapter":
        sdxl = controlnet.config.adapter_type == "full_adapter_xl"
        return None if sdxl == is_sdxl else "SDXL" if sdxl else "SD 1.x/2.x"
    wanted = controlnet.config.cross_attention_dim
    sdxl = controlnet.config.addition_embed_type == "text_time"
    if wanted == cross_attention_dim and sdxl == is_sdxl:
        return None
    return "SDXL" if sdxl else f"an SD model with {wanted}-wide text embeddings"
