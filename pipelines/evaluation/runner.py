"""An evaluation run: candidates x prompts x seeds generated through the engine, then measured.

``run_evaluation(engine, spec)`` makes every image with the same seeds for every candidate and saves each with
its infotext under ``outputs/evaluations/<run>/images/<candidate>/``, writes ``run.json`` (the spec and the list
of images), then scores them (:func:`score_run`), which is also what re-scoring an existing folder does without
generating again. Progress and interrupt go through the job's :class:`~pipelines.job_control.JobControl`.

``spec.mode`` picks what a candidate makes from a prompt:

- ``txt2img``: an image from the prompt;
- ``img2img``: an image from the source image (the init image) and its prompt, with the candidate's settings
  (denoising strength, steps, checkpoint, ...); scored against the source (SSIM, PSNR, LPIPS);
- ``upscale``: the source shrunk by ``upscale_by`` (bicubic), brought back to the source's size by the
  candidate's ``upscaler`` (the Extras job's upscaling), and scored against the source.

Sources are the images a CSV prompt set names in its reference column, or the images of ``source_dir`` (each
with the prompt of the ``.txt`` caption beside it, else the first of ``prompts``, else none).
"""

from __future__ import annotations

import json
import math
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
from pipelines.job_control import JobControl, JobInterrupted
from pipelines.processing import GenerationResult
from pipelines.request import GenerationRequest, Img2ImgRequest
from pipelines.settings import Paths
from pipelines.upscaling.extras import ExtrasSettings, extras_infotext, upscale_one

MetricName = Literal["clip_score", "fid", "kid", "inception_score", "ssim", "psnr", "lpips"]
METRIC_NAMES: tuple[MetricName, ...] = ("clip_score", "fid", "kid", "inception_score", "ssim", "psnr", "lpips")
#: The metrics of a run that does not say which: every metric for txt2img, the fidelity ones otherwise.
FIDELITY_METRICS: tuple[MetricName, ...] = ("ssim", "psnr", "lpips")
Mode = Literal["txt2img", "img2img", "upscale"]
SOURCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Request fields a candidate may set (settings compared as columns).
CANDIDATE_FIELDS = ("sampler_name", "scheduler", "steps", "cfg_scale", "clip_skip", "vae", "negative_prompt",
                    "width", "height", "denoising_strength", "enable_hr", "hr_scale", "hr_upscaler", "resize_mode")
RUN_FILE = "run.json"


