"""The typed, validated request of one generation job.

Every parameter is declared once here, with its type, default, bounds and a one-line description;
the HTTP API's schema and the UI controls' ranges are derived from these declarations. Bad input
fails here, before any model work, with a message that names the field and the allowed values.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.prompts.parser import check_nesting
from pipelines.sampling.samplers import SAMPLERS, SCHEDULE_NAMES, find_sampler, schedule_label

MAX_SEED = 4294967294
MIN_SIZE, MAX_SIZE = 64, 4096
MAX_PROMPT_CHARS = 20_000

#: A1111's latent upscale modes for hires fix: torch interpolate mode and antialiasing.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

#: The hires checkpoint, sampler and schedule type that mean "as in the first pass" (A1111's UI choices).
SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER = "Use same checkpoint", "Use same sampler", "Use same scheduler"
SAME_AS_FIRST_PASS = ("", SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER)

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def _size_field(description: str) -> Any:
    return Field(512, ge=MIN_SIZE, le=MAX_SIZE, description=description)


class GenerationRequest(BaseModel):
    """A txt2img job. Field names are those of the A1111 API so that infotexts and API bodies map 1:1."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What the image should show.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What the image should not show.")
    styles: list[str] = Field(default_factory=list, description="Names of styles from styles.csv to apply.")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="Noise seed; -1 picks a random one. Image k gets seed + k.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed; -1 picks a random one.")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="How far to move towards the variation seed.")
    seed_resize_from_w: int = Field(-1, ge=-1, le=MAX_SIZE, description="Make noise as for this width (-1: off).")
    seed_resize_from_h: int = Field(-1, ge=-1, le=MAX_SIZE, description="Make noise as for this height (-1: off).")
    sampler_name: str = Field("DPM++ 2M", description="Sampling method: " + ", ".join(SAMPLERS) + ".")
    scheduler: str = Field("Automatic", description="Schedule type: " + ", ".join(SCHEDULE_NAMES)
                           + " (or A1111's names: karras, sgm_uniform, ...); an unknown one runs the sampler's "
                           "default, with a warning.")
    steps: int = Field(20, ge=1, le=150, description="Sampling steps.")
    cfg_scale: float = Field(7.0, ge=1.0, le=30.0, description="How strongly the image follows the prompt.")
    distilled_cfg_scale: float = Field(
        3.5, ge=0.0, le=30.0, description="Flux.1 dev: the guidance its transformer was distilled with (Forge's "
        "Distilled CFG Scale); real CFG runs only when cfg_scale is above 1. Other families ignore it.")
    shift: float | None = Field(
        None, ge=0.0, le=100.0, description="Flux.1 and SD 3.5: the flow-matching timestep shift (infotext Shift); "
        "None or 0: the model's own (SD 3.5: 3, Flux.1 dev: by image size, schnell: 1). Other families ignore it.")
    width: int = _size_field("Image width in pixels, a multiple of 8.")
    height: int = _size_field("Image height in pixels, a multiple of 8.")
    batch_size: int = Field(1, ge=1, le=64, description="Images per forward pass.")
    n_iter: int = Field(1, ge=1, le=100, description="Batch count: how many batches run one after another.")
    clip_skip: int = Field(1, ge=1, le=12, description="Use the text encoder's N-th layer from the end.")
    tiling: bool = Field(False, description="Make the image tile seamlessly.")
    restore_faces: bool | None = Field(
        None, description="Restore faces after decoding, with the face_restoration_model option's model; "
        "None: the face_restoration option decides.")
    checkpoint: str | None = Field(None, description="Checkpoint title, file name, name or hash; None: current.")
    denoising_strength: float = Field(0.7, ge=0.0, le=1.0, description="How much the hires pass (or img2img) redraws.")
    enable_hr: bool = Field(False, description="Hires. fix: upscale the first pass, then redraw it at the larger size.")
    hr_scale: float = Field(2.0, ge=1.0, le=8.0, description="Hires. fix: upscale by this factor.")
    hr_upscaler: str = Field("Latent", description="Hires. fix upscaler: a latent mode ("
                             + ", ".join(LATENT_UPSCALE_MODES)
                             + ") or an image upscaler (Lanczos, Nearest, a model in models/ESRGAN).")
    hr_second_pass_steps: int = Field(0, ge=0, le=150, description="Hires. fix steps; 0: as many as the first pass.")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIZE, description="Hires. fix: resize width to this instead (0: off).")
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIZE, description="Hires. fix: resize height to this instead (0: off).")
    hr_checkpoint_name: str | None = Field(
        None, description="Hires. fix checkpoint (title, file name, name or hash); None: the first pass's.")
    hr_sampler_name: str | None = Field(None, description="Hires. fix sampler; None: the same as the first pass.")
    hr_scheduler: str | None = Field(None, description="Hires. fix schedule type; None: the same as the first pass.")
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Hires. fix prompt; empty: the same prompt.")
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                    description="Hires. fix negative prompt; empty: the same negative prompt.")
    vae: str = Field("Automatic", description="'Automatic' (the checkpoint's own VAE) or a file in models/VAE.")
    refiner_checkpoint: str | None = Field(
        None, description="Refiner: a checkpoint (title, file name, name or hash; typically an SDXL refiner) that "
        "takes over the denoising at refiner_switch_at; None or 'None': no refiner.")
    refiner_switch_at: float = Field(
        0.8, ge=0.01, le=1.0, description="Refiner: the fraction of the sampling (by timestep, as A1111) at which "
        "the refiner takes over; 1 = never.")
    additional_modules: list[str] = Field(
        default_factory=list, description="Forge's VAE / Text Encoder: files in models/text_encoder or models/VAE "
        "that complete a checkpoint stored without them (a Flux.1 transformer file: clip_l, t5xxl, ae).")
    save_images: bool = Field(True, description="Save the images to the outputs folder.")
    script_name: str | None = Field(None, description="A script from the Script dropdown to run (e.g. 'X/Y/Z plot').")
    script_args: list[Any] = Field(default_factory=list, description="The arguments of script_name.")
    alwayson_scripts: dict[str, list[Any]] = Field(
        default_factory=dict, description="Always-on scripts (extensions) to run, by name, with their arguments.")

    @field_validator("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
    @classmethod
    def _not_too_deep(cls, value: str, info) -> str:
        return check_nesting(value, info.field_name)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int, info) -> int:
        if value % 8:
            raise ValueError(
                f"{info.field_name} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, got {value}"
            )
        return value

    @field_validator("cfg_scale", "subseed_strength")
    @classmethod
    def _finite(cls, value: float, info) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{info.field_name} must be a finite number")
        return value

    @field_validator("shift")
    @classmethod
    def _own_shift(cls, value: float | None) -> float | None:
        # 0 (the UI slider's left end) is the model's own shift, as None.
        return value or None

    @field_validator("refiner_checkpoint", mode="before")
    @classmethod
    def _no_refiner(cls, value: Any) -> Any:
        # The UI's "None" choice, A1111's "None"/"none" and an empty value all mean no refiner.
        if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none")):
            return None
        return value

    @field_validator("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", mode="before")
    @classmethod
    def _same_as_first_pass(cls, value: Any) -> Any:
        # The UI's and A1111's "Use same ..." choices and an empty value all mean the first pass's setting.
        if value is None or (isinstance(value, str) and value.strip() in SAME_AS_FIRST_PASS):
            return None
        return value

    @field_validator("scheduler", "hr_scheduler")
    @classmethod
    def _schedule_label(cls, value: str | None) -> str | None:
        # A1111 names (``sgm_uniform``), labels and aliases in any case become our labels; an unknown name stays,
        # to run the sampler's default with a warning (see samplers.fitting_schedule).
        return None if value is None else schedule_label(value)

    @field_validator("sampler_name")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        return find_sampler(value).name

    @model_validator(mode="after")
    def _schedule_fits_sampler(self) -> GenerationRequest:
        # A schedule the sampler cannot run, or an unknown one, is not an error: the job runs the sampler's
        # default and says so (see samplers.fitting_schedule), as A1111 does. An unknown sampler is.
        if self.hr_sampler_name is not None:
            try:
                find_sampler(self.hr_sampler_name)
            except ValueError as error:
                raise ValueError(f"hr_{error}") from None
        if self.enable_hr:
            width, height = self.hires_size
            field = "hr_resize_x" if self.hr_resize_x or self.hr_resize_y else "hr_scale"
            if max(width, height) > MAX_SIZE:
                raise ValueError(f"{field}: the hires fix target size {width}x{height} is larger than {MAX_SIZE}; "
                                 "lower hr_scale or hr_resize_x/hr_resize_y")
            # The process-wide pixel limit of decoded images (Pillow's, set from --max-image-pixels).
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise ValueError(f"{field}: the hires fix output would be {width}x{height} = {width * height} "
                                 f"pixels, more than the limit of {limit}")
        return self

    @property
    def hires_size(self) -> tuple[int, int]:
        """Hires fix target (width, height): by hr_scale, or hr_resize_x/y (one given keeps the aspect
        ratio; both given: the first pass covers that size and is centre-cropped). Rounded down to 8."""
        if self.hr_resize_x or self.hr_resize_y:
            width = self.hr_resize_x or round(self.width * self.hr_resize_y / self.height)
            height = self.hr_resize_y or round(self.height * self.hr_resize_x / self.width)
        else:
            width, height = round(self.width * self.hr_scale), round(self.height * self.hr_scale)
        return width - width % 8, height - height % 8

    @property
    def mode(self) -> str:
        return "txt2img"

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


