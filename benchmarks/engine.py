"""Benchmark: our engine against plain diffusers and against the hardware's matrix rate, in one process.

    python -m benchmarks.engine --quick --out bench.json     # CPU size: SD 1.5 UNet at 256x256, a few steps
    python -m benchmarks.engine --out bench.json             # GPU: SD 1.5 512 and SDXL 1024, every case
    python -m benchmarks.engine --model PATH                 # any checkpoint instead of random weights

Without ``--model`` it builds real-size models with random weights from the shipped configs (compute cost
does not depend on the weight values), saves them as fp16 diffusers folders and loads them through the
engine like a user's models. Each txt2img case runs the same request through the engine and through a plain
diffusers pipeline built on the very same components (same scheduler, steps, size, dtype, generators),
alternating; ``time_ratio_vs_diffusers_*`` is ours divided by theirs (lower is better). It also reports
peak GPU and CPU memory, cold load and RAM-cache switch times, VAE decode time, hires fix, --medvram and
--lowvram, opt-in accelerations (step caching on the CPU too), where the step loop waits for the GPU, and the
fraction of the device's measured matrix-product rate that sampling reaches (FLOPs per step counted by torch's
FLOP counter).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import cases
from benchmarks.models import build_random_model, build_random_sd15, matmul_tflops

__all__ = ["build_random_sd15", "main", "run", "write_figures"]

#: Published H100 fp16 batch-1 figures with CFG, it/s: (plain PyTorch, fastest: stable-fast / TensorRT).
ANCHORS = {"sd1": (512, 55.0, 105.0), "sdxl": (1024, 15.0, 22.0)}
FAMILY_DIRS = {"sd1": "sd15", "sdxl": "sdxl"}
LONG_PROMPT = ", ".join(f"(word{i}:1.1) [thing{i}] detail" for i in range(39))  # about 300 tokens


def machine_facts() -> dict:
    """The machine, GPU and torch version the figures were taken with."""
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def run(quick: bool, model: Path | None, runs: int, steps: int | None, families: list[str],
        compile_unet: bool = False, size: int | None = None) -> dict:
    """Run every case; returns the figures as a dict (also what --out writes)."""
    from pipelines.engine import Engine
    from pipelines.models.acceleration import compile_unet as do_compile
    from pipelines.models.acceleration import uncompile_unet
    from pipelines.settings import EngineSettings, Paths

    work = Path(tempfile.mkdtemp(prefix="sd-bench-"))
    gpu = torch.cuda.is_available() and not quick
    device = torch.device("cuda" if gpu else "cpu")
    steps = steps or (20 if gpu else 4)
    figures: dict = {**machine_facts(), "device": str(device), "steps": steps, "runs": runs, "sampler": "Euler",
                     "cfg_scale": 7.0}
    dtype = torch.float16 if gpu else torch.float32
    figures["dtype"] = str(dtype).removeprefix("torch.")
    figures["matmul_tflops"] = round(matmul_tflops(device, torch.bfloat16 if gpu else torch.float32), 4)
    models: list[Path] = []
    if model is not None:
        models.append(model.resolve())
    else:
        for family in families:
            started = time.perf_counter()
            models.append(build_random_model(work / "random", family, device="cuda" if gpu else "cpu"))
            print(f"built a random-weight {family} model in {time.perf_counter() - started:.1f} s", flush=True)
    folders = tuple(sorted({m.parent for m in models}))
    paths = Paths(data_dir=work, models_dir=work / "models", outputs_dir=work / "outputs",
                  extra_dirs={"checkpoint": folders})

    def make_engine(**settings) -> Engine:
        return Engine(EngineSettings(paths=paths, device=str(device), **settings))

    results = []
    figures["cases"] = results
    names = [m.name for m in models]
    if len(names) == 1 and model is None:
        # A second name for the same weights, so that switching from the RAM cache can be timed too.
        twin = models[0].parent / f"{names[0]}-b"
        shutil.copytree(models[0], twin, copy_function=os.link)  # hard links: no second copy on disk
        names.append(twin.name)
    results.append(cases.load_switch_case(make_engine, names))
    torch.cuda.empty_cache() if gpu else None
    for path in models:
        engine = make_engine()
        loaded = engine.models.get(path.name)
        family = loaded.family.name
        size = size or (ANCHORS.get(family, (512,))[0] if gpu else 256)
        tag = f"{FAMILY_DIRS.get(family, family)}_{size}"
        for batch in (1, 4) if gpu else (1,):
            case = cases.txt2img_case(engine, path.name, size, steps, batch, runs, figures["matmul_tflops"])
            results.append(case)
            figures[f"time_ratio_vs_diffusers_{tag}_b{batch}"] = case["time_ratio_vs_diffusers"]
            print(_case_line(case), flush=True)
        if path == models[0]:
            batch_one = next(c for c in results if c.get("batch") == 1)
            figures.update(_prompt_figures(loaded, steps, 1 / batch_one["ours_it_per_s"]))
        # On the CPU the hires case goes from half size to the case's size, to keep --quick short.
        hires_from, hires_to = (size, 2048 if family == "sdxl" else size * 2) if gpu else (max(size // 2, 64), size)
        results.append(cases.hires_case(engine, path.name, hires_from, hires_to / hires_from, steps,
                                        max(steps // 2, 2)))
        for decode_size in dict.fromkeys((size, hires_to)):
            results.append(cases.vae_decode_case(engine, path.name, decode_size, runs))
        cache_case = cases.step_cache_case(engine, path.name, size, steps, runs)
        results.append(cache_case)
        for key in [k for k in cache_case if k.startswith("time_ratio_")]:
            figures[f"{key}_{tag}"] = cache_case[key]
        print(_case_line(cache_case), flush=True)
        if gpu:
            unet = loaded.unet
            variants = {"channels_last": (lambda u=unet: u.to(memory_format=torch.channels_last),
                                          lambda u=unet: u.to(memory_format=torch.contiguous_format))}
            if compile_unet:
                variants["compile"] = (lambda u=unet: do_compile(u), lambda u=unet: uncompile_unet(u))
            for variant, (apply, undo) in variants.items():
                results.append(cases.variant_case(engine, path.name, size, steps, runs, variant, apply, undo))
                print(_case_line(results[-1]), flush=True)
            results.append(cases.sync_report(engine, path.name, size, steps))
            if family != "sdxl":
                results.append(_fp16_vs_fp32(engine, make_engine, path.name, size, steps))
        engine.models.unload()
        del engine, loaded
        if gpu:
            for mode in ("normal", "medvram", "lowvram"):
                results.append(cases.memory_mode_case(make_engine, path.name, mode, size,
                                                      steps if mode != "lowvram" else max(steps // 4, 2)))
                print(_case_line(results[-1]), flush=True)
    figures["cpu_peak_rss_gb"] = cases.cpu_peak_rss_gb()
    first = next((c for c in results if "time_ratio_vs_diffusers" in c), None)
    if first:
        for key in ("time_ratio_vs_diffusers", "ours_it_per_s", "diffusers_it_per_s"):
            figures[key] = first[key]
    return figures


def _prompt_figures(loaded, steps: int, step_seconds: float) -> dict:
    """The prompt parser and token counter on a 300-token prompt, against one sampling step."""
    from pipelines.prompts.encoding import PromptEncoder, count_tokens
    from pipelines.prompts.parser import get_prompt_schedule, parse_prompt_attention

    encoder = PromptEncoder.from_pipeline(loaded.pipe)
    parse_s = _per_call(lambda: (parse_prompt_attention(LONG_PROMPT), get_prompt_schedule(LONG_PROMPT, steps)))
    count_s = _per_call(lambda: count_tokens(encoder, LONG_PROMPT))
    return {"prompt_tokens": count_tokens(encoder, LONG_PROMPT)[0], "prompt_parse_ms": round(parse_s * 1000, 3),
            "token_count_ms": round(count_s * 1000, 3),
            "prompt_parse_fraction_of_step": round((parse_s + count_s) / step_seconds, 6)}


def _per_call(fn, repeat: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _fp16_vs_fp32(engine, make_engine, name: str, size: int, steps: int) -> dict:
    """How far the fp16 image is from the fp32 one (same request, same model)."""
    request = cases.request_for(name, size, steps)
    half = engine.generate(request).images
    engine.models.unload()
    full_engine = make_engine(precision="full")
    full = full_engine.generate(request).images
    full_engine.models.unload()
    return {"case": f"fp16 vs fp32 {size}x{size}", "image_diff_fp16_vs_fp32": cases.image_diff(half, full)}


def _case_line(case: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in case.items())


def write_figures(figures: dict, out: Path | None, *, echo: bool = True) -> None:
    """Print the figures as JSON (unless ``echo`` is off) and, with ``out``, write the same JSON there."""
    text = json.dumps(figures, indent=2)
    if echo:
        print(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}")


def print_table(figures: dict) -> None:
    """A short table of the txt2img cases, ours against diffusers and the published anchors."""
    print(f"\n{figures['gpu'] or figures['machine']}, {figures['dtype']}, {figures['steps']} steps, "
          f"matmul {figures['matmul_tflops']} TFLOP/s")
    print(f"{'case':28} {'ours it/s':>9} {'diffusers':>9} {'ratio':>6} {'s/image':>8} {'peak GB':>8} "
          f"{'% peak':>7} {'anchor plain/fast':>18}")
    for case in figures["cases"]:
        if "ours_it_per_s" not in case:
            continue
        anchor = ""
        for family, (size, plain, fast) in ANCHORS.items():
            if case["case"].startswith(family) and case["size"] == size and case["batch"] == 1:
                anchor = f"{plain:.0f} / {fast:.0f}"
        print(f"{case['case']:28} {case['ours_it_per_s']:9.2f} {case['diffusers_it_per_s']:9.2f} "
              f"{case['time_ratio_vs_diffusers']:6.3f} {case['ours_seconds_per_image']:8.3f} "
              f"{case['ours_peak_gpu_gb'] or 0:8.2f} {case['fraction_of_matmul_peak'] * 100:6.1f}% {anchor:>18}")
    for case in figures["cases"]:
        if "ours_it_per_s" not in case and case:
            print("  " + _case_line(case))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU size: SD 1.5 at 256x256, 4 steps.")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    parser.add_argument("--model", type=Path, help="A checkpoint file or diffusers folder to use instead.")
    parser.add_argument("--runs", type=int, default=3, help="Timed runs of each side (median is used).")
    parser.add_argument("--steps", type=int, help="Sampling steps per image (default 20 on GPU, 4 on CPU).")
    parser.add_argument("--families", default=None,
                        help="Random models to build: sd15,sdxl (default: both on GPU, sd15 with --quick / CPU).")
    parser.add_argument("--size", type=int, help="Image size (default 256 on CPU; 512 SD 1.5 / 1024 SDXL on GPU).")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile of the UNet (GPU).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    gpu = torch.cuda.is_available() and not args.quick
    families = (args.families or ("sd15,sdxl" if gpu else "sd15")).split(",")
    figures = run(args.quick, args.model, 1 if args.quick else args.runs, args.steps, families, args.compile,
                  args.size)
    print_table(figures)
    write_figures(figures, args.out, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
