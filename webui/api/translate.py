"""From an API body to an engine request, and from the engine's result to an A1111 answer.

Everything here checks input before any job is queued, so bad input fails at once with a 422 that names
the field; nothing here touches the GPU. Per-request settings (``override_settings``) become fields of
that request and a per-request :class:`~pipelines.options.Options` copy; shared state is never written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

import pipelines
from pipelines.engine import Engine
from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.images.saving import decode_base64_image, encode_base64_image
from pipelines.models.manager import LoadedModel
from pipelines.options import Options
from pipelines.plan import RequestError
from pipelines.processing import GenerationResult
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.sampling.samplers import SAMPLERS, SCHEDULE_NAMES, SCHEDULE_TYPES
from webui.api.errors import ApiError, validation_errors
from webui.api.models import NOT_IN_BODY
from webui.api.state import ApiSelection

#: A1111's default sampler for API requests that name none.
API_DEFAULT_SAMPLER = "Euler"
#: ``override_settings`` / options keys that are fields of the request rather than Options.
REQUEST_OPTIONS = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
                   # Forge's "VAE / Text Encoder" choice (text encoders / VAE completing a Flux.1 transformer file)
                   "forge_additional_modules": "additional_modules"}
#: Keys GET options shows that are derived, so a client posting the whole dict back is not refused.
READ_ONLY_OPTIONS = frozenset({"sd_checkpoint_hash"})
#: A1111 options that scripts read and write but that have one value here: GET options shows that value; setting
#: another one is ignored with a warning (there is no colour correction step to save before,
#: the VAE always decodes in full, the noise is always made on the CPU, img2img runs strength x steps).
FIXED_OPTIONS: dict[str, Any] = {
    "sd_vae_decode_method": "Full",
    "save_images_before_color_correction": False,
    "randn_source": "CPU",
    "img2img_fix_steps": False,
    "initial_noise_multiplier": 1.0,
    "save_txt": False,
}
#: A1111 schedule type names (``sgm_uniform``) and labels (``SGM Uniform``), any case, to our labels.
_SCHEDULES = {key: label for label in SCHEDULE_NAMES for key in (label.lower(), label.lower().replace(" ", "_"))}
_AUTOMATIC_VAES = ("Automatic", "None", "")
log = logging.getLogger("webui.api")


@dataclass
class PreparedJob:
    """An API request made ready to queue: the engine request and what applies to it alone."""

    request: GenerationRequest  # ``checkpoint`` is None unless overridden: chosen when the job starts
    option_changes: dict[str, Any]
    parameters: dict[str, Any]
    send_images: bool = True
    return_grid: bool = True
    checkpoint_override: bool = False
    warnings: list[str] = field(default_factory=list)
    #: ``override_settings_restore_afterwards: false``: the overrides to keep once the job has run, as
    #: (request field values, option changes); None: they end with the request.
    persist: tuple[dict[str, Any], dict[str, Any]] | None = None

    def options(self, current: Options) -> Options:
        """The options this job runs with: the current ones with this request's overrides."""
        return current.with_overrides(self.option_changes) if self.option_changes else current


def normalize_scheduler(value: str) -> str:
    """Our schedule label for an A1111 name or label in any case; unknown names pass through to fail
    validation with the list of choices."""
    return _SCHEDULES.get(value.strip().lower(), value)


def split_sampler(name: str, scheduler: str) -> tuple[str, str]:
    """An old-style name such as "DPM++ 2M Karras" is sampler "DPM++ 2M" with schedule "Karras"."""
    if name in SAMPLERS or any(name in s.aliases for s in SAMPLERS.values()):
        return name, scheduler
    for label in sorted(SCHEDULE_TYPES, key=len, reverse=True):
        base = name[: -len(label) - 1]
        if name.endswith(" " + label) and base in SAMPLERS and scheduler == "Automatic":
            return base, label
    return name, scheduler


def _refuse_unavailable(body: BaseModel) -> None:
    """Features A1111 has and we do not yet are refused, not silently dropped."""


def resolve_checkpoint(engine: Engine, query: Any, loc: tuple[str, ...]) -> str:
    """The title of the checkpoint ``query`` names (title, file name, name or hash); 422 otherwise."""
    try:
        return engine.registry.find_checkpoint(str(query)).title
    except LookupError as error:
        raise ApiError(loc, str(error)) from None


def resolve_vae(engine: Engine, query: Any, loc: tuple[str, ...]) -> str:
    """The VAE setting ``query`` names ("Automatic"/"None" or a VAE file); 422 otherwise."""
    if query is None or str(query) in _AUTOMATIC_VAES:
        return "Automatic"
    try:
        return engine.registry.find_vae(str(query)).name
    except LookupError as error:
        raise ApiError(loc, str(error)) from None


