"""Benchmark: the evaluation's feature extraction (images/s) and a whole evaluation against generation alone.

    python -m benchmarks.evaluate                       # real-size random SD 1.5, CLIP ViT-L/14, Inception; CPU
    python -m benchmarks.evaluate --size 256 --steps 10 --images 8
    python -m benchmarks.evaluate --device cuda --size 512 --steps 20

Every model has the real architecture and random weights (compute does not depend on the weight values):
a CLIP ViT-L/14 transformers folder (openai/clip-vit-large-patch14's shapes: 24 vision layers of width 1024,
patch 14 at 224 px, 12 text layers of width 768), torch-fidelity's InceptionV3 saved under the real file name
in ``models/evaluation/``, and a diffusers SD 1.5 folder built from the shipped configs.

Figures, all in one process and one run:

- ``clip_images_per_second``: CLIP scores (image + prompt) per second through :class:`ClipScorer`;
- ``inception_images_per_second``: images per second through :class:`InceptionExtractor` (resize to 299 px,
  pool features and logits), one batch of ``--images``;
- ``generation_alone_seconds``: the evaluation's requests (2 candidates x prompts x 1 seed) through
  ``Engine.generate`` directly, nothing saved or measured (the baseline);
- ``evaluation_seconds``: :func:`run_evaluation` of the same requests (generate, save with infotext, CLIP
  score, FID, KID, Inception Score against a reference folder, the report), split into its generation and
  scoring parts;
- ``overhead_ratio``: ``evaluation_seconds / generation_alone_seconds`` (1.0: measuring costs nothing);
- ``overhead_ratio_within_evaluation``: ``evaluation_seconds / evaluation_generation_seconds``, the same ratio
  with the generation timed inside the evaluation (less exposed to load changing between the two parts on a
  shared machine).

The ratio depends on how long one image takes: small, few-step images (the CPU default) make the metrics look
expensive; at 512 px and 20 steps generation dominates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = ("a photo of a red apple on a wooden table", "three cats sitting on a sofa",
           "a watercolour sketch of a mountain village", "a shop sign that says \"OPEN\"")


def write_clip_vit_l14(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIP folder with openai/clip-vit-large-patch14's architecture and random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipelines.models.checkpoints import shipped_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
                     "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
                       "hidden_act": "quick_gelu"},
        projection_dim=768)
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer: CLIPTokenizer = shipped_tokenizer("sd1")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                                 crop_size={"height": 224, "width": 224}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def pictures(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def run(size: int, steps: int, images: int, device: str) -> dict:
    from benchmarks.models import build_random_model
    from pipelines.engine import Engine
    from pipelines.evaluation import metrics as m
    from pipelines.evaluation.runner import Candidate, EvaluationSpec, run_evaluation
    from pipelines.request import GenerationRequest
    from pipelines.settings import EngineSettings, Paths
    from tests.fixtures.tiny_evaluation import write_random_inception

    work = Path(tempfile.mkdtemp(prefix="sd-bench-evaluate-"))
    try:
        clip_dir = write_clip_vit_l14(work / "CLIP" / "clip-vit-large-patch14-random")
        write_random_inception(work / "evaluation")
        model = build_random_model(work / "checkpoints", "sd15")
        reference = work / "reference"
        reference.mkdir()
        for number, image in enumerate(pictures(4, size, seed=1)):
            image.save(reference / f"{number}.png")
        paths = Paths(data_dir=work, models_dir=work / "models", outputs_dir=work / "outputs",
                      extra_dirs={"checkpoint": (model.parent,), "clip": (work / "CLIP",),
                                  "evaluation": (work / "evaluation",)})

        # feature extraction alone
        sample = pictures(images, size, seed=2)
        scorer = m.ClipScorer(clip_dir, device)
        scorer.score(sample[0], PROMPTS[0])  # warm-up
        start = time.perf_counter()
        for number, image in enumerate(sample):
            scorer.score(image, PROMPTS[number % len(PROMPTS)])
        clip_seconds = time.perf_counter() - start
        extractor = m.InceptionExtractor(m.find_inception_weights([work / "evaluation"]), device,
                                         batch_size=images)
        extractor.extract(sample[:1])  # warm-up
        start = time.perf_counter()
        extractor.extract(sample)
        inception_seconds = time.perf_counter() - start
        del scorer, extractor

        engine = Engine(EngineSettings(paths=paths, device=device))
        prompts = list(PROMPTS[:max(1, images // 2)])
        candidates = [Candidate(name="cfg7", checkpoint=model.name), Candidate(name="cfg4", checkpoint=model.name,
                                                                              settings={"cfg_scale": 4.0})]
        spec = EvaluationSpec(name="bench", candidates=candidates, prompts=prompts, seeds=[1], steps=steps,
                              width=size, height=size, sampler_name="Euler", reference_dir=str(reference),
                              metrics=["clip_score", "fid", "kid", "inception_score"])
        engine.generate(GenerationRequest(prompt="warm-up", steps=1, width=size, height=size, seed=0,
                                          checkpoint=model.name, save_images=False))
        # generation alone: the same requests, straight through the engine
        start = time.perf_counter()
        for candidate in spec.candidates:
            for prompt in spec.prompt_list():
                for seed in spec.seeds:
                    engine.generate(spec.request(candidate, prompt, seed))
        generation_alone = time.perf_counter() - start
        start = time.perf_counter()
        result = run_evaluation(engine, spec)
        evaluation = time.perf_counter() - start
        if result.report is None or result.messages:
            raise RuntimeError(f"the evaluation did not measure everything: {result.messages}")
        count = len(spec.candidates) * len(prompts) * len(spec.seeds)
        return {
            "clip_images_per_second": round(images / clip_seconds, 2),
            "inception_images_per_second": round(images / inception_seconds, 2),
            "generation_alone_seconds": round(generation_alone, 2),
            "evaluation_seconds": round(evaluation, 2),
            "evaluation_generation_seconds": round(result.generation_seconds, 2),
            "evaluation_scoring_seconds": round(result.scoring_seconds, 2),
            "overhead_ratio": round(evaluation / generation_alone, 3),
            "overhead_ratio_within_evaluation": round(evaluation / result.generation_seconds, 3),
            "setup": {"device": device, "threads": torch.get_num_threads(), "size": size, "steps": steps,
                      "sampler": "Euler", "images_per_evaluation": count, "feature_images": images,
                      "metrics": list(spec.metrics), "reference_images": 4, "clip": "ViT-L/14 (random weights)",
                      "inception": "torch-fidelity InceptionV3 (random weights)",
                      "model": "SD 1.5 (random weights)"},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="Image side for generation and features (128).")
    parser.add_argument("--steps", type=int, default=4, help="Sampling steps per image (4).")
    parser.add_argument("--images", type=int, default=4,
                        help="Images for the feature-extraction figures; the evaluation has 2 x images/2 (4).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="Write the figures as JSON to this file.")
    args = parser.parse_args(argv)
    figures = run(args.size, args.steps, args.images, args.device)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
