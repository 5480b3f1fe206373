"""The Extras job shared by the Extras tab and the extras API: upscale images, blend a second upscaler, restore
faces (GFPGAN, then CodeFormer, each blended in by its visibility: A1111's order), save.

Each output keeps the infotext of its source image, with A1111's postprocessing keys added
(``Postprocess upscale by``/``to``, ``Postprocess upscaler``, ``Postprocess upscaler 2``), so pasting
it still gives the generation parameters; face restoration adds ``GFPGAN visibility``, ``CodeFormer
visibility`` and ``CodeFormer weight``. Image upscalers run with the ``upscaler_tile`` and
``upscaler_tile_overlap`` options; results go to ``outdir_extras_samples`` (default
``outputs/extras-images/<date>/``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipelines.faces import FaceRestorers, MissingFaceModel
from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext, save_image
from pipelines.job_control import BatchSkipped, JobControl, JobInterrupted
from pipelines.models.weights import model_file_field
from pipelines.options import Options
from pipelines.paths import AllowedRoots, confine
from pipelines.upscaling.library import DEFAULT_OVERLAP, DEFAULT_TILE, Upscalers


@dataclass(frozen=True)
class ExtrasSettings:
    """What to do to each image: scale by ``scale`` (``resize_mode`` 0) or to ``width`` x ``height`` (1)."""

    resize_mode: int = 0
    scale: float = 2.0
    width: int = 512
    height: int = 512
    crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0

    def check(self, upscalers: Upscalers, faces: FaceRestorers | None = None) -> None:
        """Raise ValueError naming the field for a value the job cannot use (with ``faces``: also a face
        restorer asked for whose files are missing, naming the file and the folder)."""
        if self.resize_mode not in (0, 1):
            raise ValueError(f"resize_mode must be 0 (scale by) or 1 (scale to), got {self.resize_mode}")
        if self.resize_mode == 0 and not 0 < self.scale <= 8:
            raise ValueError(f"upscaling_resize must be between 0 and 8, got {self.scale}")
        if self.resize_mode == 1 and not (1 <= self.width <= 8192 and 1 <= self.height <= 8192):
            raise ValueError(f"upscaling_resize_w/h must be between 1 and 8192, got {self.width}x{self.height}")
        if not 0 <= self.upscaler_2_visibility <= 1:
            raise ValueError(f"extras_upscaler_2_visibility must be between 0 and 1, got {self.upscaler_2_visibility}")
        for field in ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(f"{field} must be between 0 and 1, got {getattr(self, field)}")
        for field, restorer in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
            if faces is not None and getattr(self, field) > 0:
                faces.check(restorer, field)  # MissingFaceModel, a ValueError
        for field, name in (("upscaler_1", self.upscaler_1), ("upscaler_2", self.upscaler_2)):
            try:
                upscalers.find(name)
            except LookupError:
                raise ValueError(f"{field}: no upscaler named {name!r}; choose one of "
                                 f"{', '.join(upscalers.names)}") from None

    @property
    def uses_second(self) -> bool:
        return self.upscaler_2 != "None" and self.upscaler_2_visibility > 0

    def params(self) -> dict[str, object]:
        """The postprocessing keys A1111 writes for these settings."""
        params: dict[str, object] = {}
        if self.resize_mode == 0:
            params["Postprocess upscale by"] = f"{self.scale:g}"
        else:
            params["Postprocess upscale to"] = f"{self.width}x{self.height}"
            params["Postprocess crop to fit"] = self.crop
        params["Postprocess upscaler"] = self.upscaler_1
        if self.uses_second:
            params["Postprocess upscaler 2"] = self.upscaler_2
            params["Postprocess upscaler 2 visibility"] = f"{self.upscaler_2_visibility:g}"
        if self.gfpgan_visibility > 0:
            params["GFPGAN visibility"] = round(self.gfpgan_visibility, 3)
        if self.codeformer_visibility > 0:
            params["CodeFormer visibility"] = round(self.codeformer_visibility, 3)
            params["CodeFormer weight"] = round(self.codeformer_weight, 3)
        return params


@dataclass
class ExtrasResult:
    """One processed image, its infotext, and where it was saved (None when not saved)."""

    image: Image.Image
    infotext: str
    path: Path | None


def extras_infotext(source: str | None, params: dict[str, object]) -> str:
    """``source`` with ``params`` appended to its parameters line (or as one when it has none)."""
    line = ", ".join(f"{key}: {value}" for key, value in params.items())
    if not source:
        return line
    parsed = parse_infotext(source)
    # When the last line is the parameters line, the parser has taken it out of the prompts.
    last = source.strip().splitlines()[-1].strip()
    has_params_line = last not in f"{parsed['Prompt']}\n{parsed['Negative prompt']}"
    return f"{source}, {line}" if has_params_line else f"{source}\n{line}"


def restore_faces_one(faces: FaceRestorers, image: Image.Image, settings: ExtrasSettings, *,
                      unload: bool = False) -> Image.Image:
    """``image`` with GFPGAN, then CodeFormer, blended in at their visibilities (0: that restorer is not run)."""
    for name, visibility, field in (("GFPGAN", settings.gfpgan_visibility, "gfpgan_visibility"),
                                    ("CodeFormer", settings.codeformer_visibility, "codeformer_visibility")):
        if visibility <= 0:
            continue
        with model_file_field(field):
            try:
                restored = faces.restore(image, name, codeformer_weight=settings.codeformer_weight, unload=unload)
            except MissingFaceModel as error:
                error.field = error.field or field
                raise
        image = restored if visibility >= 1 else Image.blend(image, restored.convert(image.mode), visibility)
    return image


def upscale_one(upscalers: Upscalers, image: Image.Image, settings: ExtrasSettings,
                control: JobControl | None = None, *, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """``image`` upscaled with upscaler 1, blended with upscaler 2's result at its visibility.

    ``tile``/``overlap`` are the model upscalers' tiling (the ``upscaler_tile`` options).
    """
    by_scale = settings.resize_mode == 0
    stop = control.check if control is not None else None

    def run(upscaler: str, field: str) -> Image.Image:
        with model_file_field(field):  # an unusable model file names the field that chose it
            if by_scale:
                return upscalers.upscale(image, upscaler, scale=settings.scale, tile=tile, overlap=overlap,
                                         should_stop=stop)
            return upscalers.upscale(image, upscaler, size=(settings.width, settings.height), crop=settings.crop,
                                     tile=tile, overlap=overlap, should_stop=stop)

    first = run(settings.upscaler_1, "upscaler_1")
    if not settings.uses_second:
        return first
    second = run(settings.upscaler_2, "upscaler_2")
    if second.mode != first.mode:
        second = second.convert(first.mode)
    return Image.blend(first, second, settings.upscaler_2_visibility)


#: The files "Batch from Directory" picks up.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_images(folder: str, roots: AllowedRoots, *, field: str = "input_dir") -> list[Path]:
    """The image files in ``folder`` (Extras' "Batch from Directory"), sorted by name.

    The folder must lie inside ``roots`` (:func:`pipelines.paths.confine`: relative to the data dir, no ``~``),
    and so must every file after its symbolic links are followed: a link to a file elsewhere is left out.
    ValueError naming ``field`` otherwise."""
    root = confine(folder, roots, field=field)
    if not root.is_dir():
        raise ValueError(f"{field}: {folder.strip()!r} is not a folder")
    images = []
    for path in sorted(root.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            images.append(confine(str(path), roots, field=field))
        except ValueError:
            continue  # a link leading outside the allowed folders
    return images


def open_image(path: str | Path) -> Image.Image:
    """The image in ``path``, fully read (its infotext kept) and the file closed; ValueError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def run_extras(upscalers: Upscalers, images: Iterable[Image.Image | str | Path], settings: ExtrasSettings,
               options: Options, outputs_dir: Path, control: JobControl | None = None, *,
               save: bool | None = None, faces: FaceRestorers | None = None) -> list[ExtrasResult]:
    """Process every image in turn, with the ``upscaler_tile``/``upscaler_tile_overlap`` options; saved
    (``Options.output_dir``) when ``save`` (default: the ``samples_save`` option) is true, in the
    ``samples_format`` format.

    Faces are restored after upscaling (``faces``: needed when a visibility is above 0), with the
    ``face_restoration_unload`` option. ``images`` may hold file paths: each is opened only when its turn
    comes and let go after it is saved, so a large folder is never all in memory (an unreadable one raises
    ValueError naming it).
    Interrupt (or skip) stops the job; the images finished by then are returned.
    """
    save = options.samples_save if save is None else save
    params = settings.params()
    results = []
    for item in images:
        if control is not None and control.interrupted:
            break
        image = item if isinstance(item, Image.Image) else open_image(item)
        infotext = extras_infotext(read_infotext(image), params)
        try:
            if control is not None:
                control.check()
            result = upscale_one(upscalers, image, settings, control, tile=options.upscaler_tile,
                                 overlap=options.upscaler_tile_overlap)
            if settings.gfpgan_visibility > 0 or settings.codeformer_visibility > 0:
                if faces is None:
                    raise ValueError("gfpgan_visibility / codeformer_visibility: no face restorers were given")
                if control is not None:
                    control.check()
                result = restore_faces_one(faces, result, settings, unload=options.face_restoration_unload)
        except (JobInterrupted, BatchSkipped):
            break
        path = None
        if save:
            seed = parse_infotext(infotext).get("Seed", 0)
            path = save_image(result, options.output_dir(outputs_dir, "extras"),
                              seed=seed if isinstance(seed, int) else 0, infotext=infotext,
                              fmt=options.samples_format)
        results.append(ExtrasResult(result, infotext, path))
    return results
