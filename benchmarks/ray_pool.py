"""Benchmark: throughput of an engine pool (``--workers``) with 1 replica against 2, and its cost per job.

    python -m benchmarks.ray_pool                    # 8 requests, 20 steps at 128x128 on the tiny SD 1.5 model
    python -m benchmarks.ray_pool --requests 16 --out pool.json

It writes the tiny test models into a temporary folder, starts a local Ray instance (no dashboard, a small
object store) and, for 1 and then 2 CPU replicas, sends the same ``--requests`` txt2img jobs at once through
the app's JobQueue (as the UI and the API do) to a front engine whose jobs run on the pool. Each replica uses
``--threads`` torch threads (default 1, so that 2 replicas do not overbook a 2-core machine).

Figures: wall seconds and jobs per second for each pool size, ``throughput_ratio`` (2 replicas over 1), and
``overhead_ms_per_job``: the mean of (time from submitting a job to a replica to having its result on the front)
minus (the time the replica's engine spent on it), i.e. what the pool adds per job: Ray calls, pickling the
request and the images, polling, gathering. Not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.engine import write_figures
from tests.fixtures.tiny_models import write_tiny_models

MODEL = "tiny-sd15.safetensors"


def _run_batch(queue, engine, requests) -> tuple[float, list]:
    """All ``requests`` at once through the queue (pooled jobs); wall seconds and results."""
    results: list = [None] * len(requests)

    def one(k: int) -> None:
        results[k] = queue.run(lambda control: engine.generate(requests[k], control=control), source="api",
                               pooled=True)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(requests))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, results


def run(count: int, steps: int, size: int, threads: int, sizes: tuple[int, ...] = (1, 2)) -> dict[str, object]:
    from pipelines.engine import Engine
    from pipelines.options import Options
    from pipelines.request import GenerationRequest
    from pipelines.settings import EngineSettings, Paths
    from webui import ray_pool
    from webui.job_queue import JobQueue
    from webui.pool import EnginePool

    figures: dict[str, object] = {"job": f"txt2img {steps} steps {size}x{size} on {MODEL}", "requests": count,
                                  "torch_threads_per_replica": threads}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_models(root / "models")
        paths = Paths(data_dir=root / "data", models_dir=root / "models", outputs_dir=root / "data" / "outputs")
        settings = EngineSettings(paths=paths, device="cpu")
        engine = Engine(settings)
        requests = [GenerationRequest(prompt="a photo of a cat", seed=k, steps=steps, width=size, height=size,
                                      sampler_name="Euler", checkpoint=MODEL, save_images=False)
                    for k in range(count)]
        started_ray = ray_pool.init_ray(num_cpus=max(sizes), object_store_mb=100, log_to_driver=False)
        try:
            for replicas_wanted in sizes:
                replicas = ray_pool.start_replicas(replicas_wanted, settings, Options(), {"dir": None},
                                                   threads=threads)
                pool = EnginePool(replicas, paths.outputs_dir)
                engine.executor = pool
                queue = JobQueue(slots=pool.size)
                try:
                    _run_batch(queue, engine, requests[:replicas_wanted])  # each replica loads the model
                    pool.timings.clear()
                    wall, _ = _run_batch(queue, engine, requests)
                finally:
                    pool.close()
                engine_s = [spent for spent, _ in pool.timings]
                overhead = [total - spent for spent, total in pool.timings]
                figures[f"replicas_{replicas_wanted}"] = {
                    "wall_seconds": round(wall, 3),
                    "jobs_per_second": round(count / wall, 3),
                    "replica_engine_seconds_mean": round(statistics.mean(engine_s), 3),
                    "overhead_ms_per_job_mean": round(1000 * statistics.mean(overhead), 1),
                    "overhead_ms_per_job_median": round(1000 * statistics.median(overhead), 1),
                }
        finally:
            if started_ray:
                ray_pool.shutdown_ray()
    one, two = figures.get("replicas_1"), figures.get("replicas_2")
    if isinstance(one, dict) and isinstance(two, dict):
        figures["throughput_ratio"] = round(one["wall_seconds"] / two["wall_seconds"], 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the figures as JSON (and writes them with --out)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="Requests sent at once.")
    parser.add_argument("--steps", type=int, default=20, help="Sampling steps.")
    parser.add_argument("--size", type=int, default=128, help="Width and height in pixels.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per CPU replica.")
    parser.add_argument("--out", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    write_figures(run(args.requests, args.steps, args.size, args.threads), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