class Img2ImgRequest(GenerationRequest):
    """An img2img or inpaint job: a txt2img request plus an init image and, for inpainting, a mask."""

    init_images: Annotated[list[Image.Image], Field(min_length=1, description="The image(s) to start from.")]
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, description="How much of the image is redrawn.")
    enable_hr: Literal[False] = Field(False, description="Hires. fix is for txt2img only.")
    resize_mode: Literal[0, 1, 2, 3] = Field(
        0, description="; ".join(f"{k}: {v}" for k, v in RESIZE_MODES.items()) + "."
    )
    mask: Image.Image | None = Field(None, description="Inpaint mask: white is redrawn, black is kept.")
    mask_blur: int = Field(4, ge=0, le=64, description="Blur of the mask edge in pixels.")
    inpainting_mask_invert: bool = Field(False, description="Redraw the black part of the mask instead.")
    inpainting_fill: Literal[0, 1, 2, 3] = Field(
        1, description="Masked content: " + "; ".join(f"{k}: {v}" for k, v in INPAINTING_FILL.items()) + "."
    )
    inpaint_full_res: bool = Field(False, description="Inpaint area 'Only masked': redraw a crop at full size.")
    inpaint_full_res_padding: int = Field(32, ge=0, le=256, description="Padding around the mask, in pixels.")

    @field_validator("init_images", mode="before")
    @classmethod
    def _images_are_images(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, Image.Image):
                raise ValueError(f"init_images[{i}] is not an image (got {type(item).__name__})")
        return items

    @field_validator("mask", mode="before")
    @classmethod
    def _mask_is_image(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, Image.Image):
            raise ValueError(f"mask is not an image (got {type(value).__name__})")
        return value

    @property
    def mode(self) -> str:
        return "img2img"
