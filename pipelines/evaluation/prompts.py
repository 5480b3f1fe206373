"""Prompt sets: the built-in one, a text file (one prompt per line) or a CSV (``prompt`` column, optional
``reference`` column naming a reference image for SSIM / PSNR, relative to the CSV's folder)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a set; ``reference`` is the image SSIM and PSNR compare against, when the set gives one."""

    text: str
    category: str = ""
    reference: Path | None = None


#: Our own small set: objects, counts, colours, text in the picture and styles (a few of each).
BUILTIN_PROMPTS: tuple[EvalPrompt, ...] = (
    EvalPrompt("a photo of a red apple on a wooden table", "objects"),
    EvalPrompt("a bicycle leaning against a brick wall", "objects"),
    EvalPrompt("a lighthouse on a rocky coast at sunset", "objects"),
    EvalPrompt("three cats sitting on a sofa", "counts"),
    EvalPrompt("two cups of coffee side by side", "counts"),
    EvalPrompt("five balloons floating in a blue sky", "counts"),
    EvalPrompt("a blue car parked next to a yellow house", "colours"),
    EvalPrompt("a green umbrella and a purple chair", "colours"),
    EvalPrompt("a white horse in a field of orange flowers", "colours"),
    EvalPrompt("a shop sign that says \"OPEN\"", "text"),
    EvalPrompt("a birthday cake with the word \"HAPPY\" written on it", "text"),
    EvalPrompt("an oil painting of a harbour with fishing boats", "styles"),
    EvalPrompt("a watercolour sketch of a mountain village", "styles"),
    EvalPrompt("a pixel art castle, 16-bit video game style", "styles"),
    EvalPrompt("a pencil drawing of an old man reading a book", "styles"),
)

BUILTIN = "built-in"


def read_prompt_set(path: Path | str) -> list[EvalPrompt]:
    """The prompts of a ``.txt`` (one per line; blank lines and ``#`` comments skipped) or ``.csv`` file.

    A CSV needs a ``prompt`` column; ``reference`` (or ``reference_image``) names an image, relative to the CSV's
    folder; ``category`` is kept. Errors name the file and what is wrong (``prompt_file: ...``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt_file: {path} does not exist")
    if path.suffix.lower() == ".csv":
        prompts = _read_csv(path)
    elif path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [EvalPrompt(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        raise ValueError(f"prompt_file: {path.name} is neither .txt nor .csv")
    if not prompts:
        raise ValueError(f"prompt_file: {path} holds no prompt")
    return prompts


def _read_csv(path: Path) -> list[EvalPrompt]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "prompt" not in columns:
            raise ValueError(f"prompt_file: {path.name} has no 'prompt' column (columns: {', '.join(columns)})")
        ref_column = columns.get("reference") or columns.get("reference_image")
        prompts = []
        for line, row in enumerate(reader, start=2):
            text = (row.get(columns["prompt"]) or "").strip()
            if not text:
                continue
            reference = None
            if ref_column and (row.get(ref_column) or "").strip():
                reference = (path.parent / row[ref_column].strip()).resolve()
                if not reference.is_file():
                    raise ValueError(f"prompt_file: {path.name} line {line}: reference image {reference} not found")
            prompts.append(EvalPrompt(text, (row.get(columns.get("category", ""), "") or "").strip(), reference))
    return prompts
