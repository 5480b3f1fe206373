"""One generation job as named stages: prepare prompts -> encode -> prepare latents -> denoise -> decode -> save.

Each stage is a plain function of explicit inputs. :func:`run_job` strings them together for txt2img,
img2img and inpaint; the :class:`~pipelines.engine.Engine` adds the model manager, the GPU lock and
error handling around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image

import pipelines
from pipelines.images.infotext import build_infotext, infotext_params_from_fields
from pipelines.images.saving import make_grid, save_image
from pipelines.job_control import BatchSkipped, JobControl, JobInterrupted
from pipelines.models.catalog import ModelFile
from pipelines.models.manager import LoadedModel
from pipelines.options import Options
from pipelines.plugins.extra_networks import ExtraNetworkRegistry
from pipelines.plugins.scripts import AlwaysOnScript, ScriptRun, running_scripts
from pipelines.prompts.encoding import Conditioning, PromptEncoder, build_conditioning
from pipelines.prompts.parser import ExtraNetworkTag, extract_extra_networks
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.sampling import latents as latent_ops
from pipelines.sampling.denoise import DenoiseInputs, denoise, txt2img_timesteps
from pipelines.sampling.hires import hires_pass, hires_steps, upscale_first_pass, upscale_only
from pipelines.sampling.img2img import (
    blank_inpaint_conditioning,
    finish_inpaint,
    img2img_infotext_params,
    img2img_latents,
    prepare_img2img_source,
)
from pipelines.sampling.previews import preview_maker
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
    grid_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
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


# --- stage 1: prompts ----------------------------------------------------------------------------


def prepare_prompts(request: GenerationRequest, count: int, styles) -> PreparedPrompts:
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


# --- stage 3: latents ----------------------------------------------------------------------------


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


# --- stage 6: decode and save --------------------------------------------------------------------


def decode_images(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> images; keeps the VAE in fp32 from now on if fp16 overflowed."""
    pixels, upcast = latent_ops.decode(model.vae, latents, allow_upcast=not model.vae_upcast)
    if upcast:
        model.vae_upcast = True
    return latent_ops.tensor_to_pil(pixels)


def infotext_for(request: GenerationRequest, model: LoadedModel, prompt: str, negative: str, seed: int,
                 subseed: int, extra: dict[str, object]) -> str:
    """The A1111 infotext of one image."""
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
    params = infotext_params_from_fields(fields)
    params.update(extra)
    params["Version"] = pipelines.__version__
    return build_infotext(prompt, negative, params)


# --- the job -------------------------------------------------------------------------------------


@dataclass
class JobContext:
    """What a job runs with besides its request."""

    model: LoadedModel
    options: Options
    outputs_dir: Path
    styles: object
    embeddings: object | None
    control: JobControl
    extra_networks: ExtraNetworkRegistry
    upscalers: Upscalers
    device: torch.device
    #: Shown with the first batch's progress (e.g. "compiling the UNet for 512x512").
    notice: str = ""
    #: The always-on scripts this job enables, with their parsed arguments.
    scripts: list[tuple[AlwaysOnScript, object]] = field(default_factory=list)
    #: The hires pass's own checkpoint (``hr_checkpoint_name`` resolved); None: the hires pass runs on ``model``.
    hires_checkpoint: ModelFile | None = None
    #: Gets a checkpoint by title from the model manager, on the device; may unload others (cache size 1).
    load_model: Callable[[str], LoadedModel] | None = None


def _switches_model(request: GenerationRequest, ctx: JobContext) -> bool:
    """Whether the hires pass redraws on another checkpoint than the first pass."""
    hires = ctx.hires_checkpoint
    return (request.enable_hr and hires is not None and hires.title != ctx.model.file.title
            and not upscale_only(request))


def _pass_model(ctx: JobContext, title: str, request: GenerationRequest, tags: list[ExtraNetworkTag],
                held: ExitStack) -> LoadedModel:
    """Checkpoint ``title`` for one pass. One that is not the job's own model (the hires checkpoint, or the
    first one loaded again after a cache of 1 dropped it) gets the job's extra networks and tiling until
    ``held`` closes. Loads and patches outside inference mode, so that no weight becomes an inference tensor."""
    if ctx.load_model is None:
        raise RuntimeError("this job context cannot load models (JobContext.load_model is not set)")
    with torch.inference_mode(False):
        model = ctx.load_model(title)
        if model is not ctx.model:
            held.enter_context(ctx.extra_networks.activated(model, tags))
            held.enter_context(_Tiling(model, request.tiling))
    return model


