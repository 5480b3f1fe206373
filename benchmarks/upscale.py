"""Benchmark: our tiled upscaler against calling the spandrel model on the whole image.

    python -m benchmarks.upscale --quick --out up.json    # 128 -> 512, tiles 48 px (CPU, minutes)
    python -m benchmarks.upscale --out up.json            # 512 -> 2048, tiles 192 px
    python -m benchmarks.upscale --size 1024 --device cuda

The model is a real-size RRDB (the RealESRGAN_x4plus architecture: 64 features, 23 blocks, growth
32) with random weights, written as ``.safetensors`` into a temporary ``models/ESRGAN/`` and loaded
through :class:`pipelines.upscaling.Upscalers` like a user's file (compute does not depend on the
weights). Each side runs once in its own fresh process so their peak memory can be told apart
(peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU; ``peak_memory_added_*`` is the
peak above what the process held before the upscale), then a third process times both sides
alternately ``--runs`` times. ``time_ratio_vs_whole_image`` is our median divided by the
whole-image median (lower is better). ``--quick`` scales the tile with the image so the tiling
overhead matches the full-size run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.engine import write_figures
from pipelines.settings import MODEL_FOLDERS

MODEL_NAME = "rrdb-x4plus-random"


def write_random_rrdb(models_dir: Path, seed: int = 0) -> Path:
    """A RealESRGAN_x4plus-sized RRDB with random weights, saved as ``models_dir/ESRGAN/<MODEL_NAME>.safetensors``."""
    import safetensors.torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    module = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
    path = models_dir / MODEL_FOLDERS["esrgan"] / f"{MODEL_NAME}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({key: value.contiguous() for key, value in module.state_dict().items()}, str(path))
    return path


def _test_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.4 * np.sin(12 * x + 9 * y)], axis=-1)
    return Image.fromarray((np.clip(base + 0.1 * rng.random(base.shape), 0, 1) * 255).astype(np.uint8))


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(side: str, data_dir: Path, size: int, tile: int, overlap: int, device: str, runs: int, out: Path) -> dict:
    """Run one side ("tiled" or "whole") once in this process for its peak memory and output (saved to
    ``out``, .npy), or "timing": both sides alternately ``runs`` times, so load changes on a shared
    machine hit both alike."""
    from pipelines.settings import Paths
    from pipelines.upscaling import Upscalers, pil_to_tensor, tensor_to_pil

    upscalers = Upscalers(Paths.under(data_dir), device=device)
    model = upscalers.load(MODEL_NAME)
    image = _test_image(size)

    def tiled() -> Image.Image:
        return upscalers.upscale(image, MODEL_NAME, scale=4, tile=tile, overlap=overlap)

    def whole() -> Image.Image:
        with torch.inference_mode():
            pixels = pil_to_tensor(image).to(model.device, model.dtype)
            return tensor_to_pil(model(pixels).float().cpu())

    def timed(fn) -> tuple[float, Image.Image]:
        _sync(model.device)
        started = time.perf_counter()
        result = fn()
        _sync(model.device)
        return time.perf_counter() - started, result

    with torch.inference_mode():  # warm-up on a small input: kernels, allocator
        model(torch.rand(1, 3, 32, 32, device=model.device, dtype=model.dtype))
    _sync(model.device)
    if side == "timing":
        seconds: dict[str, list[float]] = {"tiled": [], "whole": []}
        for _ in range(runs):
            for name, fn in (("tiled", tiled), ("whole", whole)):
                seconds[name].append(round(timed(fn)[0], 3))
        return seconds
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    baseline = _peak_mb(model.device)
    elapsed, result = timed(tiled if side == "tiled" else whole)
    np.save(out, np.asarray(result))
    peak = _peak_mb(model.device)
    return {
        "seconds_single_run": round(elapsed, 3),
        "peak_memory_mb": round(peak, 1),
        # What the upscale itself added on top of the loaded model and the runtime.
        "peak_memory_added_mb": round(peak - baseline, 1),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "output_size": list(result.size),
    }


def _spawn(side: str, args: argparse.Namespace, data_dir: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.upscale", "--worker", side, "--data-dir", str(data_dir),
               "--size", str(args.size), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--device", args.device, "--runs", str(args.runs), "--worker-out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    """Both sides, each in a fresh process; returns the figures (also what --out writes)."""
    from pipelines.upscaling import count_tiles

    work = Path(tempfile.mkdtemp(prefix="upscale-bench-"))
    write_random_rrdb(work / "models")
    figures: dict = {
        "model": "RRDB x4 (RealESRGAN_x4plus architecture: 64 nf, 23 blocks, gc 32), random weights",
        "input": [args.size, args.size],
        "output": [args.size * 4, args.size * 4],
        "tile": args.tile,
        "overlap": args.overlap,
        "tiles": count_tiles(args.size, args.size, args.tile, args.overlap),
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "torch": torch.__version__,
    }
    for side in ("tiled", "whole", "timing"):
        print(f"running {side} ...", flush=True)
        figures[side] = _spawn(side, args, work, work / f"{side}.npy")
        print(f"  {figures[side]}", flush=True)
    tiled, whole, timing = figures["tiled"], figures["whole"], figures["timing"]
    if "tiled" in timing:
        figures["seconds_tiled"] = statistics.median(timing["tiled"])
        figures["seconds_whole_image"] = statistics.median(timing["whole"])
        figures["time_ratio_vs_whole_image"] = round(figures["seconds_tiled"] / figures["seconds_whole_image"], 3)
    if "peak_memory_mb" in tiled and "peak_memory_mb" in whole:
        figures["peak_memory_added_tiled_mb"] = tiled["peak_memory_added_mb"]
        figures["peak_memory_added_whole_image_mb"] = whole["peak_memory_added_mb"]
        ours, theirs = np.load(work / "tiled.npy").astype(int), np.load(work / "whole.npy").astype(int)
        figures["max_abs_diff_levels"] = int(np.abs(ours - theirs).max())
        figures["mean_abs_diff_levels"] = round(float(np.abs(ours - theirs).mean()), 4)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upscale", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 -> 512 with 48 px tiles, 8 px overlap.")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    parser.add_argument("--size", type=int, help="Input size (default 512, 128 with --quick).")
    parser.add_argument("--tile", type=int, help="Tile size in input pixels (default 192, 48 with --quick).")
    parser.add_argument("--overlap", type=int, help="Tile overlap in input pixels (default 32, 8 with --quick).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    parser.add_argument("--runs", type=int, default=3, help="Timed runs of each side, alternating (median is used).")
    parser.add_argument("--worker", choices=("tiled", "whole", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (128 if args.quick else 512)
    args.tile = args.tile if args.tile is not None else (48 if args.quick else 192)
    args.overlap = args.overlap if args.overlap is not None else (8 if args.quick else 32)
    if args.worker:
        result = worker(args.worker, args.data_dir, args.size, args.tile, args.overlap, args.device, args.runs,
                        args.worker_out)
        print(json.dumps(result))
        return 0
    figures = run(args)
    write_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