class Candidate(BaseModel):
    """One column of the comparison: a checkpoint, optional prompt tags (``<lora:name:0.8>``) and settings."""

    name: str = Field(..., min_length=1, max_length=80, description="The column's name.")
    checkpoint: str | None = Field(None, description="Checkpoint title, file name or hash; None: the current one.")
    prompt_suffix: str = Field("", description="Appended to every prompt, e.g. LoRA tags '<lora:name:0.8>'.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Request fields for this candidate: "
                                     + ", ".join(CANDIDATE_FIELDS) + ".")
    upscaler: str | None = Field(None, description="mode 'upscale': the upscaler this candidate is (a name from "
                                 "/sdapi/v1/upscalers, e.g. Lanczos or an ESRGAN model).")

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
    mode: Mode = Field("txt2img", description="txt2img: images from prompts; img2img: from the source images "
                       "with each candidate's settings; upscale: the sources shrunk by upscale_by and brought back "
                       "by each candidate's upscaler. img2img and upscale are scored against the sources.")
    candidates: list[Candidate] = Field(..., min_length=1, description="The columns of the comparison.")
    prompt_set: str = Field(BUILTIN, description=f"'{BUILTIN}', or a .txt / .csv prompt file.")
    prompts: list[str] = Field(default_factory=list, description="Prompts given directly (instead of prompt_set).")
    max_prompts: int = Field(0, ge=0, description="Use only the first N prompts (0: all).")
    seeds: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, description="Seeds; the same for every "
                             "candidate.")
    metrics: list[MetricName] = Field(default_factory=lambda: list(METRIC_NAMES), min_length=1,
                                      description="Metrics to compute: " + ", ".join(m.METRICS) + ".")
    reference_dir: str | None = Field(None, description="Folder of reference images for FID and KID.")
    source_dir: str | None = Field(None, description="img2img / upscale: a folder of source images (instead of a "
                                   "CSV prompt set's reference column); a NAME.txt beside NAME.png is its prompt.")
    upscale_by: float = Field(4.0, ge=1.0, le=8.0, description="upscale: how much the sources are shrunk before "
                              "each upscaler brings them back.")
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
        if self.mode == "upscale":
            for index, candidate in enumerate(self.candidates):
                if not candidate.upscaler:
                    raise ValueError(f"candidates[{index}].upscaler: mode 'upscale' needs an upscaler per candidate")
        if self.mode != "txt2img" and "metrics" not in self.model_fields_set:
            self.metrics = list(FIDELITY_METRICS)
        return self

    def prompt_list(self) -> list[EvalPrompt]:
        """The prompts (txt2img) or the sources with their prompts (img2img, upscale: each has a reference)."""
        if self.mode != "txt2img":
            return self.sources()
        if self.prompts:
            prompts = [EvalPrompt(text) for text in self.prompts if text.strip()]
        elif self.prompt_set == BUILTIN:
            prompts = list(BUILTIN_PROMPTS)
        else:
            prompts = read_prompt_set(self.prompt_set)
        return prompts[:self.max_prompts] if self.max_prompts else prompts

    def sources(self) -> list[EvalPrompt]:
        """img2img / upscale: the source images of ``source_dir`` (sorted by name), or the prompt set's rows that
        name a reference image. Raises ValueError naming the field when there is none."""
        if self.source_dir:
            folder = Path(self.source_dir)
            if not folder.is_dir():
                raise ValueError(f"source_dir: {self.source_dir!r} is not a folder")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SOURCE_SUFFIXES and p.is_file())
            fallback = next((text for text in self.prompts if text.strip()), "")
            sources = []
            for path in files:
                caption = path.with_suffix(".txt")
                text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else fallback
                sources.append(EvalPrompt(text, reference=path))
            if not sources:
                raise ValueError(f"source_dir: {self.source_dir!r} holds no image ({', '.join(SOURCE_SUFFIXES)})")
        else:
            rows = ([EvalPrompt(text) for text in self.prompts if text.strip()] if self.prompts
                    else list(BUILTIN_PROMPTS) if self.prompt_set == BUILTIN else read_prompt_set(self.prompt_set))
            sources = [row for row in rows if row.reference is not None]
            if not sources:
                raise ValueError(f"source_dir: mode {self.mode!r} needs source images: give source_dir, or a CSV "
                                 "prompt_set with a reference column")
        return sources[:self.max_prompts] if self.max_prompts else sources

    def request(self, candidate: Candidate, prompt: EvalPrompt, seed: int) -> GenerationRequest:
        """The engine request of one cell (errors name ``candidates[i].settings...`` through pydantic); for
        img2img an :class:`Img2ImgRequest` from the source, at the source's size (down to a multiple of 8)."""
        fields: dict[str, Any] = dict(prompt=f"{prompt.text} {candidate.prompt_suffix}".strip(),
                                      negative_prompt=self.negative_prompt, sampler_name=self.sampler_name,
                                      steps=self.steps, cfg_scale=self.cfg_scale, width=self.width,
                                      height=self.height, checkpoint=candidate.checkpoint, seed=seed,
                                      save_images=False)
        if self.mode == "img2img" and prompt.reference is not None:
            with Image.open(prompt.reference) as opened:
                source = opened.convert("RGB")
            fields.update(init_images=[source], width=max(64, source.width // 8 * 8),
                          height=max(64, source.height // 8 * 8))
            fields.update(candidate.settings)
            return Img2ImgRequest(**fields)
        fields.update(candidate.settings)
        return GenerationRequest(**fields)

    def run_seeds(self) -> list[int]:
        """The seeds images are made with: an upscaler has none, so an upscale run makes each image once."""
        return self.seeds[:1] if self.mode == "upscale" else list(self.seeds)


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
    cells = [(ci, pi, seed) for ci in range(len(spec.candidates)) for pi in range(len(prompts))
             for seed in spec.run_seeds()]
    for index, candidate in enumerate(spec.candidates):  # every name is resolved before the first image
        if spec.mode == "upscale":
            _find_upscaler(engine, candidate, index)
        else:
            engine.plan(spec.request(candidate, prompts[0], spec.seeds[0]))
    name = spec.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = evaluations_dir(engine.paths) / name
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    started = time.monotonic()
    control.start_series(len(cells), "Evaluation: generating")
    interrupted = False
    for done, (ci, pi, seed) in enumerate(cells):
        if control.interrupted:
            interrupted = True
            break
        candidate = spec.candidates[ci]
        control.series_position(done, f"Evaluation: generating {candidate.name}, prompt {pi + 1}, seed {seed}")
        if spec.mode == "upscale":
            try:
                with engine.device_lock:
                    image, infotext = _upscaled(engine, spec, candidate, prompts[pi], control)
            except JobInterrupted:
                interrupted = True
                break
        else:
            result = generate(spec.request(candidate, prompts[pi], seed), control=control)
            if result.interrupted or not result.images:
                interrupted = True
                break
            image, infotext = result.images[0], result.infotexts[0]
        relative = Path("images") / _slug(candidate.name) / f"p{pi:03d}-s{seed}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(embed_infotext(image, infotext, "png"))
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
    with engine.device_lock:  # the metrics' networks run on the engine's device, never beside a generation
        result = score_run(folder, engine.paths, control, device=_device(engine))
    result.generation_seconds = generation_seconds
    return result


def _find_upscaler(engine: Any, candidate: Candidate, index: int) -> None:
    try:
        engine.upscalers.find(candidate.upscaler or "")
    except LookupError:
        raise ValueError(f"candidates[{index}].upscaler: no upscaler named {candidate.upscaler!r}; choose one of "
                         f"{', '.join(engine.upscalers.names)}") from None


def _upscaled(engine: Any, spec: EvaluationSpec, candidate: Candidate, source: EvalPrompt,
              control: JobControl) -> tuple[Image.Image, str]:
    """The source shrunk by ``spec.upscale_by`` (bicubic) and brought back to its size by the candidate's upscaler
    through the Extras job's upscaling; the infotext holds the Extras keys."""
    assert source.reference is not None and candidate.upscaler is not None  # sources() and the spec check
    with Image.open(source.reference) as opened:
        original = opened.convert("RGB")
    small = original.resize((max(1, round(original.width / spec.upscale_by)),
                             max(1, round(original.height / spec.upscale_by))), Image.Resampling.BICUBIC)
    settings = ExtrasSettings(resize_mode=1, width=original.width, height=original.height, crop=False,
                              upscaler_1=candidate.upscaler)
    image = upscale_one(engine.upscalers, small, settings, control)
    return image, extras_infotext(None, {"Source": source.reference.name, "Shrunk by": f"{spec.upscale_by:g}",
                                         **settings.params()})


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
    total = len(entries) * 2 + len(candidates) + 1
    control.start_series(total, "Evaluation: measuring")
    step = 0

    def tick(text: str) -> None:
        nonlocal step
        control.check()
        control.series_position(step, text)
        step += 1

    if "clip_score" in wanted:
        try:
            clip_path = m.find_clip_model(paths.model_dirs("clip"), spec.clip_model)
            try:
                scorer = m.ClipScorer(clip_path, device)
            except Exception as error:  # a broken or unusable model: any loader error (safetensors, open_clip, ...)
                raise m.MissingWeights("clip_score", f"CLIP score left out: {clip_path} cannot be loaded: "
                                                     f"{error}") from error
            for entry in entries:
                tick(f"CLIP score: {entry['path']}")
                per_image[entry["candidate"]].setdefault("clip_score", []).append(
                    scorer.score(images[entry["path"]], entry["prompt"]))
        except m.MissingWeights as error:
            messages.append(str(error))
    fidelity = [name for name in m.NEEDS_REFERENCE_IMAGE if name in wanted]
    if fidelity and not references:
        messages.append(f"{', '.join(m.METRIC_LABELS[name] for name in fidelity)} need reference images: a CSV "
                        "prompt set with a 'reference' column, or an img2img / upscale run's sources.")
        fidelity = []
    lpips = None
    if "lpips" in fidelity:
        try:
            lpips = m.LpipsScorer(*m.find_lpips_weights(paths.model_dirs("evaluation")), device)
        except (m.MissingWeights, ValueError) as error:  # missing, or not the LPIPS weights (named)
            messages.append(str(error))
            fidelity.remove("lpips")
    for entry in entries if fidelity else []:
        reference = references.get(entry["prompt_index"])
        if reference is None:
            continue
        tick(f"Fidelity: {entry['path']}")
        with Image.open(reference) as ref:
            ref_rgb = ref.convert("RGB")
        image = images[entry["path"]]
        for name in fidelity:
            value = (m.ssim(image, ref_rgb) if name == "ssim" else m.psnr(image, ref_rgb) if name == "psnr"
                     else lpips.score(image, ref_rgb) if lpips is not None else math.nan)
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
