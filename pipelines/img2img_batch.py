"""img2img Batch: every image of a folder through the same img2img (or inpaint) settings, as one job.

A1111's ``process_batch``: the images of the input directory (sub-folders included; .png .jpg .jpeg .webp
.tif .tiff), each run as an ordinary img2img job with the tab's settings and one seed for all (a random
seed is drawn once). With an output directory the results go there as ``NNNNN-<input name>.<ext>``
(``<input name>-<n>`` when a file makes several images), not in dated sub-folders; without one they are
saved as usual (``outputs/img2img-images/<date>/``). Every file is written atomically with its infotext.

- Inpaint batch mask directory: one file there is the mask of every image; otherwise each image takes the
  mask with its own name (``<stem>.*``), and an image without one is skipped.
- PNG info ("Append png info to prompts"): the chosen parameters are read from each input's infotext (or
  from the file of the same name in the PNG info directory): its prompt and negative prompt are appended
  to the tab's, seed / CFG scale / sampler / steps replace the tab's, and its model hash selects that
  checkpoint when one with that hash exists.

Every folder must lie inside the allowed folders (:func:`pipelines.paths.confine`); an error names the
field. A file that cannot be read, has no mask, or whose job is refused is reported by name and skipped;
the others still run. Interrupt stops the batch after the image being made (kept); Skip drops only that one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from pydantic import ValidationError

from pipelines.engine import Engine
from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from pipelines.job_control import JobControl
from pipelines.options import Options
from pipelines.paths import AllowedRoots, confine, confine_writable
from pipelines.processing import GenerationResult
from pipelines.request import Img2ImgRequest
from pipelines.sampling.seeds import resolve_seed

#: The files the input directory is searched for (A1111's list).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
#: What "Parameters to take from png info" offers (A1111's choices, in its order).
PNG_INFO_PROPS = ("Prompt", "Negative prompt", "Seed", "CFG scale", "Sampler", "Steps", "Model hash")
#: How many results the batch hands back to be shown (A1111's img2img_batch_show_results_limit default); the
#: rest are saved only, so a large folder is never all in memory.
SHOW_LIMIT = 32
#: The field names errors use: the Batch tab's labels.
FIELDS = {"input_dir": "Input directory", "output_dir": "Output directory",
          "inpaint_mask_dir": "Inpaint batch mask directory", "png_info_dir": "PNG info directory",
          "png_info_props": "Parameters to take from png info"}


@dataclass(frozen=True)
class BatchSettings:
    """The Batch tab's own fields (A1111's names without the ``img2img_batch_`` prefix)."""

    input_dir: str
    output_dir: str = ""
    inpaint_mask_dir: str = ""
    use_png_info: bool = False
    png_info_props: tuple[str, ...] = ()
    png_info_dir: str = ""


@dataclass(frozen=True)
class BatchFolders:
    """The checked folders of a batch: the input images in order, and where the rest lie (None: not used)."""

    images: list[Path]
    input_dir: Path
    output_dir: Path | None
    masks: list[Path]
    mask_dir: Path | None
    png_info_dir: Path | None


def _folder(text: str, roots: AllowedRoots, key: str) -> Path:
    label = FIELDS[key]
    folder = confine(text, roots, field=label)
    if not folder.is_dir():
        raise ValueError(f"{label}: {text.strip()!r} is not a folder")
    return folder


def _inside(path: Path, roots: AllowedRoots, key: str) -> Path | None:
    """``path`` after its links are followed, or None when that leads outside the allowed folders."""
    try:
        return confine(str(path), roots, field=FIELDS[key])
    except ValueError:
        return None


def check_batch(settings: BatchSettings, roots: AllowedRoots) -> BatchFolders:
    """Every folder of ``settings`` confined to ``roots`` and checked, the input images listed (sorted, sub-folders
    included, links leading outside left out); ValueError naming the field otherwise. Nothing is read yet."""
    if not settings.input_dir.strip():
        raise ValueError(f"{FIELDS['input_dir']}: give the folder whose images are processed")
    unknown = [name for name in settings.png_info_props if name not in PNG_INFO_PROPS]
    if unknown:
        raise ValueError(f"{FIELDS['png_info_props']}: unknown {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(PNG_INFO_PROPS)}")
    input_dir = _folder(settings.input_dir, roots, "input_dir")
    images = []
    for path in sorted(input_dir.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            resolved = _inside(path, roots, "input_dir")
            if resolved is not None and resolved.is_file():
                images.append(path)
    if not images:
        raise ValueError(f"{FIELDS['input_dir']}: no images ({', '.join(IMAGE_SUFFIXES)}) in "
                         f"{settings.input_dir.strip()!r}")
    output_dir = None
    if settings.output_dir.strip():
        output_dir = confine_writable(settings.output_dir, roots, field=FIELDS["output_dir"])
    mask_dir, masks = None, []
    if settings.inpaint_mask_dir.strip():
        mask_dir = _folder(settings.inpaint_mask_dir, roots, "inpaint_mask_dir")
        masks = [path for path in sorted(mask_dir.iterdir()) if path.is_file() and not path.name.startswith(".")
                 and _inside(path, roots, "inpaint_mask_dir") is not None]
    png_info_dir = None
    if settings.use_png_info and settings.png_info_dir.strip():
        png_info_dir = _folder(settings.png_info_dir, roots, "png_info_dir")
    return BatchFolders(images, input_dir, output_dir, masks, mask_dir, png_info_dir)


def read_image(path: Path) -> Image.Image:
    """The picture in ``path``, fully read, turned upright by its EXIF orientation, the file closed;
    ValueError with one sentence naming the file when it is not an image that can be read."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image.info = dict(opened.info)  # the infotext, for "Append png info"
            return image
    except Exception as error:  # noqa: BLE001 - whatever Pillow raises for a broken or foreign file
        # Pillow's message holds the full path; the user sees only the file's name.
        reason = str(error).split("\n")[0].replace(str(path), path.name) or type(error).__name__
        raise ValueError(f"{path.name}: not an image that can be read ({reason})") from None


