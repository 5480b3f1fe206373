"""The benchmark's cases: each runs one measurement on an engine and returns a dict of figures.

Times are medians of alternating runs after a warm-up; GPU times wait for the device. Peak GPU memory is
``torch.cuda.max_memory_allocated`` over the case; peak CPU memory is the process's high-water RSS.
"""

from __future__ import annotations

import collections
import resource
import statistics
import time
import traceback
import warnings

import numpy as np
import torch

from benchmarks.models import step_flops_for, synchronize


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`reset_peak`, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def cpu_peak_rss_gb() -> float:
    """The process's high-water resident memory so far, in GiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def image_diff(a, b) -> float:
    """Mean absolute difference of two lists of images, in 0..255 levels."""
    return round(float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean()
                                for x, y in zip(a, b)])), 3)


def request_for(model_name: str, size: int, steps: int, batch: int = 1, **extra):
    """The benchmark's txt2img request (Euler, CFG 7, fixed seed, no saving)."""
    from pipelines.request import GenerationRequest

    return GenerationRequest(prompt="a photo of an astronaut riding a horse", negative_prompt="blurry",
                             steps=steps, width=size, height=size, seed=1, sampler_name="Euler", batch_size=batch,
                             checkpoint=model_name, save_images=False, **extra)


def diffusers_runner(loaded, request):
    """A function that runs ``request`` through plain diffusers on ``loaded``'s very components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from pipelines.sampling.samplers import build_scheduler

    if not loaded.spec.unet:
        return flow_diffusers_runner(loaded, request)
    pipe_class = StableDiffusionXLPipeline if loaded.is_sdxl else StableDiffusionPipeline
    plain = pipe_class(**loaded.pipe.components)
    plain.set_progress_bar_config(disable=True)

    def run():
        plain.scheduler = build_scheduler(request.sampler_name, request.scheduler, loaded.scheduler_config)
        generators = [torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.batch_size)]
        return plain(prompt=request.prompt, negative_prompt=request.negative_prompt,
                     num_inference_steps=request.steps, guidance_scale=request.cfg_scale, width=request.width,
                     height=request.height, num_images_per_prompt=request.batch_size, generator=generators).images

    return run


def flow_diffusers_runner(loaded, request):
    """``request`` through plain ``FluxPipeline`` / ``StableDiffusion3Pipeline`` on ``loaded``'s very components,
    with the pipeline's own scheduler (flow-matching Euler, as the families' default). ``request`` must name its
    CFG scale: the family's default would apply to ours only."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    flux = loaded.family.name == "flux"
    plain = (FluxPipeline if flux else StableDiffusion3Pipeline)(**loaded.pipe.components)
    plain.set_progress_bar_config(disable=True)
    guidance = ({"guidance_scale": request.distilled_cfg_scale, "true_cfg_scale": request.cfg_scale} if flux
                else {"guidance_scale": request.cfg_scale})

    def run():
        generators = [torch.Generator("cpu").manual_seed(request.seed + k) for k in range(request.batch_size)]
        return plain(prompt=request.prompt, negative_prompt=request.negative_prompt,
                     num_inference_steps=request.steps, width=request.width, height=request.height,
                     num_images_per_prompt=request.batch_size, generator=generators, **guidance).images

    return run


