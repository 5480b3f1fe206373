"""Benchmark: what the HTTP API adds over calling the engine directly for the same job.

    python -m benchmarks.api                 # 20 steps at 512x512 on the tiny SD 1.5 model, 5 rounds
    python -m benchmarks.api --rounds 10 --out bench.json

It writes the tiny test models into a temporary folder, starts the real API server (uvicorn on a
loopback port) on an engine built on them, and runs the same txt2img job alternately through
``engine.generate`` and through ``POST /sdapi/v1/txt2img`` (queueing, JSON, PNG encoding and base64
included). ``time_ratio_vs_engine`` is the median API time over the median engine time (target < 1.05).

It lives with the tests because it runs on the tiny test models and the tests' server helper.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.engine import write_figures
from tests.fixtures.api_helpers import ApiServer
from tests.fixtures.tiny_models import write_tiny_models

MODEL = "tiny-sd15.safetensors"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(rounds: int, steps: int, size: int, device: str) -> dict[str, object]:
    """Time the same job through the engine and through the API; returns the figures."""
    from pipelines.engine import Engine
    from pipelines.request import GenerationRequest
    from pipelines.settings import EngineSettings, Paths

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_models(root / "models")
        paths = Paths(data_dir=root / "data", models_dir=root / "models", outputs_dir=root / "data" / "outputs")
        engine = Engine(EngineSettings(paths=paths, device=device))
        job = {"prompt": "a photo of a cat", "seed": 1, "steps": steps, "width": size, "height": size,
               "sampler_name": "Euler", "save_images": False}
        request = GenerationRequest(**job, checkpoint=MODEL)
        body = {**job, "override_settings": {"sd_model_checkpoint": MODEL}}
        server = ApiServer(engine, paths.data_dir).start()
        session = requests.Session()
        url = f"{server.url}/sdapi/v1/txt2img"

        def through_api() -> None:
            response = session.post(url, json=body, timeout=600)
            response.raise_for_status()

        try:
            engine.generate(request)  # load the model and warm up both paths
            through_api()
            engine_times, api_times = [], []
            for _ in range(rounds):
                engine_times.append(_timed(lambda: engine.generate(request)))
                api_times.append(_timed(through_api))
        finally:
            server.stop()
    engine_median, api_median = statistics.median(engine_times), statistics.median(api_times)
    return {
        "job": f"txt2img {steps} steps {size}x{size} on {MODEL}",
        "device": str(engine.models.device.device),
        "rounds": rounds,
        "engine_seconds_median": round(engine_median, 4),
        "api_seconds_median": round(api_median, 4),
        "api_overhead_seconds": round(api_median - engine_median, 4),
        "time_ratio_vs_engine": round(api_median / engine_median, 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the figures as JSON (and writes them with --out)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="Timed runs of each path (median taken).")
    parser.add_argument("--steps", type=int, default=20, help="Sampling steps.")
    parser.add_argument("--size", type=int, default=512, help="Width and height in pixels.")
    parser.add_argument("--device", default="auto", help="Torch device for the engine (auto: cuda if present).")
    parser.add_argument("--out", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    figures = run(args.rounds, args.steps, args.size, args.device)
    write_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