def _encode_hires(request: GenerationRequest, model: LoadedModel, prompts: PreparedPrompts,
                  embeddings: object | None) -> Conditioning:
    """The hires pass's conditioning (hr_prompt / hr_negative_prompt, else the job's prompts) by ``model``."""
    encoder = PromptEncoder.from_pipeline(model.pipe, embeddings=embeddings)
    hr_prompts = [extract_extra_networks(request.hr_prompt)[0] or p for p in prompts.encode_prompts]
    hr_negatives = [extract_extra_networks(request.hr_negative_prompt)[0] or n for n in prompts.encode_negative_prompts]
    with torch.inference_mode():
        return build_conditioning(encoder, hr_prompts[: request.batch_size], hr_negatives[: request.batch_size],
                                  max(hires_steps(request)[1], 1), request.clip_skip)


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


def run_job(request: GenerationRequest, ctx: JobContext) -> GenerationResult:
    """Run every batch of ``request``; returns what finished (all of it unless interrupted)."""
    started = time.perf_counter()
    model = ctx.model
    request, schedule_warnings = _runnable_schedules(request)
    if request.enable_hr:  # record the hires checkpoint by its name, as "Model" records the first one
        hires = ctx.hires_checkpoint
        request = request.model_copy(update={"hr_checkpoint_name": hires.model_name if hires else None})
    result = GenerationResult(request=request, model_title=model.file.title, warnings=schedule_warnings)
    plan = SeedPlan.for_job(request.seed, request.subseed, request.image_count, request.subseed_strength)
    prompts = prepare_prompts(request, request.image_count, ctx.styles)
    # Extra networks change the model (text encoder included) for this job only, so they go first; both they
    # and the always-on scripts are undone on the way out, however the job ends.
    with ctx.extra_networks.activated(model, prompts.tags) as (network_params, warnings), \
            running_scripts(ctx.scripts, request, model, ctx.device) as scripts:
        result.warnings.extend(warnings)
        result.warnings.extend(scripts.warnings)
        # stage 2: conditioning, once per job: every batch has the same prompts and step count.
        encoder = PromptEncoder.from_pipeline(model.pipe, embeddings=ctx.embeddings)
        with torch.inference_mode():
            conditioning = build_conditioning(encoder, prompts.encode_prompts[: request.batch_size],
                                              prompts.encode_negative_prompts[: request.batch_size],
                                              _real_steps(request), request.clip_skip)
        # With a hires checkpoint, the hires prompts are encoded by its own text encoders, batch by batch.
        hr_conditioning = None
        if request.enable_hr and not _switches_model(request, ctx):
            hr_conditioning = _encode_hires(request, model, prompts, ctx.embeddings)
        extra = img2img_infotext_params(request) if isinstance(request, Img2ImgRequest) else {}
        extra.update(network_params)
        extra.update(scripts.infotext)
        if ctx.options.step_cache_interval and supports_step_cache(model.pipe.unet):
            extra["Step cache"] = ctx.options.step_cache_interval  # it changes the image: say so
        elif ctx.options.step_cache_interval:
            result.warnings.append("step caching is off for this model (a torch.compile'd UNet, or one not laid "
                                   "out as SD 1.x / 2.x / SDXL): every step ran the whole UNet")
        if conditioning.ti_hashes:
            extra["TI hashes"] = conditioning.ti_hashes
        _run_batches(request, ctx, plan, prompts, (conditioning, hr_conditioning), extra, result, scripts)
        result.extra_images.extend(scripts.extra_images)
    if request.save_images and ctx.options.grid_save and len(result.images) > 1:
        grid = make_grid(result.images)
        folder = ctx.options.output_dir(ctx.outputs_dir, request.mode, grids=True)
        result.grid_path = save_image(grid, folder, seed=result.seeds[0],
                                      infotext=result.infotexts[0],
                                      fmt=ctx.options.grid_format, suffix="-grid")
    result.seconds = time.perf_counter() - started
    return result


