"""One generation job as numbered stages, read top-down in :func:`run_job` and :func:`_sample_batch`:

1. check inputs (names were resolved by :meth:`~pipelines.engine.Engine.plan`) -> 2. prompts ->
3. conditioning -> 4. the job's infotext parameters -> then per batch: 5. latents -> 6. denoise ->
7. hires pass (:func:`~pipelines.sampling.hires.run_hires_pass`) -> 8. decode (-> 8b. restore faces) ->
9. infotext -> 10. save;
and last 11. the grid.

Each stage is a plain function of explicit inputs; the :class:`~pipelines.engine.Engine` adds the model
manager, the GPU lock and error handling around :func:`run_job`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

import pipelines
from pipelines.faces import FaceRestorers
from pipelines.images.infotext import build_infotext, infotext_params_from_fields
from pipelines.images.saving import filename_from_pattern, make_grid, save_image
from pipelines.job_control import JobControl, JobInterrupted, JobStopped
from pipelines.models import families
from pipelines.models.catalog import ModelFile
from pipelines.models.manager import LoadedModel
from pipelines.models.weights import ModelFileError, model_file_field
from pipelines.options import Options
from pipelines.plugins.extra_networks import ExtraNetworkRegistry
from pipelines.plugins.scripts import AlwaysOnScript, ScriptRun, running_scripts
from pipelines.prompts.embeddings import EmbeddingDatabase
from pipelines.prompts.encoding import Conditioning, PromptEncoder, build_conditioning
from pipelines.prompts.parser import ExtraNetworkTag, extract_extra_networks
from pipelines.prompts.styles import StyleDatabase
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.sampling import latents as latent_ops
from pipelines.sampling.denoise import (
    DenoiseInputs,
    InpaintLatents,
    ModelSwitch,
    SwitchTarget,
    denoise,
    txt2img_timesteps,
)
from pipelines.sampling.hires import HiresInputs, encode_hires_prompts, hires_steps, run_hires_pass, switches_model
from pipelines.sampling.img2img import (
    Img2ImgSource,
    blank_inpaint_conditioning,
    finish_inpaint,
    img2img_infotext_params,
    img2img_latents,
    prepare_img2img_source,
)
from pipelines.sampling.previews import StepReporter
from pipelines.sampling.refiner import (
    DEFAULT_HIRES_REFINER_PASS,
    add_time_ids,
    latent_space,
    refined_passes,
    refiner_title,
    switch_due,
)
from pipelines.sampling.samplers import build_scheduler, fitting_schedule
from pipelines.sampling.seeds import SeedPlan, generators_for, image_noise
from pipelines.sampling.step_cache import supports_step_cache
from pipelines.upscaling import Upscalers


@dataclass
class GenerationResult:
    """What a job made. ``images[k]`` has seed ``seeds[k]`` and infotext ``infotexts[k]``."""

    request: GenerationRequest
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    #: Images the always-on scripts add after the generated ones (ControlNet's detected maps); not saved.
    extra_images: list[Image.Image] = field(default_factory=list)
    #: The grid of the job's images when one was made (and saved at ``grid_path``).
    grid: Image.Image | None = None
    grid_path: Path | None = None
    #: The job's own infotext parameters beyond the request's fields (img2img's, extra networks', always-on
    #: scripts', ...), as written into every image's infotext; A1111's ``extra_generation_params``.
    #: None for a result a selectable script assembled.
    extra_params: dict[str, object] | None = None
    warnings: list[str] = field(default_factory=list)
    #: Interrupt stopped the job: the images of the batch it stopped were decoded from its current latents,
    #: and later batches did not run.
    interrupted: bool = False
    #: The batches (0-based) that Skip stopped early; their images were decoded from their current latents.
    skipped_batches: list[int] = field(default_factory=list)
    model_title: str = ""
    job_timestamp: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d%H%M%S"))
    seconds: float = 0.0

    def extend(self, other: GenerationResult) -> None:
        """Append ``other``'s images with their infotexts, seeds, prompts and paths (a script's sub-job)."""
        self.images.extend(other.images)
        self.infotexts.extend(other.infotexts)
        self.seeds.extend(other.seeds)
        self.subseeds.extend(other.subseeds)
        self.prompts.extend(other.prompts)
        self.negative_prompts.extend(other.negative_prompts)
        self.paths.extend(other.paths)


@dataclass(frozen=True)
class PreparedPrompts:
    """The prompts of every image after styles and with extra-network tags taken out for encoding."""

    prompts: list[str]  # as recorded in the infotext (styles applied, tags kept, as A1111 does)
    negative_prompts: list[str]
    encode_prompts: list[str]  # what the text encoder sees
    encode_negative_prompts: list[str]
    tags: list[ExtraNetworkTag]


# --- stage 2: prompts ----------------------------------------------------------------------------


def prepare_prompts(request: GenerationRequest, count: int, styles: StyleDatabase) -> PreparedPrompts:
    """Apply styles, then take the ``<name:args>`` tags out of the text the encoder will see."""
    prompt, negative = request.prompt, request.negative_prompt
    if request.styles:
        prompt, negative = styles.apply(prompt, negative, request.styles)
    encode_prompt, tags = extract_extra_networks(prompt)
    encode_negative, negative_tags = extract_extra_networks(negative)
    return PreparedPrompts(
        [prompt] * count, [negative] * count, [encode_prompt] * count, [encode_negative] * count,
        tags + negative_tags,
    )


# --- stage 5: latents ----------------------------------------------------------------------------


def initial_noise(request: GenerationRequest, seeds: list[int], subseeds: list[int],
                  generators: list[torch.Generator], shape: tuple[int, int, int], model: LoadedModel) -> torch.Tensor:
    """(B, C, h, w) noise on the CPU, one image at a time from that image's generator."""
    resize_from = None
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        resize_from = model.latent_size(request.seed_resize_from_w, request.seed_resize_from_h)
    return torch.stack([
        image_noise(gen, shape, subseed=sub, subseed_strength=request.subseed_strength, resize_from=resize_from)
        for gen, sub in zip(generators, subseeds)
    ])