def txt2img_case(engine, model_name: str, size: int, steps: int, batch: int, runs: int,
                 matmul_tflops: float, **extra) -> dict:
    """Ours against plain diffusers: s/image, it/s, ratio, peak memory, FLOPs and fraction of the matrix rate
    (FLOPs for UNet models only). ``extra``: more request fields."""
    device = engine.models.device.device
    request = request_for(model_name, size, steps, batch, **extra)
    loaded = engine.models.get(model_name)
    theirs = diffusers_runner(loaded, request)
    images = {}

    def ours():
        images["ours"] = engine.generate(request).images

    def plain():
        images["theirs"] = theirs()

    reset_peak(device)
    ours()
    ours_peak = peak_gb(device)
    reset_peak(device)
    plain()
    their_peak = peak_gb(device)
    our_times, their_times = [], []
    for _ in range(runs):
        our_times.append(timed(ours, device))
        their_times.append(timed(plain, device))
    ours_s, theirs_s = statistics.median(our_times), statistics.median(their_times)
    flops = step_flops_for(loaded, batch, size, size, cfg=request.cfg_scale > 1) if loaded.spec.unet else None
    our_rate = steps / ours_s
    return {
        "case": f"{loaded.family.name} {size}x{size} batch {batch}",
        "size": size, "batch": batch, "steps": steps,
        "ours_seconds_per_image": round(ours_s / batch, 4),
        "diffusers_seconds_per_image": round(theirs_s / batch, 4),
        "ours_it_per_s": round(our_rate, 3),
        "diffusers_it_per_s": round(steps / theirs_s, 3),
        "time_ratio_vs_diffusers": round(ours_s / theirs_s, 4),
        "image_diff_vs_diffusers": image_diff(images["ours"], images["theirs"]),
        "ours_peak_gpu_gb": ours_peak,
        "diffusers_peak_gpu_gb": their_peak,
        "tflop_per_step": round(flops / 1e12, 3) if flops else None,
        "fraction_of_matmul_peak": round(flops * our_rate / (matmul_tflops * 1e12), 4) if flops else None,
    }


def variant_case(engine, model_name: str, size: int, steps: int, runs: int, name: str, apply, undo) -> dict:
    """Ours with one change (``apply()``, later ``undo()``) against ours without: time ratio, image change,
    and the first (warm-up / compile) run's time."""
    device = engine.models.device.device
    request = request_for(model_name, size, steps)
    engine.models.get(model_name)
    generate = lambda: engine.generate(request).images  # noqa: E731
    generate()
    base_s = statistics.median(timed(generate, device) for _ in range(runs))
    base_images = generate()
    apply()
    try:
        out = {}
        first_s = timed(lambda: out.setdefault("images", generate()), device)
        var_s = statistics.median(timed(generate, device) for _ in range(runs))
    finally:
        undo()
    return {
        "case": f"{name}: {size}x{size} batch 1",
        f"time_ratio_{name}_vs_default": round(var_s / base_s, 4),
        "default_it_per_s": round(steps / base_s, 3),
        f"{name}_it_per_s": round(steps / var_s, 3),
        f"{name}_first_run_seconds": round(first_s, 2),
        f"image_diff_{name}_vs_default": image_diff(out["images"], base_images),
    }


def hires_case(engine, model_name: str, size: int, scale: float, steps: int, hr_steps: int) -> dict:
    """A txt2img with hires fix (latent upscale, then ``hr_steps`` at ``size * scale``): time and peak memory."""
    device = engine.models.device.device
    request = request_for(model_name, size, steps, enable_hr=True, hr_scale=scale, hr_upscaler="Latent",
                          hr_second_pass_steps=hr_steps, denoising_strength=0.5)
    engine.models.get(model_name)
    engine.generate(request)
    reset_peak(device)
    seconds = timed(lambda: engine.generate(request), device)
    return {"case": f"hires {size} -> {int(size * scale)}", "first_pass_steps": steps, "hires_steps": hr_steps,
            "ours_seconds_per_image": round(seconds, 3), "ours_peak_gpu_gb": peak_gb(device)}


def vae_decode_case(engine, model_name: str, size: int, runs: int) -> dict:
    """Seconds for the VAE to decode one image of ``size`` (tiled above the tiling threshold)."""
    from pipelines.sampling import latents as latent_ops

    device = engine.models.device.device
    model = engine.models.get(model_name)
    factor = model.vae_scale_factor
    latents = torch.randn(1, model.vae.config.latent_channels, size // factor, size // factor, device=device,
                          dtype=model.unet.dtype)
    with torch.inference_mode():
        decode = lambda: latent_ops.decode(model.vae, latents, allow_upcast=False)  # noqa: E731
        decode()
        reset_peak(device)
        seconds = statistics.median(timed(decode, device) for _ in range(runs))
    return {"case": f"VAE decode {size}x{size}", "seconds": round(seconds, 4), "peak_gpu_gb": peak_gb(device)}


