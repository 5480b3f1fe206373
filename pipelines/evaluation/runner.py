"""An evaluation run: candidates x prompts x seeds generated through the engine, then measured.

``run_evaluation(engine, spec)`` makes every image with the same seeds for every candidate and saves each with
its infotext under ``outputs/evaluations/<run>/images/<candidate>/``, writes ``run.json`` (the spec and the list
of images), then scores them (:func:`score_run`), which is also what re-scoring an existing folder does without
generating again. Progress and interrupt go through the job's :class:`~pipelines.job_control.JobControl`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image
from pydantic import BaseModel, Field, field_validator, model_validator

from pipelines.evaluation import metrics as m
from pipelines.evaluation.prompts import BUILTIN, BUILTIN_PROMPTS, EvalPrompt, read_prompt_set
from pipelines.evaluation.report import EvaluationReport, build_report, write_report
from pipelines.images.saving import embed_infotext
from pipelines.job_control import JobControl
from pipelines.processing import GenerationResult
from pipelines.request import GenerationRequest
from pipelines.settings import Paths

MetricName = Literal["clip_score", "fid", "kid", "inception_score", "ssim", "psnr"]
METRIC_NAMES: tuple[MetricName, ...] = ("clip_score", "fid", "kid", "inception_score", "ssim", "psnr")
#: Request fields a candidate may set (settings compared as columns).
CANDIDATE_FIELDS = ("sampler_name", "scheduler", "steps", "cfg_scale", "clip_skip", "vae", "negative_prompt",
                    "width", "height", "denoising_strength", "enable_hr", "hr_scale", "hr_upscaler")
RUN_FILE = "run.json"


class Candidate(BaseModel):
    """One column of the comparison: a checkpoint, optional prompt tags (``<lora:name:0.8>``) and settings."""

    name: str = Field(..., min_length=1, max_length=80, description="The column's name.")
    checkpoint: str | None = Field(None, description="Checkpoint title, file name or hash; None: the current one.")
    prompt_suffix: str = Field("", description="Appended to every prompt, e.g. LoRA tags '<lora:name:0.8>'.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Request fields for this candidate: "
                                     + ", ".join(CANDIDATE_FIELDS) + ".")

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(CANDIDATE_FIELDS))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(CANDIDATE_FIELDS)}")
        return value


class EvaluationSpec(BaseModel):
    """What to evaluate: candidates x prompts x seeds, the metrics, and what they compare against."""

    name: str = Field("", max_length=80, description="The run's folder name; empty: made from the time.")
    candidates: list[Candidate] = Field(..., min_length=1, description="The columns of the comparison.")
    prompt_set: str = Field(BUILTIN, description=f"'{BUILTIN}', or a .txt / .csv prompt file.")
    prompts: list[str] = Field(default_factory=list, description="Prompts given directly (instead of prompt_set).")
    max_prompts: int = Field(0, ge=0, description="Use only the first N prompts (0: all).")
    seeds: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, description="Seeds; the same for every "
                             "candidate.")
    metrics: list[MetricName] = Field(default_factory=lambda: list(METRIC_NAMES), min_length=1,
                                      description="Metrics to compute: " + ", ".join(m.METRICS) + ".")
    reference_dir: str | None = Field(None, description="Folder of reference images for FID and KID.")
    clip_model: str | None = Field(None, description="A folder in models/CLIP; None: the first one found.")
    negative_prompt: str = ""
    sampler_name: str = "Euler a"
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=1.0, le=30.0)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)

    @model_validator(mode="after")
    def _distinct_names(self) -> EvaluationSpec:
        names = [candidate.name for candidate in self.candidates]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"candidates: names must differ; repeated: {', '.join(twice)}")
        if not re.fullmatch(r"[\w .-]*", self.name) or self.name.strip(" .") == "" and self.name:
            raise ValueError("name: only letters, digits, spaces, '.', '_' and '-', and not only dots")
        return self

    def prompt_list(self) -> list[EvalPrompt]:
        if self.prompts:
            prompts = [EvalPrompt(text) for text in self.prompts if text.strip()]
        elif self.prompt_set == BUILTIN:
            prompts = list(BUILTIN_PROMPTS)
        else:
            prompts = read_prompt_set(self.prompt_set)
        return prompts[:self.max_prompts] if self.max_prompts else prompts

    def request(self, candidate: Candidate, prompt: EvalPrompt, seed: int) -> GenerationRequest:
        """The engine request of one cell (errors name ``candidates[i].settings...`` through pydantic)."""
        fields: dict[str, Any] = dict(prompt=f"{prompt.text} {candidate.prompt_suffix}".strip(),
                                      negative_prompt=self.negative_prompt, sampler_name=self.sampler_name,
                                      steps=self.steps, cfg_scale=self.cfg_scale, width=self.width,
                                      height=self.height, checkpoint=candidate.checkpoint, seed=seed,
                                      save_images=False)
        fields.update(candidate.settings)
        return GenerationRequest(**fields)


class Generator(Protocol):
    def __call__(self, request: GenerationRequest, *, control: JobControl | None = ...) -> GenerationResult: ...


@dataclass
class EvaluationResult:
    """A finished (or interrupted) run: its folder, the report and how long each part took."""

    folder: Path
    report: EvaluationReport | None
    interrupted: bool = False
    generation_seconds: float = 0.0
    scoring_seconds: float = 0.0
    messages: list[str] = field(default_factory=list)


def evaluations_dir(paths: Paths) -> Path:
    return paths.outputs_dir / "evaluations"


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "candidate"


def run_evaluation(engine: Any, spec: EvaluationSpec, control: JobControl | None = None,
                   generate: Generator | None = None) -> EvaluationResult:
    """Generate every candidate x prompt x seed with ``engine``, save them, then score the folder."""
    control = control or JobControl()
    generate = generate or engine.generate
    prompts = spec.prompt_list()
    requests = [(ci, pi, seed, spec.request(candidate, prompt, seed))
                for ci, candidate in enumerate(spec.candidates) for pi, prompt in enumerate(prompts)
                for seed in spec.seeds]
    for candidate in spec.candidates:  # every checkpoint name is resolved before the first image
        engine.plan(spec.request(candidate, prompts[0], spec.seeds[0]))
    name = spec.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = evaluations_dir(engine.paths) / name
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    started = time.monotonic()
    control.start_series(len(requests), "Evaluation: generating")
    interrupted = False
    for done, (ci, pi, seed, request) in enumerate(requests):
        if control.interrupted:
            interrupted = True
            break
        candidate = spec.candidates[ci]
        control.series_position(done, f"Evaluation: generating {candidate.name}, prompt {pi + 1}, seed {seed}")
        result = generate(request, control=control)
        if result.interrupted or not result.images:
            interrupted = True
            break
        relative = Path("images") / _slug(candidate.name) / f"p{pi:03d}-s{seed}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(embed_infotext(result.images[0], result.infotexts[0], "png"))
        images.append({"candidate": candidate.name, "prompt_index": pi, "prompt": prompts[pi].text, "seed": seed,
                       "path": relative.as_posix()})
    control.end_series()
    generation_seconds = time.monotonic() - started
    manifest = {"spec": spec.model_dump(mode="json"), "name": name,
                "prompts": [{"text": p.text, "category": p.category,
                             "reference": str(p.reference) if p.reference else None} for p in prompts],
                "images": images, "complete": not interrupted}
    (folder / RUN_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if interrupted:
        return EvaluationResult(folder, None, interrupted=True, generation_seconds=generation_seconds)
    result = score_run(folder, engine.paths, control, device=_device(engine))
    result.generation_seconds = generation_seconds
    return result


def _device(engine: Any) -> Any:
    try:
        return engine.models.device.device
    except AttributeError:
        return "cpu"


def _reference_images(folder: Path) -> list[Image.Image]:
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else []
    return [Image.open(path).convert("RGB") for path in files]


def score_run(folder: Path | str, paths: Paths, control: JobControl | None = None, *,
              metrics: list[str] | None = None, device: Any = "cpu",
              on_message: Callable[[str], None] | None = None) -> EvaluationResult:
    """Measure the images listed in ``folder/run.json`` (made by :func:`run_evaluation`) and write the report
    there: the table, chart, contact sheets, CSV and JSON. Nothing is generated; a metric whose weights or
    references are missing is left out with a message, the others run."""
    folder = Path(folder)
    control = control or JobControl()
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise ValueError(f"folder: {folder} holds no {RUN_FILE} (not an evaluation run)")
    manifest = json.loads(run_file.read_text(encoding="utf-8"))
    spec = EvaluationSpec(**manifest["spec"])
    wanted = list(metrics or spec.metrics)
    started = time.monotonic()
    messages: list[str] = []
    candidates = [c.name for c in spec.candidates]
    entries = manifest["images"]
    images = {entry["path"]: Image.open(folder / entry["path"]).convert("RGB") for entry in entries}
    references = {i: Path(p["reference"]) for i, p in enumerate(manifest["prompts"]) if p.get("reference")}
    per_image: dict[str, dict[str, list[float]]] = {c: {} for c in candidates}
    per_set: dict[str, dict[str, tuple[float, float | None]]] = {c: {} for c in candidates}
    total = len(entries) * 2 + len(candidates)
    control.start_series(total, "Evaluation: measuring")
    step = 0

    def tick(text: str) -> None:
        nonlocal step
        control.check()
        control.series_position(step, text)
        step += 1

    if "clip_score" in wanted:
        try:
            scorer = m.ClipScorer(m.find_clip_model(paths.model_dirs("clip"), spec.clip_model), device)
            for entry in entries:
                tick(f"CLIP score: {entry['path']}")
                per_image[entry["candidate"]].setdefault("clip_score", []).append(
                    scorer.score(images[entry["path"]], entry["prompt"]))
        except m.MissingWeights as error:
            messages.append(str(error))
    fidelity = [name for name in ("ssim", "psnr") if name in wanted]
    if fidelity:
        if not references:
            messages.append("SSIM and PSNR need reference images: a CSV prompt set with a 'reference' column.")
        for entry in entries:
            reference = references.get(entry["prompt_index"])
            if reference is None:
                continue
            with Image.open(reference) as ref:
                ref_rgb = ref.convert("RGB")
            for name in fidelity:
                value = (m.ssim if name == "ssim" else m.psnr)(images[entry["path"]], ref_rgb)
                per_image[entry["candidate"]].setdefault(name, []).append(value)
    inception = [name for name in m.PER_SET_METRICS if name in wanted]
    if inception:
        try:
            extractor = m.InceptionExtractor(m.find_inception_weights(paths.model_dirs("evaluation")), device)
            real = None
            needs_real = [name for name in inception if name in m.NEEDS_REFERENCE_FOLDER]
            if needs_real:
                refs = _reference_images(Path(spec.reference_dir)) if spec.reference_dir else []
                if len(refs) < 2:
                    messages.append("FID and KID need a reference folder (reference_dir) with at least 2 images"
                                    + (f"; {spec.reference_dir} has {len(refs)}." if spec.reference_dir else "."))
                else:
                    tick("Inception features: reference images")
                    real = extractor.extract(refs, on_batch=lambda done: control.check())
            for candidate in candidates:
                own = [images[e["path"]] for e in entries if e["candidate"] == candidate]
                tick(f"Inception features: {candidate}")
                features = extractor.extract(own, on_batch=lambda done: control.check())
                if "inception_score" in inception:
                    per_set[candidate]["inception_score"] = m.inception_score(features)
                if real is not None and len(features) >= 2:
                    if "fid" in inception:
                        per_set[candidate]["fid"] = (m.fid(real, features), None)
                    if "kid" in inception:
                        per_set[candidate]["kid"] = m.kid(real, features)
        except m.MissingWeights as error:
            messages.append(str(error))
    control.end_series()
    report = build_report(spec, manifest, per_image, per_set, messages)
    write_report(report, folder, {path: images[path] for path in images})
    return EvaluationResult(folder, report, scoring_seconds=time.monotonic() - started, messages=messages)
