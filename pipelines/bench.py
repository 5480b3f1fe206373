"""Benchmark: our engine against plain diffusers on the same model, in one process.

    python -m pipelines.bench --quick --out bench.json     # CPU size: SD 1.5 UNet at 256x256
    python -m pipelines.bench --out bench.json             # GPU size: 512x512
    python -m pipelines.bench --model PATH                 # any checkpoint instead of random weights

Without ``--model`` it builds an SD 1.5-sized model with random weights from the shipped configs
(compute cost does not depend on the weight values), saves it as a diffusers folder and loads it through
the engine like a user's model. The same txt2img request then runs through the engine and through a
plain diffusers ``StableDiffusionPipeline`` built on the very same components (same scheduler, steps,
size, dtype, generators), alternating, and the medians are compared: ``time_ratio_vs_diffusers`` is ours
divided by theirs (lower is better). It also times the prompt parser and token counter on a 300-token
prompt against one sampling step.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
LONG_PROMPT = ", ".join(f"(word{i}:1.1) [thing{i}] detail" for i in range(39))  # about 300 tokens


def build_random_sd15(folder: Path, seed: int = 0) -> Path:
    """An SD 1.5-sized diffusers folder with random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.checkpoints import shipped_tokenizer
    from pipelines.samplers import build_scheduler

    torch.manual_seed(seed)
    base = CONFIGS / "sd15"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder"))
    tokenizer = shipped_tokenizer("sd1")
    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler("Euler", "Automatic", scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    target = folder / "random-sd15"
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(quick: bool, model: Path | None, runs: int, steps: int, size: int | None) -> dict:
    """Run the comparison; returns the figures as a dict (also what --out writes)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from pipelines.engine import Engine
    from pipelines.prompt_encoding import PromptEncoder, count_tokens
    from pipelines.prompt_parser import get_prompt_schedule, parse_prompt_attention
    from pipelines.request import GenerationRequest
    from pipelines.samplers import build_scheduler
    from pipelines.settings import EngineSettings, Paths

    work = Path(tempfile.mkdtemp(prefix="sd-bench-"))
    if model is None:
        started = time.perf_counter()
        model = build_random_sd15(work / "random")
        print(f"built a random-weight SD 1.5-sized model in {time.perf_counter() - started:.1f} s", flush=True)
    model = model.resolve()
    paths = Paths(data_dir=work, models_dir=work / "models", outputs_dir=work / "outputs",
                  extra_dirs={"checkpoint": (model.parent,)})
    engine = Engine(EngineSettings(paths=paths))
    device = engine.models.device
    size = size or (256 if quick or device.device.type == "cpu" else 512)
    request = GenerationRequest(prompt="a photo of an astronaut riding a horse", negative_prompt="blurry",
                                steps=steps, width=size, height=size, seed=1, sampler_name="Euler",
                                checkpoint=model.name, save_images=False)

    load_seconds = _timed(lambda: engine.models.get(model.name))
    loaded = engine.models.get(model.name)
    pipe_class = StableDiffusionXLPipeline if loaded.is_sdxl else StableDiffusionPipeline
    plain = pipe_class(**loaded.pipe.components)
    plain.set_progress_bar_config(disable=True)

    def ours() -> None:
        engine.generate(request)

    def theirs() -> None:
        plain.scheduler = build_scheduler(request.sampler_name, request.scheduler, loaded.scheduler_config)
        plain(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=steps,
              guidance_scale=request.cfg_scale, width=size, height=size,
              generator=[torch.Generator("cpu").manual_seed(1)])

    ours()  # warm-up both paths (allocations, kernel selection)
    theirs()
    our_times, their_times = [], []
    for _ in range(runs):
        our_times.append(_timed(ours))
        their_times.append(_timed(theirs))
    ours_s, theirs_s = statistics.median(our_times), statistics.median(their_times)

    encoder = PromptEncoder.from_pipeline(loaded.pipe)
    parse_s = _per_call(lambda: (parse_prompt_attention(LONG_PROMPT), get_prompt_schedule(LONG_PROMPT, steps)))
    count_s = _per_call(lambda: count_tokens(encoder, LONG_PROMPT))
    tokens = count_tokens(encoder, LONG_PROMPT)[0]
    step_s = ours_s / steps
    figures = {
        "device": str(device.device),
        "dtype": str(device.dtype).removeprefix("torch."),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "model": model.name,
        "size": f"{size}x{size}",
        "steps": steps,
        "runs": runs,
        "model_load_seconds": round(load_seconds, 3),
        "ours_seconds_per_image": round(ours_s, 3),
        "diffusers_seconds_per_image": round(theirs_s, 3),
        "ours_it_per_s": round(steps / ours_s, 3),
        "diffusers_it_per_s": round(steps / theirs_s, 3),
        "time_ratio_vs_diffusers": round(ours_s / theirs_s, 4),
        "prompt_tokens": tokens,
        "prompt_parse_ms": round(parse_s * 1000, 3),
        "token_count_ms": round(count_s * 1000, 3),
        "prompt_parse_fraction_of_step": round((parse_s + count_s) / step_s, 6),
    }
    return figures


def _per_call(fn, repeat: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def write_figures(figures: dict, out: Path | None, *, echo: bool = True) -> None:
    """Print the figures as JSON (unless ``echo`` is off) and, with ``out``, write the same JSON there."""
    text = json.dumps(figures, indent=2)
    if echo:
        print(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}")


def print_table(figures: dict) -> None:
    print(f"\n{'figure':34} value")
    for key, value in figures.items():
        print(f"{key:34} {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU size: 256x256.")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    parser.add_argument("--model", type=Path, help="A checkpoint file or diffusers folder to use instead.")
    parser.add_argument("--runs", type=int, default=3, help="Timed runs of each side (median is used).")
    parser.add_argument("--steps", type=int, default=10, help="Sampling steps per image.")
    parser.add_argument("--size", type=int, help="Image size (default 256 with --quick or on CPU, else 512).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = run(args.quick, args.model, args.runs, args.steps, args.size)
    print_table(figures)
    write_figures(figures, args.out, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