def split_overrides(overrides: dict[str, Any] | None, current: Options
                    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``override_settings`` -> (request field values, Options changes, warnings), every option value checked
    (the checkpoint and VAE names are checked with the whole request, by :meth:`Engine.plan`).

    Scripts written for A1111 often override settings we do not have (``eta_noise_seed_delta``, ...):
    those are ignored and named in the answer's warnings rather than failing the whole request.
    """
    fields: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    unknown = unsupported_options(overrides or {})
    for key, value in (overrides or {}).items():
        if key in unknown:
            continue
        # The checkpoint and VAE are resolved with the rest of the request (Engine.plan, in prepare).
        if key == "sd_model_checkpoint":
            fields["checkpoint"] = str(value)
        elif key == "sd_vae":
            fields["vae"] = "Automatic" if value is None or str(value) in _AUTOMATIC_VAES else str(value)
        elif key == "CLIP_stop_at_last_layers":
            fields["clip_skip"] = value
        elif key == "forge_additional_modules":
            # Forge keeps full paths; a file name (or name, or hash) of models/text_encoder or models/VAE is looked up.
            fields["additional_modules"] = [Path(str(item)).name for item in value] if isinstance(value, list) \
                else value
        elif key not in READ_ONLY_OPTIONS and key not in FIXED_OPTIONS:
            changes[key] = value
    check_option_changes(current, changes, ("override_settings",))
    warnings = [f"override_settings: {', '.join(unknown)} not supported here; ignored"] if unknown else []
    if unknown:
        log.warning("%s", warnings[0])
    return fields, changes, warnings


def unsupported_options(changes: dict[str, Any]) -> list[str]:
    """The keys of ``changes`` that are no option here, or set a :data:`FIXED_OPTIONS` one to another value."""
    return [key for key, value in changes.items()
            if (key in FIXED_OPTIONS and value != FIXED_OPTIONS[key])
            or (key not in FIXED_OPTIONS and key not in REQUEST_OPTIONS and key not in Options.model_fields
                and key not in READ_ONLY_OPTIONS)]


def check_option_changes(current: Options, changes: dict[str, Any], loc: tuple[str, ...]) -> Options:
    """Apply ``changes`` to a copy of ``current``; 422 naming an unknown key or a bad value."""
    try:
        return current.with_overrides(changes)
    except KeyError as error:
        known = ", ".join(dict.fromkeys([*REQUEST_OPTIONS, *Options.model_fields]))
        raise ApiError(loc, f"{error.args[0]}; known options: {known}") from None
    except ValidationError as error:
        raise ApiError.from_errors(validation_errors(error.errors(include_url=False), Options,
                                                     ("body", *loc))) from None


def _decode_images(body: BaseModel) -> dict[str, Any]:
    images = []
    for i, data in enumerate(body.init_images):
        try:
            images.append(decode_base64_image(data))
        except ValueError as error:
            raise ApiError(("init_images", i), f"init_images[{i}]: {error}") from None
    mask = None
    if body.mask:
        try:
            mask = decode_base64_image(body.mask)
        except ValueError as error:
            raise ApiError(("mask",), f"mask: {error}") from None
    return {"init_images": images, "mask": mask}


def alwayson_args(value: Any) -> dict[str, list[Any]]:
    """A1111's ``{"name": {"args": [...]}}`` as the engine's ``{"name": [...]}`` (a bare list is accepted too)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(("alwayson_scripts",), "alwayson_scripts: expected an object like "
                                              '{"controlnet": {"args": [...]}}')
    scripts = {}
    for name, entry in value.items():
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if not isinstance(args, list):
            raise ApiError(("alwayson_scripts", name, "args"), f"alwayson_scripts.{name}.args: expected a list")
        scripts[name] = args
    return scripts


def _engine_fields(body: BaseModel, engine_model: type[GenerationRequest]) -> dict[str, Any]:
    """The body's values of the engine's fields; ``null`` means the API default."""
    fields = {}
    for name in engine_model.model_fields:
        if name in NOT_IN_BODY:
            continue
        value = getattr(body, name)
        fields[name] = type(body).model_fields[name].default if value is None else value
    fields["styles"] = list(body.styles or [])
    fields["prompt"] = body.prompt or ""
    fields["negative_prompt"] = body.negative_prompt or ""
    scheduler = normalize_scheduler(body.scheduler or "Automatic")
    sampler = body.sampler_name or body.sampler_index or API_DEFAULT_SAMPLER
    fields["sampler_name"], fields["scheduler"] = split_sampler(sampler, scheduler)
    fields["save_images"] = bool(body.save_images) and not body.do_not_save_samples
    fields["alwayson_scripts"] = alwayson_args(body.alwayson_scripts)
    fields["script_name"] = body.script_name or None
    fields["script_args"] = list(body.script_args or [])
    return fields


def _build_request(engine_model: type[GenerationRequest], fields: dict[str, Any],
                   overridden: dict[str, Any]) -> GenerationRequest:
    try:
        return engine_model(**fields)
    except ValidationError as error:
        errors = validation_errors(error.errors(include_url=False), engine_model, ("body",))
        for item in errors:
            # A value that came from override_settings is reported under its option name.
            for option, name in REQUEST_OPTIONS.items():
                if item["loc"][1:2] == [name] and name in overridden:
                    item["loc"] = ["body", "override_settings", option]
                    item["msg"] = item["msg"].replace(name, option, 1)
        raise ApiError.from_errors(errors) from None


def prepare(body: BaseModel, engine: Engine, selection: ApiSelection, current: Options) -> PreparedJob:
    """Check an API body and build the engine request; raises :class:`ApiError` (422) for bad input."""
    _refuse_unavailable(body)
    engine_model = Img2ImgRequest if hasattr(body, "init_images") else GenerationRequest
    if body.infotext:
        apply_infotext(body)
    overridden, changes, override_warnings = split_overrides(body.override_settings, current)
    warnings = list(override_warnings)
    persist = (dict(overridden), dict(changes)) if body.override_settings_restore_afterwards is False else None
    if "checkpoint" in overridden:
        try:
            engine.registry.find_checkpoint(overridden["checkpoint"])
        except LookupError:  # as A1111: the current checkpoint, with a warning
            warnings.append(f"override_settings: sd_model_checkpoint {overridden.pop('checkpoint')!r} not found; "
                            "the current checkpoint is used")
            log.warning("%s", warnings[-1])
            if persist is not None:
                persist[0].pop("checkpoint", None)
    if body.do_not_save_grid:
        changes["grid_save"] = False
    fields = _engine_fields(body, engine_model)
    unknown_styles = [name for name in fields["styles"] if engine.styles.get(name) is None]
    if unknown_styles:  # A1111 ignores styles it does not have; the engine refuses them, so they go here
        fields["styles"] = [name for name in fields["styles"] if name not in unknown_styles]
        warnings.append(f"styles: unknown style(s) {', '.join(map(repr, unknown_styles))} ignored")
        log.warning("%s", warnings[-1])
    fields.update({"vae": selection.vae, "clip_skip": selection.clip_skip, "checkpoint": None})
    fields.update(overridden)
    if engine_model is Img2ImgRequest:
        fields.update(_decode_images(body))
    request = _build_request(engine_model, fields, overridden)
    # Fields the body leaves out count as unset, so that a model family's own defaults apply to them (Flux.1: CFG
    # scale 1, Euler); families without defaults run the API defaults as before.
    left_out = {"cfg_scale", "steps"} - body.model_fields_set
    if not {"sampler_name", "sampler_index"} & body.model_fields_set:
        left_out |= {"sampler_name"}
    if "scheduler" not in body.model_fields_set:
        left_out |= {"scheduler"}
    request.__pydantic_fields_set__ -= left_out
    try:
        # Every name the request holds, resolved as the engine will when the job runs (it plans again then:
        # a request without a checkpoint override runs on the checkpoint selected at that time).
        plan = engine.plan(request, current.with_overrides(changes) if changes else current)
    except RequestError as error:
        option = next((key for key, name in REQUEST_OPTIONS.items() if name == error.field), None)
        loc = ("override_settings", option) if error.field in overridden else (error.field,)
        raise ApiError(loc, str(error)) from None
    # Names as the engine resolved them (a hash or file name becomes the title).
    if "checkpoint" in overridden:
        request.checkpoint = plan.checkpoint.title
    if "vae" in overridden:
        request.vae = plan.vae_name
    if plan.hires_checkpoint is not None:
        request.hr_checkpoint_name = plan.hires_checkpoint.title
    if plan.refiner is not None:
        request.refiner_checkpoint = plan.refiner.title

    parameters = body.model_dump()
    parameters.update(sampler_name=request.sampler_name, scheduler=request.scheduler)
    if engine_model is Img2ImgRequest and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return PreparedJob(request=request, option_changes=changes, parameters=parameters,
                       send_images=body.send_images is not False, return_grid=not body.do_not_save_grid,
                       checkpoint_override="checkpoint" in overridden, warnings=warnings, persist=persist)


def apply_infotext(body: BaseModel) -> None:
    """Fill the fields ``body`` does not set from its pasted ``infotext`` (A1111 1.8+'s ``infotext`` field), as
    the UI's paste does: fields set in the request win; the infotext's clip skip and model become
    ``override_settings`` unless the request overrides them. 422 for an unreadable infotext."""
    try:
        pasted = request_fields_from_infotext(parse_infotext(body.infotext or ""))
    except ValueError as error:
        raise ApiError(("infotext",), f"infotext: {error}") from None
    given = body.model_fields_set
    model_fields = type(body).model_fields
    for name, value in pasted.items():
        if name in model_fields and name not in given and name not in NOT_IN_BODY:
            setattr(body, name, value)
    overrides = dict(body.override_settings or {})
    if "clip_skip" in pasted and "CLIP_stop_at_last_layers" not in overrides:
        overrides["CLIP_stop_at_last_layers"] = pasted["clip_skip"]
    model = pasted.get("sd_model_hash") or pasted.get("sd_model_name")
    if model and "sd_model_checkpoint" not in overrides:
        overrides["sd_model_checkpoint"] = str(model)
    body.override_settings = overrides or body.override_settings


# --- the answer ----------------------------------------------------------------------------------


def _extra_generation_params(result: GenerationResult) -> dict[str, Any]:
    """The job's own infotext parameters (A1111's ``extra_generation_params``), as the engine recorded them.
    A result a selectable script assembled carries none: its first infotext is read instead."""
    if result.extra_params is not None:  # None values are not written to the infotext, nor listed here
        return {key: value for key, value in result.extra_params.items() if value is not None}
    if not result.infotexts:
        return {}
    extra = request_fields_from_infotext(parse_infotext(result.infotexts[0])).get("extra", {})
    return {key: value for key, value in extra.items() if key != "Version"}


def info_dict(job: PreparedJob, result: GenerationResult, model: LoadedModel | None,
              index_of_first_image: int, infotexts: list[str]) -> dict[str, Any]:
    """The ``info`` of an A1111 answer: every key of docs/compatibility.md §8, plus our warnings."""
    request = result.request
    first = lambda values, default: values[0] if values else default  # noqa: E731
    face_model = _extra_generation_params(result).get("Face restoration")  # written when faces were restored
    return {
        "prompt": first(result.prompts, request.prompt),
        "all_prompts": result.prompts,
        "negative_prompt": first(result.negative_prompts, request.negative_prompt),
        "all_negative_prompts": result.negative_prompts,
        "seed": first(result.seeds, request.seed),
        "all_seeds": result.seeds,
        "subseed": first(result.subseeds, request.subseed),
        "all_subseeds": result.subseeds,
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler_name,
        "scheduler": request.scheduler,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "restore_faces": face_model is not None,
        "face_restoration_model": face_model,
        "sd_model_name": model.file.model_name if model else None,
        "sd_model_hash": model.file.short_hash if model else None,
        "sd_vae_name": model.vae_file.model_name if model and model.vae_file else None,
        "sd_vae_hash": model.vae_file.short_hash if model and model.vae_file else None,
        "seed_resize_from_w": request.seed_resize_from_w,
        "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": getattr(request, "denoising_strength", job.parameters.get("denoising_strength")),
        "extra_generation_params": _extra_generation_params(result),
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": request.styles,
        "job_timestamp": result.job_timestamp,
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": bool(model and model.is_inpainting),
        "version": pipelines.__version__,
        "interrupted": result.interrupted,
        "warnings": [*job.warnings, *result.warnings],
    }


def build_response(job: PreparedJob, result: GenerationResult, model: LoadedModel | None,
                   options: Options | None = None) -> dict[str, Any]:
    """images (raw base64, encoded as the ``samples_format`` option says, with the infotext embedded unless
    ``enable_pnginfo`` is off), parameters and info, as A1111 answers."""
    options = options or Options()
    images = list(zip(result.images, result.infotexts))
    index_of_first_image = 0
    grid = result.grid  # the engine's image: nothing is read back from disk
    if job.return_grid and options.return_grid and grid is not None and result.infotexts:
        # A1111 puts the grid first when it saved one; the grid carries the first image's infotext.
        images.insert(0, (grid, result.infotexts[0]))
        index_of_first_image = 1
    info = info_dict(job, result, model, index_of_first_image, [text for _, text in images])
    # Like A1111, the always-on scripts' extra images (ControlNet's detected maps) follow the generated ones.
    images += [(image, "") for image in result.extra_images]
    encoded = [encode_base64_image(image, text if options.enable_pnginfo else "", options.samples_format,
                                   quality=options.jpeg_quality, lossless=options.webp_lossless)
               for image, text in images] if job.send_images else []
    return {"images": encoded, "parameters": job.parameters, "info": json.dumps(info, ensure_ascii=False)}


def job_timestamp(started_at: float | None) -> str:
    """A1111's job timestamp (YYYYmmddHHMMSS) of a job's start, "0" before it starts."""
    return datetime.fromtimestamp(started_at).strftime("%Y%m%d%H%M%S") if started_at else "0"