def _run_batches(request: GenerationRequest, ctx: JobContext, plan: SeedPlan, prompts: PreparedPrompts,
                 conditioning: tuple[Conditioning, Conditioning | None], extra: dict[str, object],
                 result: GenerationResult, scripts: ScriptRun) -> None:
    """Sample, decode and save batch after batch into ``result``; stops early on interrupt."""
    model, control = ctx.model, ctx.control
    control.start(request.n_iter, _real_steps(request))
    try:
        with _Tiling(model, request.tiling):
            for batch_no in range(request.n_iter):
                first = batch_no * request.batch_size
                span = slice(first, first + request.batch_size)
                notice = f" - {ctx.notice}" if batch_no == 0 and ctx.notice else ""
                control.update(job_no=batch_no, step=0, textinfo=f"Batch {batch_no + 1} of {request.n_iter}{notice}")
                try:
                    images = _run_batch(request, ctx, plan, span, prompts, conditioning, scripts)
                except BatchSkipped:
                    continue
                for k, image in enumerate(images):
                    i = first + k
                    infotext = infotext_for(request, model, prompts.prompts[i], prompts.negative_prompts[i],
                                            plan.seeds[i], plan.subseeds[i], extra)
                    result.images.append(image)
                    result.infotexts.append(infotext)
                    result.seeds.append(plan.seeds[i])
                    result.subseeds.append(plan.subseeds[i])
                    result.prompts.append(prompts.prompts[i])
                    result.negative_prompts.append(prompts.negative_prompts[i])
                    if request.save_images and ctx.options.samples_save:
                        folder = ctx.options.output_dir(ctx.outputs_dir, request.mode)
                        result.paths.append(save_image(image, folder, seed=plan.seeds[i], infotext=infotext,
                                                       fmt=ctx.options.samples_format))
    except JobInterrupted:
        result.interrupted = True
    control.update(job_no=request.n_iter if not result.interrupted else None, step=_real_steps(request))


def _real_steps(request: GenerationRequest) -> int:
    """Sampling steps each batch really runs: img2img runs about denoising_strength x steps."""
    if isinstance(request, Img2ImgRequest):
        return max(min(int(request.steps * request.denoising_strength), request.steps), 1)
    return request.steps


def _run_batch(request: GenerationRequest, ctx: JobContext, plan: SeedPlan, span: slice, prompts: PreparedPrompts,
               conditionings: tuple[Conditioning, Conditioning | None], scripts: ScriptRun) -> list[Image.Image]:
    """One batch: first pass, hires fix, decode. Models other than the job's own are released afterwards."""
    with ExitStack() as held:
        model = ctx.model
        if _switches_model(request, ctx):  # the hires pass of the previous batch may have unloaded it
            model = _pass_model(ctx, ctx.model.file.title, request, prompts.tags, held)
        with torch.inference_mode():
            return _sample_batch(request, ctx, model, plan, span, prompts, conditionings, scripts, held)