def load_switch_case(make_engine, names: list[str]) -> dict:
    """Cold load of each model from disk, then switching between them from the RAM cache."""
    engine = make_engine(checkpoint_cache=len(names))
    device = engine.models.device.device
    figures = {"case": "model load and switch"}
    for name in names:
        figures[f"cold_load_seconds_{name}"] = round(timed(lambda n=name: engine.models.get(n), device), 3)
    for name in names:
        figures[f"switch_from_ram_seconds_{name}"] = round(timed(lambda n=name: engine.models.get(n), device), 3)
    figures["cpu_peak_rss_gb"] = cpu_peak_rss_gb()
    engine.models.unload()
    return figures


def memory_mode_case(make_engine, model_name: str, mode: str, size: int, steps: int, options: dict | None = None,
                     **extra) -> dict:
    """One txt2img in a fresh engine with ``mode`` (normal / medvram / lowvram): peak GPU memory and time.
    ``options``: option overrides (``fp8_storage``); ``extra``: more request fields."""
    engine = make_engine(memory_mode=mode)
    device = engine.models.device.device
    overrides = engine.options.with_overrides(options or {})
    request = request_for(model_name, size, steps, **extra)
    engine.generate(request_for(model_name, size, 2, **extra), options=overrides)
    reset_peak(device)
    seconds = timed(lambda: engine.generate(request, options=overrides), device)
    figures = {"case": f"{mode} {size}x{size}", "memory_mode": mode, "steps": steps,
               "seconds_per_image": round(seconds, 3), "peak_gpu_gb": peak_gb(device),
               "cpu_peak_rss_gb": cpu_peak_rss_gb()}
    engine.models.unload()
    return figures


def sync_report(engine, model_name: str, size: int, steps: int) -> dict:
    """Where one txt2img makes the host wait for the GPU (CUDA only): counts by innermost code line."""
    if engine.models.device.device.type != "cuda":
        return {}
    request = request_for(model_name, size, steps)
    engine.generate(request)
    places: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        ours = [f for f in frames if "/pipelines/" in f.filename and "bench" not in f.filename]
        where = ours[-1] if ours else frames[-1]
        places[f"{where.filename.rsplit('/', 2)[-2]}/{where.filename.rsplit('/', 1)[-1]}:{where.lineno} "
               f"via {filename.rsplit('/', 1)[-1]}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved = warnings.showwarning
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate(request)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = saved
    return {"case": f"host syncs, {steps} steps", "syncs_total": sum(places.values()),
            "syncs_by_place": dict(places.most_common(12))}


def step_cache_case(engine, model_name: str, size: int, steps: int, runs: int, intervals=(2, 3)) -> dict:
    """The opt-in step cache at each of ``intervals`` against it off: s/image, time ratio, image change."""
    device = engine.models.device.device
    request = request_for(model_name, size, steps)
    engine.generate(request_for(model_name, size, 2))  # warm-up: one-off allocations
    figures: dict = {"case": f"step cache: {size}x{size} batch 1, {steps} steps"}
    images, seconds = {}, {}
    for interval in (0, *intervals):
        options = engine.options.with_overrides({"step_cache_interval": interval})

        def generate(options=options, interval=interval) -> None:
            images[interval] = engine.generate(request, options=options).images

        seconds[interval] = statistics.median(timed(generate, device) for _ in range(runs))
        figures[f"step_cache_{interval}_seconds_per_image"] = round(seconds[interval], 3)
    for interval in intervals:
        figures[f"time_ratio_step_cache_{interval}_vs_default"] = round(seconds[interval] / seconds[0], 4)
        figures[f"image_diff_step_cache_{interval}_vs_default"] = image_diff(images[interval], images[0])
    return figures
