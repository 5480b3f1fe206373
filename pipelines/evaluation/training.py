""""Evaluate this run": an evaluation of a training run's saves against its base model.

:func:`training_evaluation` builds the :class:`~pipelines.evaluation.runner.EvaluationSpec`: the base checkpoint
as the first candidate, then one candidate per save, in the order they were written. A save inside a LoRA
folder is the base checkpoint with ``<lora:NAME:1>`` after every prompt; any other save (a full fine-tune's
checkpoint) is that checkpoint. The prompts are the run's sample prompts (the built-in set when it has none),
at its sample size and steps; the training images are the reference set of FID and KID.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pipelines.evaluation.prompts import BUILTIN
from pipelines.evaluation.runner import Candidate, EvaluationSpec, MetricName
from pipelines.training.settings import TrainingSettings

#: What "Evaluate this run" measures: prompt adherence, and closeness to the training images.
TRAINING_METRICS: tuple[MetricName, ...] = ("clip_score", "fid", "kid", "inception_score")
NAME_LENGTH = 80


def _candidate_name(stem: str) -> str:
    # Intermediate saves differ at the end (NAME-stepNNNNNNNN), so a long name keeps its tail.
    return stem if len(stem) <= NAME_LENGTH else stem[-NAME_LENGTH:]


def training_evaluation(settings: TrainingSettings, saves: Sequence[Path], lora_dirs: Sequence[Path], *,
                        dataset: Path | None = None, seeds: Sequence[int] = (1, 2),
                        base_name: str = "base") -> EvaluationSpec:
    """The evaluation of ``saves`` (a run's files, oldest first) against ``settings.checkpoint``.

    ``lora_dirs``: the LoRA folders (a save inside one is a LoRA); ``dataset``: the training images, the
    reference folder of FID and KID (None: those two are left out). Raises ValueError when there is no save."""
    unique = list(dict.fromkeys(Path(path) for path in saves))
    if not unique:
        raise ValueError(f"id: training run {settings.name!r} has no saved model to evaluate yet")
    lora_folders = {Path(folder).resolve() for folder in lora_dirs}
    extra = {"clip_skip": settings.clip_skip} if settings.clip_skip > 1 else {}
    candidates = [Candidate(name=base_name, checkpoint=settings.checkpoint, settings=extra)]
    for path in unique:
        name = _candidate_name(path.stem)
        if path.resolve().parent in lora_folders:
            candidates.append(Candidate(name=name, checkpoint=settings.checkpoint,
                                        prompt_suffix=f"<lora:{path.stem}:1>", settings=extra))
        else:
            candidates.append(Candidate(name=name, checkpoint=path.name, settings=extra))
    size = min(settings.sample_size or settings.resolution, 2048) // 8 * 8
    metrics = [name for name in TRAINING_METRICS if dataset is not None or name not in ("fid", "kid")]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return EvaluationSpec(
        name=f"{settings.name[:NAME_LENGTH - 21]}-eval-{stamp}", candidates=candidates,
        prompts=list(settings.sample_prompts), prompt_set=BUILTIN, seeds=list(seeds), metrics=metrics,
        reference_dir=str(dataset) if dataset is not None else None, steps=settings.sample_steps,
        width=max(64, size), height=max(64, size))
