"""Training datasets: image-caption pairs from a folder, checked file by file before any model work.

Two layouts are read:

- kohya's: images with a same-named ``.txt`` caption beside them, at the top of the folder (shown once per
  epoch) or in ``N_name/`` sub-folders whose images are shown N times per epoch;
- a ``metadata.jsonl`` or ``metadata.csv`` at the top of the folder with a ``file_name`` column and a text
  column (``text``, ``caption`` or ``prompt``), as diffusers' image-caption datasets have.

:func:`scan_dataset` never stops at a bad file: every unreadable image, missing caption or bad metadata row
is one :class:`DatasetProblem` naming the file, and every usable image gets its size and aspect-ratio bucket.
Buckets follow kohya's: sides are multiples of 64 between half and twice the resolution, the area at most
resolution², and each image goes to the bucket nearest its aspect ratio, so nothing is cropped square.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.prompts.parser import extract_extra_networks, parse_prompt_attention

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TEXT_COLUMNS = ("text", "caption", "prompt")
#: What to do about an image without a caption: leave it out (reported), or caption it with its file name.
MISSING_CAPTIONS = ("skip", "file name")
BUCKET_STEP = 64
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DatasetProblem:
    """One file that cannot be used as it is, and why."""

    file: str
    problem: str


@dataclass
class DatasetItem:
    """One usable image: where it is, its caption, how often an epoch shows it, its size and bucket."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # (width, height)
    bucket: tuple[int, int]  # (width, height)
    caption_from: str  # "txt", "metadata" or "file name"
    folder: str = ""  # the kohya sub-folder ("" at the top), for tag frequencies


@dataclass
class DatasetReport:
    """What :func:`scan_dataset` found: the usable images, the problems, and the buckets in use."""

    folder: Path
    resolution: int
    items: list[DatasetItem] = field(default_factory=list)
    problems: list[DatasetProblem] = field(default_factory=list)
    layout: str = "folder"  # "folder" (kohya .txt captions) or the metadata file's name

    @property
    def images_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        counts: Counter[tuple[int, int]] = Counter()
        for item in self.items:
            counts[item.bucket] += item.repeats
        return dict(sorted(counts.items()))

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per folder, how often each comma-separated caption tag occurs (kohya's ``ss_tag_frequency``)."""
        result: dict[str, Counter[str]] = {}
        for item in self.items:
            tags = [tag.strip() for tag in item.caption.split(",") if tag.strip()]
            result.setdefault(item.folder or self.folder.name, Counter()).update(tags)
        return {folder: dict(counts) for folder, counts in result.items()}

    def as_dict(self) -> dict:
        return {
            "folder": str(self.folder), "layout": self.layout, "resolution": self.resolution,
            "images": len(self.items), "images_per_epoch": self.images_per_epoch,
            "buckets": {f"{w}x{h}": n for (w, h), n in self.bucket_counts().items()},
            "items": [{"file": _relative(item.path, self.folder), "caption": item.caption, "repeats": item.repeats,
                       "size": list(item.size), "bucket": list(item.bucket), "caption_from": item.caption_from}
                      for item in self.items],
            "problems": [{"file": p.file, "problem": p.problem} for p in self.problems],
        }

    def summary(self) -> str:
        """A readable report: counts, buckets, then every problem by file."""
        lines = [f"{len(self.items)} usable images ({self.images_per_epoch} per epoch with repeats) in "
                 f"{self.folder} ({self.layout} layout), {len(self.problems)} problems."]
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.bucket_counts().items())
        if buckets:
            lines.append(f"Buckets at resolution {self.resolution}: {buckets}")
        lines += [f"- {p.file}: {p.problem}" for p in self.problems]
        return "\n".join(lines)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- buckets