def mask_for(image: Path, folders: BatchFolders) -> Path | None:
    """The mask of ``image``: the only file of the mask folder, else the one named like the image (``<stem>.*``)."""
    if len(folders.masks) == 1:
        return folders.masks[0]
    return next((mask for mask in folders.masks if mask.stem == image.stem), None)


def png_info_fields(engine: Engine, template: Mapping[str, Any], info_image: Image.Image | None,
                    props: tuple[str, ...]) -> dict[str, Any]:
    """The request fields taken from ``info_image``'s infotext for the chosen ``props``: prompts appended to the
    template's, the others replacing them; a model hash with no checkpoint of that hash is ignored."""
    text = read_infotext(info_image) if info_image is not None else None
    if not text:
        return {}
    parsed = parse_infotext(text)
    chosen = {key: parsed[key] for key in props if key in parsed}
    fields: dict[str, Any] = {}
    for key, name in (("Prompt", "prompt"), ("Negative prompt", "negative_prompt")):
        if str(chosen.get(key) or "").strip():
            base = str(template.get(name) or "")
            fields[name] = f"{base} {chosen[key]}" if base else str(chosen[key])
    for key, name in (("Seed", "seed"), ("CFG scale", "cfg_scale"), ("Sampler", "sampler_name"), ("Steps", "steps")):
        if key in chosen:
            fields[name] = chosen[key]
    if "Model hash" in chosen:
        try:
            fields["checkpoint"] = engine.models.resolve(str(chosen["Model hash"])).title
        except LookupError:
            pass
    return fields


@dataclass
class BatchReport:
    """How the batch went: the files done, the ones skipped with why, and whether Interrupt stopped it."""

    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one sentence per file, naming it
    interrupted: bool = False

    def notes(self) -> list[str]:
        lines = [f"img2img batch: {len(self.done)} of {self.total} image(s) processed."]
        if self.interrupted:
            lines.append("Interrupted: the images after the one being made were not processed.")
        lines.extend(f"Skipped {message}" for message in self.skipped)
        return lines


def batch_output_options(options: Options, output_dir: Path | None, stem: str, several: bool) -> Options:
    """The options one file's job saves with: into ``output_dir`` as ``NNNNN-<stem>[-n]`` (no dated folder),
    no grid; unchanged except for the grid without an output directory."""
    overrides: dict[str, Any] = {"grid_save": False}
    if output_dir is not None:
        # The pattern is the file's name; a "[" in it must not be read as a pattern tag.
        safe = stem.replace("[", "(").replace("]", ")")
        overrides.update(outdir_samples="", outdir_img2img_samples=str(output_dir),
                         samples_filename_pattern=f"{safe}-[generation_number]" if several else safe)
    return options.with_overrides(overrides)


def check_template(engine: Engine, template: Mapping[str, Any]) -> None:
    """Refuse, before the batch is queued, settings that would fail for every image (a bad size, a missing
    checkpoint or style): ValidationError / RequestError naming the field."""
    probe = Img2ImgRequest(**{**template, "init_images": [Image.new("RGB", (8, 8))]})
    engine.plan(probe)


