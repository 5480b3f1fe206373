"""Request and response bodies of the A1111-compatible API (docs/compatibility.md §8).

The generation bodies are built from the engine's request declarations (:mod:`pipelines.request`):
every field the two share reuses the engine's ``FieldInfo``, so type, bounds and description are
declared once. On top come what only the API has: A1111's defaults (50 steps, no saving), base64
images instead of PIL ones, ``override_settings``, hires/script fields, and the legacy fields that
clients still send. Unknown fields are ignored and ``null`` stands for "the default" everywhere, as
A1111 clients expect.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from pipelines.request import GenerationRequest, Img2ImgRequest

#: Engine fields the A1111 API sets through ``override_settings`` (or the options) instead of the body.
#: Engine fields the API body does not carry as such (alwayson_scripts has A1111's {"name": {"args": [...]}} shape).
NOT_IN_BODY = frozenset({"checkpoint", "vae", "clip_skip", "init_images", "mask", "alwayson_scripts", "script_name",
                         "script_args"})
#: API defaults that differ from the engine's, as A1111 has them.
API_DEFAULTS: dict[str, Any] = {"steps": 50, "save_images": False, "sampler_name": None}

_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


def _optional(name: str, info: FieldInfo) -> tuple[Any, FieldInfo]:
    """The engine field as an API field: the same bounds and description, ``null`` accepted."""
    field = copy.copy(info)
    if name in API_DEFAULTS:
        field.default = API_DEFAULTS[name]
    if field.default_factory is not None:
        field.default = field.default_factory()
        field.default_factory = None
    return info.annotation | None, field


def _shared_fields(engine_model: type[BaseModel], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {name: _optional(name, info) for name, info in engine_model.model_fields.items()
            if name not in NOT_IN_BODY and name not in skip}


def _field(default: Any, description: str, **bounds: Any) -> Any:
    return Field(default, description=description, **bounds)


#: Fields of both generation bodies that the engine request does not have.
COMMON_API_FIELDS: dict[str, tuple[Any, Any]] = {
    "sampler_index": (str | None, _field(None, "Legacy name of sampler_name; used when sampler_name is empty.")),
    "override_settings": (dict[str, Any] | None, _field(
        None, "Options for this request only: sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers, "
              "or any key of /sdapi/v1/options.")),
    "override_settings_restore_afterwards": (bool | None, _field(
        True, "false: the override_settings stay set after the request (saved in the options, as A1111 does).")),
    "send_images": (bool | None, _field(True, "Return the images in the answer.")),
    "script_name": (str | None, _field(None, "Title of a script to run (see /sdapi/v1/scripts), e.g. 'x/y/z plot'.")),
    "script_args": (list[Any] | None, _field(None, "Arguments of script_name.")),
    "alwayson_scripts": (dict[str, Any] | None, _field(
        None, "Always-on scripts and their args, e.g. {\"controlnet\": {\"args\": [...]}}.")),
    "do_not_save_samples": (bool | None, _field(False, "Legacy: true means save_images false.")),
    "do_not_save_grid": (bool | None, _field(False, "Legacy: do not save the grid of a batch.")),
    "eta": (float | None, _field(None, "Legacy sampler parameter; accepted and not used.")),
    "s_churn": (float | None, _field(None, "Legacy sampler parameter; accepted and not used.")),
    "s_tmax": (float | None, _field(None, "Legacy sampler parameter; accepted and not used.")),
    "s_tmin": (float | None, _field(None, "Legacy sampler parameter; accepted and not used.")),
    "s_noise": (float | None, _field(None, "Legacy sampler parameter; accepted and not used.")),
    "s_min_uncond": (float | None, _field(None, "Legacy sampler parameter; accepted and not used.")),
    "comments": (dict[str, Any] | None, _field(None, "Free-form comments; accepted and not used.")),
    "disable_extra_networks": (bool | None, _field(False, "Accepted for compatibility.")),
    "firstpass_image": (str | None, _field(None, "Accepted for compatibility; not used.")),
    "infotext": (str | None, _field(None, "A pasted infotext: the fields this request does not set are filled "
                                          "from it (as the UI's paste), fields set in the request win.")),
    "force_task_id": (str | None, _field(None, "The job's id_task, as /sdapi/v1/progress (current_task) and "
                                        "POST /internal/progress report it.")),
}

TXT2IMG_API_FIELDS: dict[str, tuple[Any, Any]] = {
    "denoising_strength": (float | None, _field(None, "Hires fix second pass strength.", ge=0.0, le=1.0)),
    "enable_hr": (bool | None, _field(False, "Hires fix.")),
    "hr_scale": (float | None, _field(2.0, "Hires fix: upscale by.")),
    "hr_upscaler": (str | None, _field(None, "Hires fix: upscaler.")),
    "hr_second_pass_steps": (int | None, _field(0, "Hires fix: steps of the second pass (0: same).")),
    "hr_resize_x": (int | None, _field(0, "Hires fix: resize width to.")),
    "hr_resize_y": (int | None, _field(0, "Hires fix: resize height to.")),
    "hr_checkpoint_name": (str | None, _field(None, "Hires fix: checkpoint of the second pass.")),
    "hr_sampler_name": (str | None, _field(None, "Hires fix: sampler of the second pass.")),
    "hr_scheduler": (str | None, _field(None, "Hires fix: schedule type of the second pass.")),
    "hr_prompt": (str | None, _field("", "Hires fix: prompt of the second pass.")),
    "hr_negative_prompt": (str | None, _field("", "Hires fix: negative prompt of the second pass.")),
    "firstphase_width": (int | None, _field(0, "Legacy hires fix field; accepted and not used.")),
    "firstphase_height": (int | None, _field(0, "Legacy hires fix field; accepted and not used.")),
}

IMG2IMG_API_FIELDS: dict[str, tuple[Any, Any]] = {
    "init_images": (list[str], Field(..., min_length=1, description="The image(s) to start from: base64 PNG, "
                                     "JPEG or WebP, with or without a data: prefix.")),
    "mask": (str | None, _field(None, "Inpaint mask as base64: white is redrawn, black is kept.")),
    "initial_noise_multiplier": (float | None, _field(None, "Accepted for compatibility; not used.")),
    "image_cfg_scale": (float | None, _field(None, "Accepted for compatibility (instruct-pix2pix); not used.")),
    "include_init_images": (bool | None, _field(False, "Echo init_images and mask in 'parameters'.")),
}

StableDiffusionTxt2ImgProcessingAPI = create_model(
    "StableDiffusionTxt2ImgProcessingAPI", __config__=_CONFIG,
    __doc__="txt2img body: the engine's GenerationRequest fields plus A1111's API-only and legacy fields.",
    **_shared_fields(GenerationRequest), **COMMON_API_FIELDS,
    # Fields the engine request has gained (hires fix) come from it; the rest stay API-only.
    **{name: spec for name, spec in TXT2IMG_API_FIELDS.items() if name not in GenerationRequest.model_fields},
)

StableDiffusionImg2ImgProcessingAPI = create_model(
    "StableDiffusionImg2ImgProcessingAPI", __config__=_CONFIG,
    __doc__="img2img/inpaint body: the engine's Img2ImgRequest fields plus A1111's API-only and legacy fields.",
    **_shared_fields(Img2ImgRequest), **COMMON_API_FIELDS, **IMG2IMG_API_FIELDS,
)

GenerationBody = BaseModel  # either of the two models above


class GenerationResponse(BaseModel):
    """What txt2img and img2img answer."""

    images: list[str] = Field(description="Raw base64 PNGs (no data: prefix) with the infotext embedded.")
    parameters: dict[str, Any] = Field(description="The request as understood, with defaults filled in.")
    info: str = Field(description="JSON string: seeds, prompts, infotexts and more of the job.")


class PNGInfoRequest(BaseModel):
    """Body of png-info."""

    model_config = ConfigDict(extra="ignore")
    image: str = Field(description="Base64 image (PNG, JPEG or WebP), with or without a data: prefix.")


class PNGInfoResponse(BaseModel):
    """The infotext an image carries, its other text fields, and the infotext parsed."""

    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    """The running job, whoever sent it (UI or API)."""

    progress: float = Field(description="0..1 of the whole job.")
    eta_relative: float = Field(description="Estimated seconds left.")
    state: ProgressState
    current_image: str | None = Field(description="Live preview as raw base64 PNG, or null.")
    textinfo: str | None = None
    current_task: str | None = Field(None, description="id_task of the running job (force_task_id, if sent).")


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str
    sha256: str
    filename: str
    config: str | None = None
    #: Ours, only with ``?with_family=true``: the model family ("sd1", "sd2", "sdxl", "sd3", "flux"), read from the
    #: file's header; None when that does not tell.
    family: str | None = None


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4


class LatentUpscalerModeItem(BaseModel):
    name: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class ExtrasBaseRequest(BaseModel):
    """Upscaling settings shared by extra-single-image and extra-batch-images (A1111's names)."""

    model_config = _CONFIG
    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to upscaling_resize_w/h.")
    show_extras_results: bool = Field(True, description="Return the images in the answer.")
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="Blend in GFPGAN's restored faces (0: off); needs "
                                     "models/GFPGAN/GFPGANv1.4.pth and detection_Resnet50_Final.pth.")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="Blend in CodeFormer's restored faces (0: off); "
                                         "needs models/Codeformer/codeformer-v0.1.0.pth and "
                                         "models/GFPGAN/detection_Resnet50_Final.pth.")
    codeformer_weight: float = Field(0, ge=0, le=1, description="CodeFormer weight: 0 = maximum effect, "
                                                                "1 = minimum effect.")
    upscaling_resize: float = Field(2, gt=0, le=8, description="Scale factor when resize_mode is 0.")
    upscaling_resize_w: int = Field(512, ge=1, le=8192, description="Target width when resize_mode is 1.")
    upscaling_resize_h: int = Field(512, ge=1, le=8192, description="Target height when resize_mode is 1.")
    upscaling_crop: bool = Field(True, description="With resize_mode 1: cover the size and centre-crop.")
    upscaler_1: str = Field("None", description="Name from /sdapi/v1/upscalers.")
    upscaler_2: str = Field("None", description="Name from /sdapi/v1/upscalers, blended in by its visibility.")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, description="Weight of upscaler_2's result.")
    upscale_first: bool = Field(False, description="Accepted for compatibility: as in A1111 1.x, images are "
                                                  "always upscaled first, then GFPGAN, then CodeFormer.")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field(description="Base64 image, with or without a data: prefix.")


class FileData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: str = Field(description="Base64 image, with or without a data: prefix.")
    name: str = Field("", description="File name (informational).")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(min_length=1, description="The images to process.")  # noqa: N815
    input_dir: str | None = Field(None, description="Not supported (as in A1111): the API reads no folder on "
                                                    "the server; send the images in imageList. Refused when set.")
    output_dir: str | None = Field(None, description="Not supported (as in A1111): the API writes no file; the "
                                                     "images come back in the answer. Refused when set.")


class ExtrasSingleImageResponse(BaseModel):
    image: str | None = Field(description="Raw base64 PNG with the infotext embedded; null without "
                                           "show_extras_results.")
    html_info: str


class ExtrasBatchImagesResponse(BaseModel):
    images: list[str]
    html_info: str
