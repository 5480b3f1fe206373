"""User options that change how jobs are saved and shown (the Settings tab, `/sdapi/v1/options`).

An :class:`Options` value is passed to each job; an override for one request is a copy with changed
fields, never a write to a shared object.

Options bound to the engine's folders (:meth:`Options.bound_to`, done by the engine) check every ``outdir_*``
value against them (:func:`pipelines.paths.confine`) and keep the operator-only options unchanged, in every
copy made with :meth:`Options.with_overrides`: the Settings tab, ``/sdapi/v1/options`` and
``override_settings`` all change options that way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from pipelines.files import write_atomically
from pipelines.images.saving import dated_output_dir
from pipelines.paths import AllowedRoots, confine, confine_writable

#: The options naming a folder images are saved in (all are checked by :func:`pipelines.paths.confine`).
OUTDIR_OPTIONS = ("outdir_samples", "outdir_grids", "outdir_txt2img_samples", "outdir_img2img_samples",
                  "outdir_txt2img_grids", "outdir_img2img_grids", "outdir_extras_samples")
#: Options only the operator sets (config.json on disk, or a command-line flag): a change through
#: :meth:`Options.with_overrides` (the UI, the API) is refused, since the server would fetch that URL.
OPERATOR_OPTIONS = ("default_model_url",)


class Options(BaseModel):
    """Options persisted in ``config.json`` in the data dir."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    samples_save: bool = Field(True, description="Save every generated image.")
    samples_format: Literal["png", "jpg", "webp"] = Field("png", description="File format of saved images.")
    grid_save: bool = Field(True, description="Save a grid of each batch of several images.")
    grid_format: Literal["png", "jpg", "webp"] = Field("png", description="File format of saved grids.")
    outdir_txt2img_samples: str = Field("", description="Folder for txt2img images (empty: outputs/txt2img-images).")
    outdir_img2img_samples: str = Field("", description="Folder for img2img images (empty: outputs/img2img-images).")
    outdir_txt2img_grids: str = Field("", description="Folder for txt2img grids (empty: outputs/txt2img-grids).")
    outdir_img2img_grids: str = Field("", description="Folder for img2img grids (empty: outputs/img2img-grids).")
    outdir_extras_samples: str = Field("", description="Folder for Extras images (empty: outputs/extras-images).")
    upscaler_tile: int = Field(
        192, ge=0, le=2048,
        description="Tile size in pixels for image upscalers (ESRGAN, Real-ESRGAN...): smaller tiles use less "
        "memory, larger ones are a little faster. 0 = the whole image at once (needs the most memory).",
    )
    upscaler_tile_overlap: int = Field(
        32, ge=0, le=256, description="Overlap of upscaler tiles in pixels, blended so no seams show.",
    )
    default_model_url: str = Field(
        "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
        "v1-5-pruned-emaonly.safetensors",
        description="Checkpoint the Download button fetches when models/Stable-diffusion is empty (SD 1.5, "
        "as A1111 offers). Set only by the server's operator: --default-model-url or config.json.",
    )
    show_progress_every_n_steps: int = Field(
        5, ge=0, le=100, description="Live preview every N sampling steps (0: no preview)."
    )
    show_progress_type: Literal["Approx cheap", "TAESD"] = Field(
        "Approx cheap",
        description="Live preview method. Approx cheap: free, blurry colours at 1/8 size. TAESD: a sharp "
        "full-size preview from the tiny VAE in models/VAE-taesd (a 2.4 M-weight model kept on the GPU; "
        "Approx cheap when no TAESD file is there). Neither changes the final image.",
    )
    unet_compile: bool = Field(
        False,
        description="Compile the UNet with torch.compile (NVIDIA GPU): faster sampling, same image within "
        "fp16 noise, but the first image at each new size and batch waits about a minute while it compiles.",
    )
    fp8_storage: Literal["Disable", "Enable for SDXL", "Enable"] = Field(
        "Disable",
        description="FP8 weight: keep the denoiser's (UNet / transformer) weights in float8 e4m3fn and cast each "
        "layer to the compute dtype as it runs. Halves the denoiser's memory against fp16 / bf16 (Flux.1 dev: "
        "about 12 GB instead of 24), at a small change of the image. Enable for SDXL: only for SDXL models. "
        "Changing it reloads the model. Written to the infotext as \"FP8 weight\".",
    )
    step_cache_interval: int = Field(
        0, ge=0, le=5,
        description="Step caching (DeepCache-style): 0 = off. 2-5: run the whole UNet only every N steps and "
        "reuse its deep features in between (first and last step always full). Sampling gets faster (measured "
        "on SD 1.5 at 20 steps: 1.5x at 2, 1.8x at 3), but the image changes: the composition stays, fine "
        "detail and texture may differ, more so at larger N. Compare with it off. Written to the infotext as "
        "\"Step cache: N\" (not restored by pasting). Not applied to a torch.compile'd UNet.",
    )
    sd_checkpoint_cache: int = Field(1, ge=1, le=10, description="How many checkpoints to keep loaded.")
    default_sampler: str = Field("DPM++ 2M", description="Sampling method selected when the UI opens.")
    # The top bar's choices, kept here (A1111's keys) so that they survive a restart. A job never reads
    # them: the UI and the API copy them into each request's checkpoint, vae and clip_skip fields.
    sd_model_checkpoint: str = Field(
        "", description="Checkpoint loaded at start (title); empty: --ckpt, else the first one found."
    )
    sd_vae: str = Field("Automatic", description="SD VAE used by jobs that name none (Automatic: the model's own).")
    CLIP_stop_at_last_layers: int = Field(
        1, ge=1, le=12, description="Clip skip used by jobs that name none."
    )
    # A1111's saving options, under its names, types and defaults (docs/compatibility.md §3).
    outdir_samples: str = Field("", description="Folder for all images; when set it replaces the three folders "
                                                "of txt2img, img2img and Extras images (as A1111's).")
    outdir_grids: str = Field("", description="Folder for all grids; when set it replaces the txt2img and "
                                              "img2img grid folders (as A1111's).")
    samples_filename_pattern: str = Field(
        "", description="File name pattern of saved images after the NNNNN- counter, with A1111's tags "
        "[seed], [prompt], [prompt_spaces], [prompt_words], [prompt_no_styles], [negative_prompt], [steps], [cfg], "
        "[sampler], [scheduler], [width], [height], [model_name], [model_hash], [date], [datetime], "
        "[job_timestamp], [clip_skip], [batch_number], [generation_number]; empty: [seed].")
    jpeg_quality: int = Field(80, ge=1, le=100, description="Quality of saved JPEG and WebP images (1-100).")
    webp_lossless: bool = Field(False, description="Save WebP images lossless.")
    enable_pnginfo: bool = Field(True, description="Write the infotext into saved images (PNG text chunk, "
                                                   "JPEG/WebP EXIF UserComment) and into API images.")
    eta_noise_seed_delta: int = Field(
        0, ge=0, le=4294967295,
        description="Eta noise seed delta (ENSD): added to each image's seed for the noise ancestral and "
        "SDE samplers draw at every step; 0 = off. Written to the infotext as \"ENSD\".")
    return_grid: bool = Field(True, description="API: put the grid of a batch (when one was made) first "
                                                "in the answer's images.")
    save_images_before_highres_fix: bool = Field(
        False, description="Also save each image of the first pass, before the Hires. fix redraws it "
        "(file name suffix -before-highres-fix).")
    save_incomplete_images: bool = Field(
        False, description="Also save the images of a batch stopped by Interrupt or Skip (they are always "
        "returned and shown).")
    # A1111's face restoration options (its "Face restoration" section, keys and defaults).
    face_restoration: bool = Field(
        False, description="Restore faces: after decoding, restore every face found in each image with the face "
        "restoration model (a request's restore_faces wins); written to the infotext as \"Face restoration\".")
    face_restoration_model: Literal["CodeFormer", "GFPGAN"] = Field(
        "CodeFormer", description="Face restoration model: CodeFormer (models/Codeformer/codeformer-v0.1.0.pth) or "
        "GFPGAN (models/GFPGAN/GFPGANv1.4.pth); both need the face detector "
        "models/GFPGAN/detection_Resnet50_Final.pth.")
    code_former_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="CodeFormer weight: 0 = maximum effect, 1 = minimum effect.")
    face_restoration_unload: bool = Field(
        False, description="Move the face restoration models from VRAM into RAM after processing.")
    save_images_before_face_restoration: bool = Field(
        False, description="Also save each image before its faces are restored (file name suffix "
        "-before-face-restoration).")
    # sd-webui-controlnet's option (its key): the detected maps are not added after the images.
    control_net_no_detectmap: bool = Field(
        False, description="ControlNet: do not append the detected maps to the output (gallery and API images).")
    # The refiner's options, under A1111's names and defaults.
    hires_fix_refiner_pass: Literal["first pass", "second pass", "both passes"] = Field(
        "second pass", description="Hires. fix with a refiner: the pass(es) the refiner takes over. Written to the "
        "infotext as \"Hires refiner\" unless \"second pass\".")
    sdxl_refiner_low_aesthetic_score: float = Field(
        2.5, ge=0.0, le=10.0, description="SDXL refiner: the aesthetic score the negative prompt is conditioned on.")
    sdxl_refiner_high_aesthetic_score: float = Field(
        6.0, ge=0.0, le=10.0, description="SDXL refiner: the aesthetic score the prompt is conditioned on.")
    # The Extensions tab's choice (A1111's key), read when the server starts.
    disabled_extensions: list[str] = Field(
        default_factory=list, description="Extensions not loaded at the next start (the Extensions tab)."
    )

    #: The folders ``outdir_*`` values must lie in; None for options not bound to an engine (see bound_to).
    _roots: AllowedRoots | None = PrivateAttr(default=None)

    @field_validator(*OUTDIR_OPTIONS)
    @classmethod
    def _outdir_inside_roots(cls, value: str, info: ValidationInfo) -> str:
        roots = (info.context or {}).get("roots")
        if roots is not None and value.strip():
            confine_writable(value, roots, field=str(info.field_name))
        return value

    @field_validator(*OPERATOR_OPTIONS)
    @classmethod
    def _operator_only(cls, value: str, info: ValidationInfo) -> str:
        fixed = (info.context or {}).get("operator_values", {})
        name = str(info.field_name)
        if name in fixed and value != fixed[name]:
            raise ValueError(f"{name} is set only by the server's operator (a command-line flag or config.json "
                             "on the server), not over the API or the UI")
        return value

    @model_validator(mode="after")
    def _overlap_fits_tile(self) -> Options:
        if self.upscaler_tile and self.upscaler_tile_overlap * 2 > self.upscaler_tile:
            raise ValueError(f"upscaler_tile_overlap: at most half the tile size ({self.upscaler_tile // 2}), "
                             f"got {self.upscaler_tile_overlap}")
        if self.upscaler_tile and self.upscaler_tile < 16:
            raise ValueError(f"upscaler_tile: 0 (whole image) or at least 16, got {self.upscaler_tile}")
        return self

    @field_validator("step_cache_interval")
    @classmethod
    def _step_cache_interval(cls, value: int) -> int:
        if value == 1:
            raise ValueError("1 would run the whole UNet at every step anyway: use 0 for off, or 2 to 5")
        return value

    @property
    def roots(self) -> AllowedRoots | None:
        """The folders these options are bound to (:meth:`bound_to`), or None."""
        return self._roots

    def bound_to(self, roots: AllowedRoots) -> Options:
        """A copy whose ``outdir_*`` values are checked to lie inside ``roots``, now and in every copy made by
        :meth:`with_overrides`; ValidationError naming the option when one lies outside or is not writable."""
        if self._roots == roots:
            return self
        bound = type(self).model_validate(self.model_dump(), context={"roots": roots})
        bound._roots = roots
        return bound

    def output_dir(self, outputs_dir: Path, mode: str, *, grids: bool = False) -> Path:
        """Where images (or grids) of ``mode`` (txt2img, img2img, extras) are saved: the ``outdir_*`` option
        when set (confined to the bound roots; options not bound to an engine use the parent of
        ``outputs_dir``, the data dir), else ``outputs_dir/<mode>-images/YYYY-MM-DD`` (``<mode>-grids``);
        not created here. ValueError naming the option for a folder outside the roots."""
        key = f"outdir_{mode}_{'grids' if grids else 'samples'}"
        common = "outdir_grids" if grids and mode != "extras" else "outdir_samples" if not grids else ""
        if common and str(getattr(self, common)).strip():
            key = common  # A1111's one folder for every mode replaces the per-mode ones
        custom = str(getattr(self, key, "")).strip()
        if not custom:
            return dated_output_dir(outputs_dir, mode, grids=grids)
        return confine(custom, self._roots or AllowedRoots(Path(outputs_dir).parent), field=key)

    def with_overrides(self, overrides: dict) -> Options:
        """A copy with ``overrides`` applied and validated; unknown keys raise KeyError naming them.

        Bound options stay bound: each ``outdir_*`` value is checked against their roots, and an operator
        option (:data:`OPERATOR_OPTIONS`) that changes is refused (ValidationError naming it)."""
        unknown = set(overrides) - set(type(self).model_fields)
        if unknown:
            raise KeyError(f"unknown option(s): {', '.join(sorted(unknown))}")
        context: dict[str, Any] = {"operator_values": {name: getattr(self, name) for name in OPERATOR_OPTIONS}}
        if self._roots is not None:
            context["roots"] = self._roots
        copy = self.model_validate({**self.model_dump(), **overrides}, context=context)
        copy._roots = self._roots
        return copy

    @classmethod
    def load(cls, path: Path) -> Options:
        """Options from a JSON file; defaults when the file does not exist."""
        if not path.is_file():
            return cls()
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        """Write atomically, so a crash never leaves a half-written config."""
        write_atomically(path, json.dumps(self.model_dump(), indent=2).encode("utf-8"))