def run_img2img_batch(engine: Engine, template: Mapping[str, Any], folders: BatchFolders, settings: BatchSettings,
                      control: JobControl | None = None, options: Options | None = None,
                      on_file: Callable[[int, Path], None] | None = None) -> tuple[GenerationResult, BatchReport]:
    """Run the batch (see the module doc). ``template`` holds the Img2ImgRequest fields of every job but the
    init image and mask. Returns the first :data:`SHOW_LIMIT` images as one result (every image is saved
    when the request saves) and the report of what was done and skipped."""
    started = time.monotonic()
    options = options or engine.options
    control = control or JobControl(preview_every=options.show_progress_every_n_steps)
    template = dict(template)
    template.pop("init_images", None)
    template.pop("mask", None)
    # One seed for the whole batch, as A1111's fix_seed: a random one is drawn once.
    rng = random.Random()
    template["seed"] = resolve_seed(int(template.get("seed", -1)), rng)
    template["subseed"] = resolve_seed(int(template.get("subseed", -1)), rng)
    n_iter = int(template.get("n_iter", 1))
    several = n_iter * int(template.get("batch_size", 1)) > 1
    report = BatchReport(total=len(folders.images))
    combined: GenerationResult | None = None
    control.start_series(len(folders.images) * n_iter, f"image 1 of {len(folders.images)}")
    try:
        for index, path in enumerate(folders.images):
            if control.interrupted:
                report.interrupted = True
                break
            control.series_position(index * n_iter, f"image {index + 1} of {len(folders.images)}")
            if on_file is not None:
                on_file(index, path)
            name = str(path.relative_to(folders.input_dir))
            try:
                fields = _file_fields(engine, template, path, folders, settings)
                request = Img2ImgRequest(**fields)
                file_options = batch_output_options(options, folders.output_dir, path.stem, several)
                result = engine.generate(request, control=control, options=file_options)
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                                     for e in error.errors())
                report.skipped.append(f"{name}: {problems}")
                continue
            except (ValueError, LookupError, OSError) as error:
                message = str(error)
                report.skipped.append(message if message.startswith(path.name) else f"{name}: {message}")
                continue
            report.done.append(name)
            if combined is None:
                combined = GenerationResult(request=request, model_title=result.model_title,
                                            job_timestamp=result.job_timestamp)
            shown = SHOW_LIMIT - len(combined.images)
            if shown > 0:
                part = GenerationResult(request=request, images=result.images[:shown],
                                        infotexts=result.infotexts[:shown], seeds=result.seeds[:shown],
                                        subseeds=result.subseeds[:shown], prompts=result.prompts[:shown],
                                        negative_prompts=result.negative_prompts[:shown])
                combined.extend(part)
            combined.paths.extend(result.paths)
            combined.warnings.extend(f"{name}: {warning}" for warning in result.warnings
                                     if f"{name}: {warning}" not in combined.warnings)
            if result.interrupted or control.interrupted:
                report.interrupted = True
                break
    finally:
        control.end_series()
    if combined is None:
        probe = Img2ImgRequest(**{**template, "init_images": [Image.new("RGB", (8, 8))]})
        combined = GenerationResult(request=probe)
    combined.interrupted = report.interrupted
    combined.seconds = time.monotonic() - started
    return combined, report


def _file_fields(engine: Engine, template: Mapping[str, Any], path: Path, folders: BatchFolders,
                 settings: BatchSettings) -> dict[str, Any]:
    """The request fields of one input file: its image (and mask), and what its PNG info contributes."""
    image = read_image(path)
    fields: dict[str, Any] = {**template, "init_images": [image]}
    if folders.mask_dir is not None and folders.masks:
        mask_path = mask_for(path, folders)
        if mask_path is None:
            raise ValueError(f"{path.name}: no mask named {path.stem}.* in the inpaint batch mask directory")
        try:
            fields["mask"] = read_image(mask_path)
        except ValueError as error:
            raise ValueError(f"{path.name}: its mask {error}") from None
    if settings.use_png_info:
        info_image: Image.Image | None = image
        if folders.png_info_dir is not None:
            # As A1111: PNG info that cannot be read adds nothing (the image itself is still processed).
            info_path = _inside(folders.png_info_dir / path.name, engine.roots, "png_info_dir")
            try:
                info_image = read_image(info_path) if info_path is not None and info_path.is_file() else None
            except ValueError:
                info_image = None
        fields.update(png_info_fields(engine, template, info_image, settings.png_info_props))
    return fields