# --- stages 8 and 9: decode and infotext --------------------------------------------------------------------


def decode_images(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> images; keeps the VAE in fp32 from now on if fp16 overflowed."""
    pixels, upcast = latent_ops.decode(model.vae, latents, allow_upcast=not model.vae_upcast)
    if upcast:
        model.vae_upcast = True
    return latent_ops.tensor_to_pil(pixels)


def infotext_params(request: GenerationRequest, model: LoadedModel, prompt: str, negative: str, seed: int,
                    subseed: int, extra: dict[str, object]) -> dict[str, object]:
    """The parameters of one image's infotext, keyed by infotext names, ``extra`` (the job's own) included."""
    fields: dict[str, object] = {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": request.steps,
        "sampler_name": request.sampler_name,
        "scheduler": request.scheduler,
        "cfg_scale": request.cfg_scale,
        "seed": seed,
        "width": request.width,
        "height": request.height,
        "sd_model_hash": model.file.short_hash,
        "sd_model_name": model.file.model_name,
        "sd_vae_name": model.vae_file.name if model.vae_file else None,
        "sd_vae_hash": model.vae_file.short_hash if model.vae_file else None,
        "subseed": subseed,
        "subseed_strength": request.subseed_strength,
        "seed_resize_from_w": request.seed_resize_from_w,
        "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": request.denoising_strength if request.enable_hr or request.mode == "img2img" else None,
        "enable_hr": request.enable_hr,
        "hr_scale": request.hr_scale if not (request.hr_resize_x or request.hr_resize_y) else None,
        "hr_resize_x": request.hr_resize_x,
        "hr_resize_y": request.hr_resize_y,
        "hr_second_pass_steps": request.hr_second_pass_steps,
        "hr_upscaler": request.hr_upscaler,
        "hr_checkpoint_name": request.hr_checkpoint_name,
        "hr_sampler_name": request.hr_sampler_name,
        "hr_scheduler": request.hr_scheduler,
        "hr_prompt": request.hr_prompt,
        "hr_negative_prompt": request.hr_negative_prompt,
        "clip_skip": request.clip_skip,
        "tiling": request.tiling,
        "rng": "CPU",
    }
    if model.spec.infotext_fields is not None:
        fields.update(model.spec.infotext_fields(request, model))
    params = infotext_params_from_fields(fields)
    params.update(extra)
    params["Version"] = pipelines.__version__
    return params


# --- the job -------------------------------------------------------------------------------------


@dataclass
class JobContext:
    """What a job runs with besides its request."""

    model: LoadedModel
    options: Options
    outputs_dir: Path
    styles: StyleDatabase
    embeddings: EmbeddingDatabase | None
    control: JobControl
    extra_networks: ExtraNetworkRegistry
    upscalers: Upscalers
    device: torch.device
    #: The face restorers, for jobs that restore faces (:func:`restores_faces`).
    face_restorers: FaceRestorers | None = None
    #: Shown with the first batch's progress (e.g. "compiling the UNet for 512x512").
    notice: str = ""
    #: The always-on scripts this job enables, with their parsed arguments.
    scripts: list[tuple[AlwaysOnScript, object]] = field(default_factory=list)
    #: The hires pass's own checkpoint (``hr_checkpoint_name`` resolved); None: the hires pass runs on ``model``.
    hires_checkpoint: ModelFile | None = None
    #: Gets a checkpoint by title from the model manager, on the device; may unload others (cache size 1).
    load_model: Callable[[str], LoadedModel] | None = None
    #: The refiner (``refiner_checkpoint`` resolved); None: no refiner.
    refiner: ModelFile | None = None


def _pass_model(ctx: JobContext, title: str, request: GenerationRequest, tags: list[ExtraNetworkTag],
                held: ExitStack) -> LoadedModel:
    """Checkpoint ``title`` for one pass. One that is not the job's own model (the hires checkpoint, or the
    first one loaded again after a cache of 1 dropped it) gets the job's extra networks and tiling until
    ``held`` closes. Loads and patches outside inference mode, so that no weight becomes an inference tensor."""
    if ctx.load_model is None:
        raise RuntimeError("this job context cannot load models (JobContext.load_model is not set)")
    with torch.inference_mode(False):
        try:
            model = ctx.load_model(title)
        except ModelFileError as error:
            if error.field == "checkpoint" and title != ctx.model.file.title:
                error.field = "hr_checkpoint_name"
            raise
        if model is not ctx.model:
            with model_file_field("prompt"):
                held.enter_context(ctx.extra_networks.activated(model, tags))
            held.enter_context(_Tiling(model, request.tiling))
    return model


def _switches_model(request: GenerationRequest, ctx: JobContext) -> bool:
    return switches_model(request, ctx.model.file, ctx.hires_checkpoint)


def _refines(ctx: JobContext) -> bool:
    """Whether the job has a refiner other than its own checkpoint (the refiner may then displace it)."""
    return ctx.refiner is not None and ctx.refiner.title != ctx.model.file.title


class RefinerSwitches:
    """The refiner of one batch (:mod:`pipelines.sampling.refiner`): a :class:`ModelSwitch` for each pass it takes
    over; :attr:`model` is the refiner once a switch of the current pass loaded it.

    The refiner is loaded through the model manager (which may park or unload the pass's model, as for any
    checkpoint), gets the job's tiling but not its extra networks (a LoRA fits the checkpoint it was made for),
    and encodes the pass's prompts with its own text encoders. The first switch adds A1111's infotext keys."""

    def __init__(self, request: GenerationRequest, ctx: JobContext, prompts: PreparedPrompts, held: ExitStack,
                 extra_params: dict[str, object]):
        self.request, self.ctx, self.prompts, self.held = request, ctx, prompts, held
        self.extra_params = extra_params
        #: The pass's step reporter: previews follow the refiner once it took over.
        self.reporter: StepReporter | None = None
        self.model: LoadedModel | None = None
        option = ctx.options.hires_fix_refiner_pass
        self.passes = refined_passes(request.enable_hr, option) if _refines(ctx) else (False, False)
        self.option = option

    @property
    def aesthetic_scores(self) -> tuple[float, float]:
        options = self.ctx.options
        return options.sdxl_refiner_low_aesthetic_score, options.sdxl_refiner_high_aesthetic_score

    def first_pass(self, model: LoadedModel) -> ModelSwitch | None:
        """The switch of the first pass (txt2img or img2img), made on ``model``."""
        if not self.passes[0]:
            return None
        return self._switch(model, self.request.width, self.request.height, _real_steps(self.request), hires=False)

    def hires_pass(self, model: LoadedModel) -> ModelSwitch | None:
        """The switch of the hires pass, made on ``model`` (the hires model)."""
        if not self.passes[1]:
            return None
        self.model = None  # the hires pass started on its own checkpoint
        width, height = self.request.hires_size
        return self._switch(model, width, height, max(hires_steps(self.request)[1], 1), hires=True)

    def _switch(self, model: LoadedModel, width: int, height: int, steps: int, *, hires: bool) -> ModelSwitch | None:
        refiner_file = self.ctx.refiner
        if refiner_file is None or refiner_file.title == model.file.title:
            return None

        def load() -> SwitchTarget:
            refiner = self._load(refiner_file, model)
            request, prompts = self.request, self.prompts
            if hires:
                conditioning = encode_hires_prompts(request, refiner, prompts.encode_prompts,
                                                    prompts.encode_negative_prompts, self.ctx.embeddings)
            else:
                encoder = PromptEncoder.from_pipeline(refiner.pipe, embeddings=self.ctx.embeddings)
                conditioning = build_conditioning(encoder, prompts.encode_prompts[: request.batch_size],
                                                  prompts.encode_negative_prompts[: request.batch_size],
                                                  steps, request.clip_skip)
            self.model = refiner
            self.extra_params["Refiner"] = refiner_title(refiner)
            self.extra_params["Refiner switch at"] = request.refiner_switch_at
            if request.enable_hr and self.option != DEFAULT_HIRES_REFINER_PASS:
                self.extra_params["Hires refiner"] = self.option
            if self.reporter is not None:
                self.reporter.use_model(refiner)
            return SwitchTarget(refiner.unet, conditioning, add_time_ids(refiner, width, height,
                                                                         self.aesthetic_scores))

        return ModelSwitch(switch_due(self.request.refiner_switch_at), load)

    def _load(self, file: ModelFile, model: LoadedModel) -> LoadedModel:
        ctx = self.ctx
        if ctx.load_model is None:
            raise RuntimeError("this job context cannot load models (JobContext.load_model is not set)")
        ctx.control.update(textinfo=f"Refiner: {file.model_name}")
        with torch.inference_mode(False):  # load and patch outside inference mode (see _pass_model)
            try:
                refiner = ctx.load_model(file.title)
            except ModelFileError as error:
                if error.field in (None, "checkpoint"):
                    error.field = "refiner_checkpoint"
                raise
            if latent_space(refiner) != latent_space(model):
                family = "SDXL" if model.is_sdxl else "SD 1.x / 2.x"
                raise ModelFileError(file.path, f"refiner_checkpoint: {file.title} works in another latent space "
                                     f"than {model.file.title} ({family}); choose a refiner of the same family",
                                     field="refiner_checkpoint")
            if refiner is not ctx.model:
                self.held.enter_context(_Tiling(refiner, self.request.tiling))
        return refiner


def _runnable_schedules(request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
    """``request`` with each schedule type its sampler cannot run replaced by the one it runs (so the infotext
    records what was used), and the warnings saying so."""
    update, warnings = {}, []
    scheduler, warning = fitting_schedule(request.sampler_name, request.scheduler)
    if warning:
        update["scheduler"], warnings = scheduler, [warning]
    if request.enable_hr and (request.hr_sampler_name or request.hr_scheduler):
        hr_scheduler, warning = fitting_schedule(request.hr_sampler_name or request.sampler_name,
                                                 request.hr_scheduler or request.scheduler)
        if warning:
            update["hr_scheduler"] = hr_scheduler
            warnings.append(f"Hires pass: {warning}")
    return (request.model_copy(update=update) if update else request), warnings


def _family_inputs(request: GenerationRequest, model: LoadedModel) -> tuple[GenerationRequest, list[str]]:
    """The request as the model's family runs it: its defaults for fields the caller left unset, its samplers
    and schedule types; a mode it cannot run yet is refused naming the field."""
    family = model.spec
    update: dict[str, object] = {name: value for name, value in family.defaults_for(model.file.path).items()
                                 if name not in request.model_fields_set}
    warnings = []
    sampler = update.get("sampler_name", request.sampler_name)
    if family.samplers and sampler not in family.samplers:
        update["sampler_name"] = family.samplers[0]
        warnings.append(f"{family.label} models run {', '.join(family.samplers)}; {sampler} was replaced by "
                        f"{family.samplers[0]}")
    schedule = update.get("scheduler", request.scheduler)
    if family.schedules and schedule not in (*family.schedules, "Automatic"):
        warnings.append(f"{family.label} models run the schedule types {', '.join(family.schedules)}; {schedule} "
                        f"was replaced by {family.schedules[0]}")
    if family.schedules and schedule not in family.schedules:
        update["scheduler"] = family.schedules[0]
    problem = families.unsupported(request, family)
    if problem is not None:  # Engine.plan refuses these first; this guards direct callers of run_job
        raise ValueError(f"{problem[0]}: {problem[1]}")
    return (request.model_copy(update=update) if update else request), warnings


def check_inputs(request: GenerationRequest, ctx: JobContext) -> tuple[GenerationRequest, list[str]]:
    """The request as it will run and be recorded: the family's defaults and samplers, schedule types the
    samplers can run, the hires checkpoint by its name (as "Model" records the first one); and the warnings
    about what changed."""
    request, family_warnings = _family_inputs(request, ctx.model)
    request, warnings = _runnable_schedules(request)
    warnings = family_warnings + warnings
    if request.enable_hr:
        hires = ctx.hires_checkpoint
        request = request.model_copy(update={"hr_checkpoint_name": hires.model_name if hires else None})
    return request, warnings


def encode_job_prompts(request: GenerationRequest, ctx: JobContext, model: LoadedModel,
                       prompts: PreparedPrompts, notes: list[str] | None = None
                       ) -> tuple[Conditioning, Conditioning | None]:
    """The conditioning of the first pass and, unless the hires pass runs on its own checkpoint (whose text
    encoders encode its prompts batch by batch), of the hires pass. Once per job: every batch has the same
    prompts and step count."""
    if model.spec.encode is not None:  # a family with its own text encoders (Flux.1)
        with torch.inference_mode():
            conditioning, warnings = model.spec.encode(model, prompts.encode_prompts[: request.batch_size],
                                                       prompts.encode_negative_prompts[: request.batch_size],
                                                       _real_steps(request), request)
        if notes is not None:
            notes.extend(warnings)
        return conditioning, None
    encoder = PromptEncoder.from_pipeline(model.pipe, embeddings=ctx.embeddings)
    with torch.inference_mode():
        conditioning = build_conditioning(encoder, prompts.encode_prompts[: request.batch_size],
                                          prompts.encode_negative_prompts[: request.batch_size],
                                          _real_steps(request), request.clip_skip)
    hr_conditioning = None
    if request.enable_hr and not _switches_model(request, ctx):
        hr_conditioning = encode_hires_prompts(request, model, prompts.encode_prompts,
                                               prompts.encode_negative_prompts, ctx.embeddings)
    return conditioning, hr_conditioning


def job_infotext_params(request: GenerationRequest, ctx: JobContext, model: LoadedModel,
                        conditioning: Conditioning, network_params: dict[str, object], scripts: ScriptRun,
                        warnings: list[str]) -> dict[str, object]:
    """The job's infotext parameters beyond the request's fields (img2img's, extra networks', scripts',
    step caching, embeddings' hashes); appends a warning when step caching cannot run."""
    extra = img2img_infotext_params(request) if isinstance(request, Img2ImgRequest) else {}
    extra.update(network_params)
    extra.update(scripts.infotext)
    if ctx.options.step_cache_interval and supports_step_cache(model.unet):
        extra["Step cache"] = ctx.options.step_cache_interval  # it changes the image: say so
    elif ctx.options.step_cache_interval:
        warnings.append("step caching is off for this model (a torch.compile'd UNet, or one not laid "
                        "out as SD 1.x / 2.x / SDXL): every step ran the whole UNet")
    if conditioning.ti_hashes:
        extra["TI hashes"] = conditioning.ti_hashes
    if ctx.options.eta_noise_seed_delta:
        extra["ENSD"] = ctx.options.eta_noise_seed_delta
    if model.fp8:
        extra["FP8 weight"] = ctx.options.fp8_storage
    if restores_faces(request, ctx.options):
        extra["Face restoration"] = ctx.options.face_restoration_model
    return extra


def save_grid(request: GenerationRequest, ctx: JobContext, result: GenerationResult) -> None:
    """Save a grid of the job's images (when there are several and grids are saved) into ``result``."""
    if request.save_images and ctx.options.grid_save and len(result.images) > 1:
        result.grid = make_grid(result.images)
        folder = ctx.options.output_dir(ctx.outputs_dir, request.mode, grids=True)
        result.grid_path = save_image(result.grid, folder, seed=result.seeds[0],
                                      infotext=result.infotexts[0] if ctx.options.enable_pnginfo else "",
                                      fmt=ctx.options.grid_format, suffix="-grid",
                                      quality=ctx.options.jpeg_quality, lossless=ctx.options.webp_lossless)


def run_job(request: GenerationRequest, ctx: JobContext) -> GenerationResult:
    """Run every batch of ``request``; returns what finished (all of it unless interrupted)."""
    started = time.perf_counter()
    model = ctx.model
    # 1. check inputs: the request as it runs and is recorded (names were resolved by Engine.plan)
    request, schedule_warnings = check_inputs(request, ctx)
    result = GenerationResult(request=request, model_title=model.file.title, warnings=schedule_warnings)
    seeds = SeedPlan.for_job(request.seed, request.subseed, request.image_count, request.subseed_strength)
    # 2. prompts: styles applied, extra-network tags taken out
    prompts = prepare_prompts(request, request.image_count, ctx.styles)
    # Extra networks change the model (text encoder included) for this job only, so they go first; both they
    # and the always-on scripts are undone on the way out, however the job ends.
    # A model file they load that cannot be used names the request field that chose it (for the API's 422).
    with ExitStack() as held:
        with model_file_field("prompt"):
            network_params, warnings = held.enter_context(ctx.extra_networks.activated(model, prompts.tags))
        with model_file_field("alwayson_scripts"):
            scripts = held.enter_context(running_scripts(ctx.scripts, request, model, ctx.device, ctx.options))
        result.warnings.extend(warnings)
        result.warnings.extend(scripts.warnings)
        # 3. conditioning, once per job
        conditionings = encode_job_prompts(request, ctx, model, prompts, result.warnings)
        # 4. the job's own infotext parameters
        result.extra_params = job_infotext_params(request, ctx, model, conditionings[0], network_params, scripts,
                                                  result.warnings)
        # 5.-10. batch after batch: latents -> denoise -> hires pass -> decode -> infotext -> save
        _run_batches(request, ctx, seeds, prompts, conditionings, result, scripts)
        result.extra_images.extend(scripts.extra_images)
        if ctx.options.show_progress_type == "TAESD" and model.taesd_error:
            result.warnings.append(model.taesd_error)
    # 11. the grid
    save_grid(request, ctx, result)
    result.seconds = time.perf_counter() - started
    return result


def _run_batches(request: GenerationRequest, ctx: JobContext, plan: SeedPlan, prompts: PreparedPrompts,
                 conditioning: tuple[Conditioning, Conditioning | None], result: GenerationResult,
                 scripts: ScriptRun) -> None:
    """Sample, decode and save batch after batch into ``result``; stops early on interrupt.

    A batch that Interrupt or Skip stops still gives its images (decoded from the latents at hand) with their
    seeds, prompts and infotexts, as A1111 does; like A1111 they are saved only when the
    ``save_incomplete_images`` option is on."""
    model, control = ctx.model, ctx.control
    control.start(request.n_iter, _real_steps(request))
    try:
        with _Tiling(model, request.tiling):
            for batch_no in range(request.n_iter):
                first = batch_no * request.batch_size
                span = slice(first, first + request.batch_size)
                notice = f" - {ctx.notice}" if batch_no == 0 and ctx.notice else ""
                control.update(job_no=batch_no, step=0, textinfo=f"Batch {batch_no + 1} of {request.n_iter}{notice}")
                before_hires = None
                if request.enable_hr and request.save_images and ctx.options.samples_save and \
                        ctx.options.save_images_before_highres_fix:
                    def before_hires(images: list[Image.Image], first: int = first) -> None:
                        _record_batch(request, ctx, model, plan, first, prompts, images, result,
                                      suffix="-before-highres-fix")
                images, stopped = _run_batch(request, ctx, plan, span, prompts, conditioning, scripts, before_hires,
                                             result.extra_params)
                if restores_faces(request, ctx.options):
                    images = _restore_faces(request, ctx, model, plan, first, prompts, images, result)
                _record_batch(request, ctx, model, plan, first, prompts, images, result,
                              save=stopped is None or ctx.options.save_incomplete_images)
                if isinstance(stopped, JobInterrupted):
                    raise stopped
                if stopped is not None:
                    result.skipped_batches.append(batch_no)
    except JobInterrupted:
        result.interrupted = True
    control.update(job_no=request.n_iter if not result.interrupted else None, step=_real_steps(request))


def restores_faces(request: GenerationRequest, options: Options) -> bool:
    """Whether a job restores faces: its ``restore_faces``, or when that is None the ``face_restoration`` option."""
    return options.face_restoration if request.restore_faces is None else request.restore_faces


def _restore_faces(request: GenerationRequest, ctx: JobContext, model: LoadedModel, plan: SeedPlan, first: int,
                   prompts: PreparedPrompts, images: list[Image.Image], result: GenerationResult) -> list[Image.Image]:
    """Stage 8b (A1111's place: after decoding, before the infotext and saving): every face restored with the
    ``face_restoration_model`` option's model; the images saved first when ``save_images_before_face_restoration``
    is on."""
    options = ctx.options
    if ctx.face_restorers is None:
        raise RuntimeError("restore_faces: this job was given no face restorers")
    if request.save_images and options.samples_save and options.save_images_before_face_restoration:
        _record_batch(request, ctx, model, plan, first, prompts, images, result, suffix="-before-face-restoration")
    ctx.control.update(textinfo=f"Restoring faces ({options.face_restoration_model})")
    return [ctx.face_restorers.restore(image, options.face_restoration_model,
                                       codeformer_weight=options.code_former_weight,
                                       unload=options.face_restoration_unload) for image in images]


def _record_batch(request: GenerationRequest, ctx: JobContext, model: LoadedModel, plan: SeedPlan, first: int,
                  prompts: PreparedPrompts, images: list[Image.Image], result: GenerationResult, *,
                  save: bool = True, suffix: str = "") -> None:
    """Stages 9 and 10 of a batch: each image's infotext, then (if asked, and ``save``) its file. With a
    ``suffix`` (the first pass saved before the Hires. fix) the images are only saved, not added to ``result``."""
    for k, image in enumerate(images):
        i = first + k
        # 9. infotext
        params = infotext_params(request, model, prompts.prompts[i], prompts.negative_prompts[i],
                                 plan.seeds[i], plan.subseeds[i], result.extra_params or {})
        infotext = build_infotext(prompts.prompts[i], prompts.negative_prompts[i], params)
        if suffix:
            save_sample(request, ctx, model, image, infotext, prompts, plan, i, result, suffix=suffix)
            continue
        result.images.append(image)
        result.infotexts.append(infotext)
        result.seeds.append(plan.seeds[i])
        result.subseeds.append(plan.subseeds[i])
        result.prompts.append(prompts.prompts[i])
        result.negative_prompts.append(prompts.negative_prompts[i])
        # 10. save
        if save and request.save_images and ctx.options.samples_save:
            result.paths.append(save_sample(request, ctx, model, image, infotext, prompts, plan, i, result))


def save_sample(request: GenerationRequest, ctx: JobContext, model: LoadedModel, image: Image.Image, infotext: str,
                prompts: PreparedPrompts, plan: SeedPlan, i: int, result: GenerationResult, suffix: str = "") -> Path:
    """Save image ``i`` of the job as the options say: folder, ``samples_filename_pattern``, format, quality, and
    the infotext unless ``enable_pnginfo`` is off."""
    options = ctx.options
    stem = ""
    if options.samples_filename_pattern.strip():
        stem = filename_from_pattern(options.samples_filename_pattern, {
            "seed": plan.seeds[i], "prompt": prompts.prompts[i], "prompt_no_styles": request.prompt,
            "negative_prompt": prompts.negative_prompts[i], "steps": request.steps, "cfg": request.cfg_scale,
            "sampler": request.sampler_name, "scheduler": request.scheduler, "width": request.width,
            "height": request.height, "model_name": model.file.model_name, "model_hash": model.file.short_hash,
            "job_timestamp": result.job_timestamp, "clip_skip": request.clip_skip,
            "batch_number": i % request.batch_size, "generation_number": i + 1})
    folder = options.output_dir(ctx.outputs_dir, request.mode)
    return save_image(image, folder, seed=plan.seeds[i], infotext=infotext if options.enable_pnginfo else "",
                      fmt=options.samples_format, suffix=suffix, stem=stem,
                      quality=options.jpeg_quality, lossless=options.webp_lossless)


def _real_steps(request: GenerationRequest) -> int:
    """Sampling steps each batch really runs: img2img runs about denoising_strength x steps."""
    if isinstance(request, Img2ImgRequest):
        return max(min(int(request.steps * request.denoising_strength), request.steps), 1)
    return request.steps


def _run_batch(request: GenerationRequest, ctx: JobContext, plan: SeedPlan, span: slice, prompts: PreparedPrompts,
               conditionings: tuple[Conditioning, Conditioning | None], scripts: ScriptRun,
               before_hires: Callable[[list[Image.Image]], None] | None = None,
               extra_params: dict[str, object] | None = None) -> tuple[list[Image.Image], JobStopped | None]:
    """One batch: first pass, hires fix, decode; and the Interrupt or Skip that stopped it early (None when it
    ran to the end). Models other than the job's own are released afterwards. The refiner's infotext keys go
    into ``extra_params`` (the job's) once it took over."""
    with ExitStack() as held:
        model = ctx.model
        # The hires pass or the refiner of the previous batch may have displaced or unloaded it.
        if _switches_model(request, ctx) or _refines(ctx):
            model = _pass_model(ctx, ctx.model.file.title, request, prompts.tags, held)
        with torch.inference_mode():
            refiner = RefinerSwitches(request, ctx, prompts, held, extra_params if extra_params is not None else {})
            return _sample_batch(request, ctx, model, plan, span, prompts, conditionings, scripts, held,
                                 before_hires, refiner)


@dataclass
class BatchLatents:
    """A batch's starting point: latents, the timesteps left to run, and what img2img / inpaint keep."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    steps: int
    source: Img2ImgSource | None = None
    inpaint: InpaintLatents | None = None


def prepare_latents(request: GenerationRequest, ctx: JobContext, model: LoadedModel, scheduler,
                    seeds: list[int], subseeds: list[int], generators: list[torch.Generator],
                    span: slice) -> BatchLatents:
    """Noise (txt2img) or the noised source images (img2img), and the timesteps that the strength leaves."""
    device = ctx.device
    h, w = model.latent_size(request.width, request.height)
    shape = (model.vae.config.latent_channels, h, w)

    def make_noise() -> torch.Tensor:
        return initial_noise(request, seeds, subseeds, generators, shape, model)

    source = inpaint = None
    if isinstance(request, Img2ImgRequest):
        source = prepare_img2img_source(request, span.start, len(seeds))
        latents, timesteps, steps_run, inpaint = img2img_latents(request, model, source, scheduler, make_noise,
                                                                 generators, device)
    else:
        timesteps = txt2img_timesteps(scheduler, request.steps, device)
        latents = make_noise().to(device=device, dtype=model.unet.dtype) * scheduler.init_noise_sigma
        steps_run = request.steps
    if model.is_inpainting and inpaint is None:
        inpaint = blank_inpaint_conditioning(model, len(seeds), request.width, request.height, seeds, device)
    return BatchLatents(latents, timesteps, steps_run, source, inpaint)


def _sample_batch(request: GenerationRequest, ctx: JobContext, model: LoadedModel, plan: SeedPlan, span: slice,
                  prompts: PreparedPrompts, conditionings: tuple[Conditioning, Conditioning | None],
                  scripts: ScriptRun, held: ExitStack,
                  before_hires: Callable[[list[Image.Image]], None] | None = None,
                  refiner: RefinerSwitches | None = None) -> tuple[list[Image.Image], JobStopped | None]:
    conditioning, hr_conditioning = conditionings
    seeds, subseeds = plan.seeds[span], plan.subseeds[span]
    generators = generators_for(seeds)
    if model.spec.sample is not None:  # a family with its own sampling loop (Flux.1)
        return _sample_family_batch(request, ctx, model, seeds, subseeds, generators, conditioning, scripts)
    scheduler = build_scheduler(request.sampler_name, request.scheduler, model.scheduler_config, seeds=seeds,
                                sdxl=model.is_sdxl)

    # 5. latents (and, for img2img, the timesteps that the strength leaves)
    start = prepare_latents(request, ctx, model, scheduler, seeds, subseeds, generators, span)
    if ctx.options.eta_noise_seed_delta:  # A1111's ENSD: the step noise comes from seed + delta
        generators = generators_for([seed + ctx.options.eta_noise_seed_delta for seed in seeds])
    aesthetic = (ctx.options.sdxl_refiner_low_aesthetic_score, ctx.options.sdxl_refiner_high_aesthetic_score)
    time_ids = add_time_ids(model, request.width, request.height, aesthetic)

    # 6. denoise, 7. hires pass; Interrupt or Skip stops them with the latents to decode (as A1111 does)
    stopped: JobStopped | None = None
    try:
        latents, model, upscaled = _denoise_and_hires(request, ctx, model, scheduler, start, conditioning,
                                                      hr_conditioning, generators, subseeds, time_ids,
                                                      prompts, scripts, held, before_hires, refiner)
    except JobStopped as stop:
        stopped, upscaled = stop, None
        latents = stop.latents if stop.latents is not None else start.latents
        if stop.model is not None:
            model = stop.model
    if upscaled is not None:  # hires upscale only: the upscaler's pixels are the result
        scripts.after_batch(upscaled)
        return upscaled, None

    # 8. decode
    images = decode_images(model, latents)
    if start.source is not None:
        images = finish_inpaint(images, start.source)
    scripts.after_batch(images)
    return images, stopped


def _sample_family_batch(request: GenerationRequest, ctx: JobContext, model: LoadedModel, seeds: list[int],
                         subseeds: list[int], generators: list[torch.Generator], conditioning: Conditioning,
                         scripts: ScriptRun) -> tuple[list[Image.Image], JobStopped | None]:
    """Stages 5, 6 and 8 for a family with its own sampling loop: CPU noise per image, its loop, decode."""
    sample = model.spec.sample
    if sample is None:
        raise RuntimeError(f"{model.spec.label} has no sampling loop of its own")
    h, w = model.latent_size(request.width, request.height)
    noise = initial_noise(request, seeds, subseeds, generators, (model.vae.config.latent_channels, h, w), model)
    ctx.control.update(steps=request.steps)
    reporter = StepReporter(ctx.control, model, ctx.options.show_progress_type, on_step=scripts.on_step)
    stopped: JobStopped | None = None
    try:
        latents = sample(model, noise, conditioning, request, reporter.step)
    except JobStopped as stop:
        stopped, latents = stop, stop.latents if stop.latents is not None else noise
    images = decode_images(model, latents.to(ctx.device))
    scripts.after_batch(images)
    return images, stopped


def _denoise_and_hires(request: GenerationRequest, ctx: JobContext, model: LoadedModel, scheduler,
                       start: BatchLatents, conditioning: Conditioning, hr_conditioning: Conditioning | None,
                       generators: list[torch.Generator], subseeds: list[int], add_time_ids: torch.Tensor | None,
                       prompts: PreparedPrompts, scripts: ScriptRun, held: ExitStack,
                       before_hires: Callable[[list[Image.Image]], None] | None = None,
                       refiner: RefinerSwitches | None = None
                       ) -> tuple[torch.Tensor, LoadedModel, list[Image.Image] | None]:
    """Stages 6 and 7: (final latents, the model whose VAE decodes them, the upscaled images of an
    upscale-only hires fix or None). Raises :class:`JobStopped` on Interrupt or Skip, with the latents to
    decode and their model when the stop came after the first pass."""
    control = ctx.control
    latents = start.latents
    # 6. denoise
    control.update(steps=max(start.steps, 1))
    reporter = StepReporter(control, model, ctx.options.show_progress_type, on_step=scripts.on_step)
    if refiner is not None:
        refiner.reporter = reporter
    if len(start.timesteps):
        try:
            latents = denoise(model.unet, DenoiseInputs(
                latents=latents, timesteps=start.timesteps, scheduler=scheduler, conditioning=conditioning,
                cfg_scale=request.cfg_scale, generators=generators, steps=start.steps, add_time_ids=add_time_ids,
                inpaint=start.inpaint, patches=scripts.patches, size=(request.width, request.height),
                step_cache_interval=ctx.options.step_cache_interval,
                switch=refiner.first_pass(model) if refiner is not None else None), reporter.step)
        except JobStopped as stop:
            if refiner is not None and refiner.model is not None and stop.model is None:
                stop.model = refiner.model  # the refiner's latents: its VAE decodes them
            raise
        if refiner is not None and refiner.model is not None:
            model = refiner.model  # the refiner took over: its VAE decodes (or the hires pass starts from it)

    if before_hires is not None and request.enable_hr:  # the save_images_before_highres_fix option
        images = decode_images(model, latents)
        before_hires(finish_inpaint(images, start.source) if start.source is not None else images)
    try:
        # 7. hires pass (on the hires checkpoint, if the request names one)
        latents, model, upscaled = _hires(request, ctx, model, latents, hr_conditioning, generators, subseeds,
                                          prompts, scripts, held, reporter, refiner)
        control.check()
    except JobStopped as stop:
        if stop.latents is None:  # stopped between steps (upscaling, switching models): the latents at hand
            stop.latents, stop.model = latents, model
        raise
    return latents, model, upscaled


def _hires(request: GenerationRequest, ctx: JobContext, model: LoadedModel, latents: torch.Tensor,
           hr_conditioning: Conditioning | None, generators: list[torch.Generator], subseeds: list[int],
           prompts: PreparedPrompts, scripts: ScriptRun, held: ExitStack, reporter: StepReporter,
           refiner: RefinerSwitches | None = None) -> tuple[torch.Tensor, LoadedModel, list[Image.Image] | None]:
    """Stage 7 when asked: (latents, their model, the upscaled images of an upscale-only hires fix or None)."""
    if request.enable_hr:
        load_hires = None
        hires_file = ctx.hires_checkpoint
        # The refiner that took over the first pass hands the hires pass back to its own checkpoint (as A1111).
        refined_first = refiner is not None and refiner.model is not None
        if refiner is not None:
            refiner.model = None
        pass_file = hires_file if hires_file is not None and _switches_model(request, ctx) else \
            ctx.model.file if refined_first else None
        if pass_file is not None:  # switching needs a hires checkpoint (or the first pass's back)
            def load_hires() -> LoadedModel:
                return _pass_model(ctx, pass_file.title, request, prompts.tags, held)
        try:
            with model_file_field("hr_upscaler"):  # a hires checkpoint or LoRA file has its field already
                hires = run_hires_pass(HiresInputs(
                    request=request, model=model, latents=latents, generators=generators, subseeds=subseeds,
                    upscalers=ctx.upscalers, reporter=reporter, device=ctx.device, conditioning=hr_conditioning,
                    encode_prompts=prompts.encode_prompts, encode_negative_prompts=prompts.encode_negative_prompts,
                    embeddings=ctx.embeddings, load_hires_model=load_hires, patches=scripts.patches,
                    step_cache_interval=ctx.options.step_cache_interval, tile=ctx.options.upscaler_tile,
                    overlap=ctx.options.upscaler_tile_overlap,
                    refiner_switch=refiner.hires_pass if refiner is not None else None,
                    aesthetic_scores=(ctx.options.sdxl_refiner_low_aesthetic_score,
                                      ctx.options.sdxl_refiner_high_aesthetic_score)))
        except JobStopped as stop:
            if refiner is not None and refiner.model is not None and stop.latents is not None:
                stop.model = refiner.model  # stopped after the refiner took over the hires pass
            raise
        if hires.images is not None:  # upscale only: the upscaler's pixels are the result
            return latents, model, hires.images
        if hires.latents is None:
            raise RuntimeError("hires fix: the pass returned neither images nor latents")
        return hires.latents, (refiner.model if refiner is not None and refiner.model else hires.model), None
    return latents, model, None


_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]  # torch.nn.Conv2d.padding_mode


class _Tiling:
    """Seamless tiling for one job: circular padding in every convolution, undone afterwards."""

    def __init__(self, model: LoadedModel, enabled: bool):
        self.enabled = enabled
        self.convs = [m for net in (model.unet, model.vae) for m in net.modules()
                      if isinstance(m, torch.nn.Conv2d)] if enabled else []
        self.saved: list[_PaddingMode] = []

    def __enter__(self):
        self.saved = [conv.padding_mode for conv in self.convs]
        for conv in self.convs:
            conv.padding_mode = "circular"
        return self

    def __exit__(self, *exc) -> None:
        for conv, mode in zip(self.convs, self.saved):
            conv.padding_mode = mode
