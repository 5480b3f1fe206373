"""Benchmark: one training step of ours against the same step written as diffusers' example does it.

    python -m benchmarks.train                        # LoRA, real-size random SD 1.5, 128x128, CPU, 3 timed steps
    python -m benchmarks.train --size 256 --steps 5   # bigger / longer
    python -m benchmarks.train --model PATH           # any diffusers folder instead of random weights
    python -m benchmarks.train --method fine-tune     # full UNet fine-tuning (needs about 16 GB RAM per side
                                                      # for SD 1.5: float32 weights, gradients, AdamW moments)

Both sides train the same model (a real-size SD 1.5 diffusers folder with random weights, built from the
shipped configs; cost does not depend on weight values), batch 1, the same LoRA rank and alpha on the UNet's
attention projections, fp32, AdamW, on the same captioned images. Theirs follows diffusers'
``train_text_to_image_lora`` example: ``unet.add_adapter(LoraConfig(...))``, then every step VAE-encodes the
batch, encodes the caption, adds noise at a random timestep, predicts, takes the MSE, clips gradients and steps
AdamW. Ours is :func:`pipelines.training.trainer.train` through the engine (which caches latents and text
embeddings after their first use). Each side runs in its own process so that its peak resident memory
(``ru_maxrss``) is its own; the step time is the median of the steps after the first (warm-up).
``time_ratio_vs_diffusers`` is ours divided by theirs (lower is better).

``--method fine-tune`` compares full fine-tuning instead: theirs follows diffusers' ``train_text_to_image``
example (every UNet weight trainable in float32, the VAE and text encoder frozen, the same per-step encoding,
loss, clipping and AdamW); ours is ``train`` with ``method="fine-tune"`` (its final checkpoint and resume
state are written after the timed steps, into a scratch folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CAPTIONS = ("sks, a red circle on a grey wall", "sks, a blue square on a table")


def write_images(folder: Path, size: int) -> Path:
    """Two captioned random pictures (kohya layout) of ``size`` x ``size``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for number, caption in enumerate(CAPTIONS):
        pixels = (torch.rand((size, size, 3), generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image{number}.png")
        (folder / f"image{number}.txt").write_text(caption)
    return folder


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ours(model: Path, size: int, steps: int, rank: int, method: str = "lora") -> dict:
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from pipelines.training.settings import TrainingSettings
    from pipelines.training.trainer import train

    work = Path(tempfile.mkdtemp(prefix="sd-bench-train-"))
    models = work / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "Stable-diffusion").mkdir(parents=True)
    paths = Paths(data_dir=work, models_dir=models, outputs_dir=work / "outputs",
                  extra_dirs={"checkpoint": (model.resolve().parent,)})
    engine = Engine(EngineSettings(paths=paths, device="cpu"))
    dataset = write_images(work / "pictures", size)
    settings = TrainingSettings(name="bench", dataset="pictures", checkpoint=model.name, resolution=size,
                                steps=steps, rank=rank, alpha=rank, learning_rate=1e-4, batch_size=1, method=method)
    times: list[float] = []
    try:
        train(engine, settings, dataset, on_step=lambda state: times.append(time.perf_counter()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"step_seconds": times, "peak_rss_mb": _peak_mb()}


def theirs(model: Path, size: int, steps: int, rank: int, method: str = "lora") -> dict:
    """The step of diffusers' train_text_to_image_lora example, or of train_text_to_image for a fine-tune (no
    accelerate wrapper: one CPU process)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    if method == "lora":
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    else:
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=steps)
    scratch = Path(tempfile.mkdtemp(prefix="sd-bench-train-"))
    pictures = write_images(scratch, size)
    batches = []
    for number, caption in enumerate(CAPTIONS):
        with Image.open(pictures / f"image{number}.png") as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        pixel_values = (pixels.float() / 127.5 - 1).unsqueeze(0)
        input_ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids
        batches.append((pixel_values, input_ids))
    shutil.rmtree(scratch, ignore_errors=True)
    times = []
    unet.train()
    for step in range(steps):
        pixel_values, input_ids = batches[step % len(batches)]
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
    return {"step_seconds": times, "peak_rss_mb": _peak_mb()}


def _step_time(stamps: list[float]) -> float:
    """Median time of the steps after the first (which pays for warm-up and caches)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if not gaps:
        raise ValueError("steps: need at least 2 steps to time one")
    return statistics.median(gaps)


def _in_child(side: str, model: Path, size: int, steps: int, rank: int, method: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.train", "--side", side, "--model", str(model), "--size", str(size),
               "--steps", str(steps), "--rank", str(rank), "--method", method]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {side} side failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(model: Path | None, size: int, steps: int, rank: int, method: str = "lora") -> dict:
    if model is None:
        from benchmarks.models import build_random_model

        with tempfile.TemporaryDirectory(prefix="sd-bench-train-model-") as folder:
            return _figures(build_random_model(Path(folder), "sd15"), size, steps, rank, method)
    return _figures(model, size, steps, rank, method)


def _figures(model: Path, size: int, steps: int, rank: int, method: str = "lora") -> dict:
    sides = {side: _in_child(side, model, size, steps + 1, rank, method) for side in ("theirs", "ours")}
    figures = {side: {"seconds_per_step": round(_step_time(result["step_seconds"]), 3),
                      "peak_rss_mb": round(result["peak_rss_mb"])} for side, result in sides.items()}
    figures["time_ratio_vs_diffusers"] = round(figures["ours"]["seconds_per_step"]
                                               / figures["theirs"]["seconds_per_step"], 3)
    figures["setup"] = {"method": method, "model": str(model), "size": size, "timed_steps": steps, "batch": 1,
                        "rank": rank, "precision": "fp32", "device": "cpu", "threads": torch.get_num_threads()}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="A diffusers folder (default: real-size random SD 1.5).")
    parser.add_argument("--size", type=int, default=128, help="Image side (default 128).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per side, after one warm-up step.")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank).")
    parser.add_argument("--method", choices=("lora", "fine-tune"), default="lora",
                        help="lora (default) or fine-tune (the whole UNet).")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    parser.add_argument("--side", choices=("ours", "theirs"), help=argparse.SUPPRESS)  # one side, in a child
    args = parser.parse_args(argv)
    if args.side:
        if args.model is None:
            parser.error("--side needs --model")
        result = (ours if args.side == "ours" else theirs)(args.model, args.size, args.steps, args.rank,
                                                           args.method)
        print(json.dumps(result))
        return 0
    figures = run(args.model, args.size, args.steps, args.rank, args.method)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