def _sample_batch(request: GenerationRequest, ctx: JobContext, model: LoadedModel, plan: SeedPlan, span: slice,
                  prompts: PreparedPrompts, conditionings: tuple[Conditioning, Conditioning | None],
                  scripts: ScriptRun, held: ExitStack) -> list[Image.Image]:
    conditioning, hr_conditioning = conditionings
    control, device = ctx.control, ctx.device
    seeds, subseeds = plan.seeds[span], plan.subseeds[span]
    generators = generators_for(seeds)
    scheduler = build_scheduler(request.sampler_name, request.scheduler, model.scheduler_config, seeds=seeds)
    dtype = model.unet.dtype
    h, w = model.latent_size(request.width, request.height)
    shape = (model.vae.config.latent_channels, h, w)

    # stage 3: latents (and, for img2img, the timesteps that the strength leaves)
    source = None
    inpaint = None

    def make_noise() -> torch.Tensor:
        return initial_noise(request, seeds, subseeds, generators, shape, model)

    if isinstance(request, Img2ImgRequest):
        source = prepare_img2img_source(request, span.start, len(seeds))
        latents, timesteps, steps_run, inpaint = img2img_latents(request, model, source, scheduler, make_noise,
                                                                 generators, device)
    else:
        timesteps = txt2img_timesteps(scheduler, request.steps, device)
        latents = make_noise().to(device=device, dtype=dtype) * scheduler.init_noise_sigma
        steps_run = request.steps
    if model.is_inpainting and inpaint is None:
        inpaint = blank_inpaint_conditioning(model, len(seeds), request.width, request.height, seeds, device)

    add_time_ids = None
    if model.is_sdxl:
        add_time_ids = torch.tensor([[request.height, request.width, 0, 0, request.height, request.width]])

    # stage 4: denoise
    control.update(steps=max(steps_run, 1))

    # Previews are copied off the GPU without waiting for it and shown once they have arrived.
    previews = preview_maker(model, ctx.options.show_progress_type)

    def on_step(step: int, current: torch.Tensor) -> None:
        control.check()
        scripts.on_step(step, current)
        if control.wants_preview(step) and step:
            previews.submit(current)
        control.update(step=step, preview=previews.poll())

    if len(timesteps):
        latents = denoise(model.unet, DenoiseInputs(
            latents=latents, timesteps=timesteps, scheduler=scheduler, conditioning=conditioning,
            cfg_scale=request.cfg_scale, generators=generators, steps=steps_run, add_time_ids=add_time_ids,
            inpaint=inpaint, patches=scripts.patches, size=(request.width, request.height),
            step_cache_interval=ctx.options.step_cache_interval), on_step)
    tiles = {"tile": ctx.options.upscaler_tile, "overlap": ctx.options.upscaler_tile_overlap,
             "should_stop": control.check, "on_progress": lambda done, total: control.update(step=done, steps=total)}
    if request.enable_hr and upscale_only(request):
        # Hires with an image upscaler and no redraw: the upscaler's pixels are the result, with no
        # VAE round trip (the one-click "generate, then upscale to an exact size" path).
        control.check()
        control.update(step=0, textinfo="Hires. fix: upscaling")
        images = [ctx.upscalers.upscale(image, request.hr_upscaler, size=request.hires_size, crop=True, **tiles)
                  for image in decode_images(model, latents)]
        scripts.after_batch(images)
        return images
    if request.enable_hr:
        control.update(step=0, textinfo="Hires. fix")
        switch = None
        if _switches_model(request, ctx):
            def switch() -> LoadedModel:
                return _pass_model(ctx, ctx.hires_checkpoint.title, request, prompts.tags, held)
        # From here on only the hires model is used: with a checkpoint cache of 1 the first one is gone.
        model, init = upscale_first_pass(request, model, latents, generators=generators, upscalers=ctx.upscalers,
                                         switch_model=switch, **tiles)
        if hr_conditioning is None:
            hr_conditioning = _encode_hires(request, model, prompts, ctx.embeddings)
            previews = preview_maker(model, ctx.options.show_progress_type)
        control.check()
        control.update(step=0, steps=max(hires_steps(request)[1], 1))
        latents = hires_pass(
            request, model, init, conditioning=hr_conditioning, generators=generators,
            make_noise=lambda shape: torch.stack([image_noise(g, shape, subseed=sub,
                                                              subseed_strength=request.subseed_strength)
                                                  for g, sub in zip(generators, subseeds)]),
            on_step=on_step, device=device, patches=scripts.patches,
            step_cache_interval=ctx.options.step_cache_interval)
    control.check()

    # stage 5: decode
    images = decode_images(model, latents)
    if source is not None:
        images = finish_inpaint(images, source)
    scripts.after_batch(images)
    return images


class _Tiling:
    """Seamless tiling for one job: circular padding in every convolution, undone afterwards."""

    def __init__(self, model: LoadedModel, enabled: bool):
        self.enabled = enabled
        self.convs = [m for net in (model.unet, model.vae) for m in net.modules()
                      if isinstance(m, torch.nn.Conv2d)] if enabled else []
        self.saved: list[str] = []

    def __enter__(self):
        self.saved = [conv.padding_mode for conv in self.convs]
        for conv in self.convs:
            conv.padding_mode = "circular"
        return self

    def __exit__(self, *exc) -> None:
        for conv, mode in zip(self.convs, self.saved):
            conv.padding_mode = mode