def make_buckets(resolution: int, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """kohya's bucket list: (width, height), multiples of ``step`` from resolution/2 to resolution*2 with
    width*height <= resolution², both orientations, sorted by aspect ratio."""
    if resolution < step or resolution % step:
        raise ValueError(f"resolution: must be a multiple of {step} and at least {step}, got {resolution}")
    max_area = (resolution // step) ** 2
    min_size = max(step, (resolution // 2) // step * step)
    max_size = resolution * 2
    buckets = {(resolution, resolution)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // (width // step)) * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest that of ``size`` (width, height)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - math.log(ratio)), -wh[0] * wh[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], crop: str = "center",
                  rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Scale ``image`` to cover ``bucket`` and crop the (small) excess: centred, or at a random place for
    ``crop="random"``. Returns the picture and the crop's (top, left) in the scaled image (SDXL's condition)."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.convert("RGB").resize(scaled, Image.Resampling.LANCZOS)
    spare_x, spare_y = scaled[0] - width, scaled[1] - height
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return image.crop((left, top, left + width, top + height)), (top, left)


# --------------------------------------------------------------------------- captions


def plain_caption(text: str) -> str:
    """A caption as plain text of our prompt language: no ``<extra:networks>``, no ``(weights:1.2)`` or
    brackets, ``BREAK`` as a comma; what is left is what the text encoder sees."""
    text, _ = extract_extra_networks(text)
    pieces = [", " if weight == -1.0 and piece == "BREAK" else piece for piece, weight in parse_prompt_attention(text)]
    return re.sub(r"\s+", " ", "".join(pieces)).strip()


def process_caption(caption: str, rng: random.Random, *, shuffle: bool = False, keep_tokens: int = 0,
                    dropout: float = 0.0) -> str:
    """One step's caption: dropped to "" with probability ``dropout``; else, with ``shuffle``, its
    comma-separated tags after the first ``keep_tokens`` shuffled (kohya's ``--shuffle_caption``)."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


# --------------------------------------------------------------------------- the scan


def resolve_dataset_folder(folder: str | Path, roots: list[Path]) -> Path:
    """``folder`` as an existing directory inside one of ``roots`` (relative paths are taken from the first
    root); ValueError naming the field otherwise."""
    if not str(folder).strip():
        raise ValueError("dataset: give a folder of images")
    if not roots:
        raise ValueError("dataset: no folder is allowed for datasets")
    path = Path(folder).expanduser()
    path = (path if path.is_absolute() else roots[0] / path).resolve()
    allowed = [root.resolve() for root in roots]
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        raise ValueError(f"dataset: {folder} is outside the allowed folders ({', '.join(map(str, allowed))})")
    if not path.is_dir():
        raise ValueError(f"dataset: {path} is not a folder")
    return path


def _read_metadata(path: Path, problems: list[DatasetProblem]) -> list[tuple[str, str | None]]:
    """(file name, caption or None) rows of a metadata.jsonl / .csv; bad rows become problems."""
    rows: list[dict] = []
    try:
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    problems.append(DatasetProblem(f"{path.name}:{number}", f"not JSON ({error.msg})"))
                    continue
                if not isinstance(row, dict):
                    problems.append(DatasetProblem(f"{path.name}:{number}", "not a JSON object"))
                    continue
                rows.append({**row, "_line": number})
        else:
            with open(path, newline="", encoding="utf-8") as stream:
                rows = [{**row, "_line": number} for number, row in enumerate(csv.DictReader(stream), 2)]
    except (OSError, UnicodeDecodeError) as error:
        problems.append(DatasetProblem(path.name, f"cannot be read ({error})"))
        return []
    result = []
    for row in rows:
        where = f"{path.name}:{row['_line']}"
        name = row.get("file_name") or row.get("image")
        if not isinstance(name, str) or not name.strip():
            problems.append(DatasetProblem(where, "no file_name column"))
            continue
        text = next((row[c] for c in TEXT_COLUMNS if isinstance(row.get(c), str)), None)
        result.append((name.strip(), text))
    return result


def _candidates(folder: Path, problems: list[DatasetProblem]) -> tuple[str, list[tuple[Path, int, str, str | None]]]:
    """(layout, [(image path, repeats, kohya folder, caption from metadata or None)])."""
    for name in METADATA_FILES:
        meta = folder / name
        if meta.is_file():
            found = []
            for file_name, text in _read_metadata(meta, problems):
                path = (folder / file_name).resolve()
                if not path.is_relative_to(folder.resolve()):
                    problems.append(DatasetProblem(file_name, "points outside the dataset folder"))
                    continue
                found.append((path, 1, "", text))
            return name, found
    found_files: list[tuple[Path, int, str, str | None]] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            found_files.append((entry, 1, "", None))
        elif entry.is_dir():
            match = _REPEAT_FOLDER.match(entry.name)
            if not match or int(match.group(1)) < 1:
                problems.append(DatasetProblem(entry.name + "/", "folder left out: kohya sub-folders are named "
                                               "N_name (N = how often each image repeats per epoch)"))
                continue
            found_files += [(path, int(match.group(1)), entry.name, None) for path in sorted(entry.iterdir())
                            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
    return "folder", found_files


def scan_dataset(folder: Path, resolution: int = 512, *, missing_captions: str = "skip",
                 caption_extension: str = ".txt") -> DatasetReport:
    """Check every image of ``folder``: readable, captioned, its size and bucket. Never raises for one file."""
    if missing_captions not in MISSING_CAPTIONS:
        raise ValueError(f"missing_captions: must be one of {', '.join(MISSING_CAPTIONS)}, got {missing_captions!r}")
    buckets = make_buckets(resolution)
    report = DatasetReport(folder=folder, resolution=resolution)
    report.layout, candidates = _candidates(folder, report.problems)
    for path, repeats, kohya_folder, meta_caption in candidates:
        name = _relative(path, folder)
        try:
            with Image.open(path) as image:
                image.load()
                size = image.size
        except FileNotFoundError:
            report.problems.append(DatasetProblem(name, "file not found"))
            continue
        except Exception as error:  # any decoder error: the file is reported, the others go on
            report.problems.append(DatasetProblem(name, f"cannot be read as an image ({type(error).__name__})"))
            continue
        caption, source = meta_caption, "metadata"
        if report.layout == "folder":
            text_file = path.with_suffix(caption_extension)
            caption, source = None, "txt"
            if text_file.is_file():
                try:
                    caption = text_file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as error:
                    report.problems.append(DatasetProblem(_relative(text_file, folder), f"cannot be read ({error})"))
                    continue
        if caption is None:
            if missing_captions == "skip":
                missing = (f"{path.stem}{caption_extension} not found" if report.layout == "folder"
                           else f"{report.layout} gives no text")
                report.problems.append(DatasetProblem(name, f"no caption ({missing})"))
                continue
            caption, source = path.stem.replace("_", " "), "file name"
        bucket = nearest_bucket(size, buckets)
        report.items.append(DatasetItem(path, plain_caption(caption), repeats, size, bucket, source, kohya_folder))
    return report
