"""Benchmark of the transformer families (Flux.1 dev, SD 3.5 Large): our engine against plain diffusers, memory modes.

    python -m benchmarks.flow --small                  # CPU: models cut by SMALL_FLOW, 256x256, 4 steps
    python -m benchmarks.flow --out flow.json          # GPU: real-size Flux.1 dev and SD 3.5 Large, 1024x1024, bf16
    python -m benchmarks.flow --families flux --storages bf16 --modes medvram,lowvram   # a part of it

Each family is built with random weights from the shipped configs (compute cost does not depend on the weight
values) and saved as one all-in-one file per storage: transformer and text encoders as float8 e4m3fn (``fp8``, as
the published fp8 files) or bf16, the VAE bf16. The engine loads them like a user's files (casting to its dtype:
bf16 on a GPU, fp32 on the CPU) and finds no tokenizer in ``models/text_encoder/``, so the shipped T5 tokenizer is
used. Cases, per family:

- cold load of each file: seconds, file size, process peak RSS;
- txt2img, ours against plain ``FluxPipeline`` / ``StableDiffusion3Pipeline`` on the very same components (same
  scheduler, steps, size, CFG, generators), alternating: ``time_ratio_vs_diffusers`` (lower is better), the
  pixel difference, each side's peak GPU memory;
- with a GPU, the transformer kept in fp8 (the ``fp8_storage`` option: float8 e4m3fn, upcast layer by layer) or in
  bf16, under each memory mode (``normal``, ``medvram`` = model CPU offload by component, text encoders included,
  ``lowvram`` = sequential offload): seconds per image and peak GPU memory of one txt2img in a fresh engine.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import cases
from benchmarks.engine import machine_facts, write_figures
from benchmarks.models import STORAGE_DTYPES, build_random_flow_files, matmul_tflops

FAMILIES = ("flux", "sd3")
MEMORY_MODES = ("normal", "medvram", "lowvram")
#: The transformer's weights on the device in the memory cases: float8 e4m3fn (the ``fp8_storage`` option, upcast
#: layer by layer as it runs) or the engine's bf16.
FP8_STORAGE = {"fp8": "Enable", "bf16": "Disable"}
#: The CFG each family samples with by default (Flux.1 dev: distilled guidance 3.5 and no real CFG).
CFG = {"flux": {"cfg_scale": 1.0, "distilled_cfg_scale": 3.5}, "sd3": {"cfg_scale": 4.5}}


def run(small: bool, families: list[str], storages: list[str], modes: list[str], steps: int | None,
        size: int | None, runs: int) -> dict:
    """Every case for every family; returns the figures (also what --out writes)."""
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    steps = steps or (20 if gpu else 4)
    size = size or (1024 if gpu else 256)
    work = Path(tempfile.mkdtemp(prefix="sd-bench-flow-"))
    paths = Paths(data_dir=work, models_dir=work / "models", outputs_dir=work / "outputs")
    precision = "bf16" if gpu else "full"
    figures: dict = {
        **machine_facts(), "device": str(device), "dtype": "bfloat16" if gpu else "float32",
        "small": small, "steps": steps, "size": size, "runs": runs,
        "matmul_tflops": round(matmul_tflops(device, torch.bfloat16 if gpu else torch.float32), 4), "cases": [],
    }

    def make_engine(**settings) -> Engine:
        return Engine(EngineSettings(paths=paths, device=str(device), precision=precision, **settings))

    for family in families:
        started = time.perf_counter()
        files = build_random_flow_files(paths.models_dir / "Stable-diffusion", family, tuple(storages), small=small,
                                        device=str(device))
        print(f"built random-weight {family} files ({', '.join(storages)}) in {time.perf_counter() - started:.0f} s",
              flush=True)
        for storage, path in files.items():
            _add(figures, _load_case(make_engine, family, storage, path))
        storage = "bf16" if "bf16" in files else storages[0]
        engine = make_engine()
        case = cases.txt2img_case(engine, files[storage].name, size, steps, 1, runs, figures["matmul_tflops"],
                                  **CFG[family])
        case["case"] += f", {storage} file"
        _add(figures, case)
        figures[f"time_ratio_vs_diffusers_{family}_{size}"] = case["time_ratio_vs_diffusers"]
        engine.models.unload()
        del engine
        for weights, option in FP8_STORAGE.items():
            for mode in modes if gpu else ():
                mode_case = cases.memory_mode_case(make_engine, files[storage].name, mode, size,
                                                   steps if mode != "lowvram" else max(steps // 4, 2),
                                                   {"fp8_storage": option}, **CFG[family])
                mode_case["case"] = f"{family} {weights} weights, {mode_case['case']}"
                _add(figures, mode_case)
        for path in files.values():
            path.unlink()  # real-size files take tens of GB; the next family needs the disk
    if not gpu:
        figures["memory_modes"] = "not run: the memory modes apply on a GPU only (the CPU always runs normal)"
    figures["cpu_peak_rss_gb"] = cases.cpu_peak_rss_gb()
    shutil.rmtree(work, ignore_errors=True)
    return figures


def _load_case(make_engine, family: str, storage: str, path: Path) -> dict:
    """Cold load of one file through a fresh engine."""
    engine = make_engine()
    seconds = cases.timed(lambda: engine.models.get(path.name), engine.models.device.device)
    figures = {"case": f"{family} {storage} load", "file_gb": round(path.stat().st_size / 2**30, 3),
               "cold_load_seconds": round(seconds, 2), "cpu_peak_rss_gb": cases.cpu_peak_rss_gb()}
    engine.models.unload()
    return figures


def _add(figures: dict, case: dict) -> None:
    figures["cases"].append(case)
    print("  ".join(f"{key}={value}" for key, value in case.items()), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="Models cut in depth and width (runs on a CPU).")
    parser.add_argument("--families", default=",".join(FAMILIES), help="flux, sd3 or both (default: both).")
    parser.add_argument("--storages", default=",".join(STORAGE_DTYPES),
                        help="How the files store the weights: fp8 (e4m3fn), bf16 or both (default: both).")
    parser.add_argument("--modes", default=",".join(MEMORY_MODES),
                        help="Memory modes timed on a GPU: normal, medvram, lowvram (default: all).")
    parser.add_argument("--steps", type=int, help="Sampling steps (default 20 on GPU, 4 on CPU).")
    parser.add_argument("--size", type=int, help="Image size (default 1024 on GPU, 256 on CPU).")
    parser.add_argument("--runs", type=int, help="Timed runs of each side, median used (default 3; 1 with --small).")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = run(args.small, _choices(args.families, FAMILIES, "--families"),
                  _choices(args.storages, tuple(STORAGE_DTYPES), "--storages"),
                  _choices(args.modes, MEMORY_MODES, "--modes"), args.steps, args.size,
                  args.runs or (1 if args.small else 3))
    write_figures(figures, args.out, echo=False)
    return 0


def _choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    wrong = [item for item in chosen if item not in allowed]
    if wrong or not chosen:
        raise SystemExit(f"{option}: {', '.join(wrong) or 'nothing'} is not one of {', '.join(allowed)}")
    return chosen


if __name__ == "__main__":
    raise SystemExit(main())
