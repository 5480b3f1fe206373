"""Image files: infotext in PNG/JPEG/WebP, output folders and names, grids, base64 (docs/compatibility.md §1, §3).

PNG keeps the infotext in a text chunk named ``parameters``; JPEG and WebP keep it in the EXIF
UserComment as ``b"UNICODE\\0"`` + UTF-16 big-endian text, the way A1111 writes it with piexif.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from pipelines.files import write_atomically

#: Output format name -> (Pillow format, file extension).
FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "png"),
    "jpg": ("JPEG", "jpg"),
    "jpeg": ("JPEG", "jpg"),
    "webp": ("WEBP", "webp"),
}

#: The modes that have an ``outputs/<mode>-images`` folder.
OUTPUT_MODES: tuple[str, ...] = ("txt2img", "img2img", "extras")

_USER_COMMENT_UNICODE = b"UNICODE\x00"
_USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"
# A JPEG APP1 segment holds at most 65533 bytes after its length field.
_JPEG_MAX_EXIF = 65533
_COUNTER_RE = re.compile(r"^(\d+)-")
_save_lock = threading.Lock()


# --- embedding and reading the infotext ----------------------------------------------------------


def _pillow_format(fmt: str) -> tuple[str, str]:
    try:
        return FORMATS[fmt.lower().lstrip(".")]
    except KeyError:
        raise ValueError(f"image format {fmt!r} is not supported; choose one of png, jpg, webp") from None


def _exif_with_user_comment(comment: bytes) -> bytes:
    """A minimal big-endian EXIF block: IFD0 -> Exif IFD -> UserComment (type UNDEFINED).

    Pillow's own Exif writer stores UserComment as BYTE, which piexif-based readers (A1111,
    unstable-reader) return as a tuple of ints and then fail to decode, so we lay it out ourselves.
    """
    ifd0_offset = 8
    exif_ifd_offset = ifd0_offset + 2 + 12 + 4  # entry count, one entry, next-IFD pointer
    data_offset = exif_ifd_offset + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_offset)
    tiff += struct.pack(">HHHII", 1, ExifTags.IFD.Exif, 4, 1, exif_ifd_offset) + struct.pack(">I", 0)
    tiff += struct.pack(">HHHII", 1, ExifTags.Base.UserComment, 7, len(comment), data_offset)
    tiff += struct.pack(">I", 0) + comment
    return b"Exif\x00\x00" + tiff


def embed_infotext(image: Image.Image, infotext: str, fmt: str, *, quality: int = 95, lossless: bool = False
                   ) -> bytes:
    """Encode ``image`` as png, jpg or webp bytes with ``infotext`` embedded.

    PNG: text chunk ``parameters`` (tEXt, or iTXt when the text is not Latin-1). JPEG/WebP: EXIF
    UserComment. An empty infotext embeds nothing. JPEG drops an alpha channel. ``quality`` applies
    to JPEG and WebP, ``lossless`` to WebP. Raises ValueError for an unknown format or an infotext too
    long for JPEG EXIF.
    """
    pil_format, _ = _pillow_format(fmt)
    # Image.save stores the encoder options on the image object itself, so two threads saving the
    # same image would swap metadata; each save works on its own copy.
    image = image.copy()
    buffer = io.BytesIO()
    if pil_format == "PNG":
        info = PngInfo()
        if infotext:
            try:
                infotext.encode("latin-1")
                info.add_text("parameters", infotext)
            except UnicodeEncodeError:
                info.add_itxt("parameters", infotext)
        image.save(buffer, "PNG", pnginfo=info)
        return buffer.getvalue()

    options: dict[str, object] = {"quality": quality}
    if pil_format == "WEBP" and lossless:
        options["lossless"] = True
    if infotext:
        exif = _exif_with_user_comment(_USER_COMMENT_UNICODE + infotext.encode("utf-16-be"))
        if pil_format == "JPEG" and len(exif) > _JPEG_MAX_EXIF:
            raise ValueError(f"infotext of {len(infotext)} characters is too long for JPEG EXIF "
                             f"(at most about {(_JPEG_MAX_EXIF - 60) // 2}); save as PNG or WebP")
        options["exif"] = exif
    if pil_format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


def _decode_user_comment(value: bytes | str) -> str:
    if isinstance(value, str):
        return value.rstrip("\x00")
    prefix, body = value[:8], value[8:]
    if prefix == _USER_COMMENT_UNICODE:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        elif len(body) >= 2 and body[0] != 0 and body[1] == 0:
            # No byte order mark and ASCII-looking little-endian units: some tools write LE.
            text = body.decode("utf-16-le", errors="replace")
        else:
            text = body.decode("utf-16-be", errors="replace")
    elif prefix == _USER_COMMENT_ASCII:
        text = body.decode("latin-1")
    else:
        text = body.decode("utf-8", errors="replace")
    return text.rstrip("\x00")


class _Opened:
    """Context manager giving a PIL image for any accepted source, closing it only if we opened it."""

    def __init__(self, source: Image.Image | bytes | str | os.PathLike):
        self._source = source
        self._opened: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        if isinstance(self._source, Image.Image):
            return self._source
        if isinstance(self._source, (bytes, bytearray)):
            self._opened = Image.open(io.BytesIO(self._source))
        else:
            self._opened = Image.open(self._source)
        return self._opened

    def __exit__(self, *exc_info: object) -> None:
        if self._opened is not None:
            self._opened.close()


def _text_chunks(image: Image.Image) -> dict[str, str]:
    # PNG text after the image data is only in `.text` (which reads to the end); `.info` holds the rest.
    chunks = {key: value for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
    chunks.update(getattr(image, "text", {}) or {})
    return chunks


def _user_comment(image: Image.Image) -> str | None:
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if comment is None:
        return None
    return _decode_user_comment(comment)


def read_infotext(source: Image.Image | bytes | str | os.PathLike) -> str | None:
    """The infotext stored in an image (PNG ``parameters`` chunk, else EXIF UserComment), or None.

    ``source`` is a PIL image, encoded image bytes or a file path. Raises PIL's
    UnidentifiedImageError (an OSError) when the bytes or file are not an image.
    """
    with _Opened(source) as image:
        text = _text_chunks(image).get("parameters")
        if text is None:
            text = _user_comment(image)
        return text or None


def read_image_metadata(source: Image.Image | bytes | str | os.PathLike) -> dict[str, str]:
    """Every readable text the image carries: PNG text chunks under their keys, then EXIF fields
    under their tag names (UserComment decoded). Binary EXIF values that are not text are left out."""
    with _Opened(source) as image:
        metadata = _text_chunks(image)
        exif = image.getexif()
        tags = dict(exif)
        for ifd in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
            tags.pop(ifd, None)
        tags.update(exif.get_ifd(ExifTags.IFD.Exif))
        for tag, value in tags.items():
            name = ExifTags.TAGS.get(tag, f"0x{tag:04x}")
            if tag == ExifTags.Base.UserComment:
                metadata[name] = _decode_user_comment(value)
            elif isinstance(value, bytes):
                try:
                    metadata[name] = value.decode("utf-8").rstrip("\x00")
                except UnicodeDecodeError:
                    continue
            elif not isinstance(value, dict):
                metadata[name] = str(value)
        return metadata


# --- files on disk -------------------------------------------------------------------------------


def dated_output_dir(outputs_dir: Path, mode: str, when: datetime | None = None, *, grids: bool = False) -> Path:
    """``outputs_dir/<mode>-images/YYYY-MM-DD`` (``<mode>-grids`` when ``grids``); not created here.

    ``mode`` is one of txt2img, img2img, extras; ``when`` defaults to now.
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode {mode!r} has no output folder; choose one of {', '.join(OUTPUT_MODES)}")
    day = (when or datetime.now()).strftime("%Y-%m-%d")
    return Path(outputs_dir) / f"{mode}-{'grids' if grids else 'images'}" / day


def next_counter(directory: Path) -> int:
    """One more than the highest ``NNNNN-`` counter among the file names in ``directory`` (0 if none)."""
    highest = -1
    if directory.is_dir():
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _COUNTER_RE.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
    return highest + 1



def save_image(
    image: Image.Image,
    directory: Path,
    *,
    seed: int,
    infotext: str,
    fmt: str = "png",
    suffix: str = "",
    quality: int = 95,
    lossless: bool = False,
    stem: str = "",
) -> Path:
    """Save ``image`` as ``directory/NNNNN-<stem><suffix>.<ext>`` with its infotext embedded; ``stem`` defaults
    to the seed (:func:`filename_from_pattern` makes one from A1111's ``samples_filename_pattern``).

    NNNNN is one more than the highest counter already in the folder. The file is written to a
    temporary name and renamed, so a reader never sees half a file and a failed encode leaves
    nothing behind; the folder is created if needed. Safe to call from several threads at once.
    """
    _, extension = _pillow_format(fmt)
    if "/" in suffix or "\\" in suffix or suffix in (".", ".."):
        raise ValueError(f"suffix {suffix!r} must not contain a path separator")
    stem = sanitize_filename(stem) if stem else str(seed)
    data = embed_infotext(image, infotext, fmt, quality=quality, lossless=lossless)  # before any file exists
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _save_lock:
        path = directory / f"{next_counter(directory):05d}-{stem}{suffix}.{extension}"
        write_atomically(path, data)
    return path


_UNSAFE_FILENAME = re.compile(r'[\x00-\x1f<>:"/\\|?*]')
_PATTERN_TAG = re.compile(r"\[(\w+)]")
#: The longest file name stem a pattern makes (A1111 cuts at 128 characters as well).
MAX_STEM = 128


def sanitize_filename(text: str) -> str:
    """``text`` made safe as a file name part: no path separators or characters Windows refuses, no leading or
    trailing dots and spaces, at most :data:`MAX_STEM` characters."""
    text = _UNSAFE_FILENAME.sub("_", text)[:MAX_STEM].strip(" .")
    return text or "_"


def filename_from_pattern(pattern: str, values: Mapping[str, object]) -> str:
    """A file name stem from A1111's ``samples_filename_pattern``: each ``[tag]`` whose value ``values`` has is
    replaced (``prompt_words``: the prompt's first 8 words; ``date``/``datetime`` are made here when absent);
    a tag with no value stays as written. Sanitized with :func:`sanitize_filename`."""
    now = datetime.now()
    prompt = str(values.get("prompt", ""))
    known: dict[str, object] = {"date": now.strftime("%Y-%m-%d"), "datetime": now.strftime("%Y%m%d%H%M%S"),
                                "prompt_spaces": prompt, "prompt_words": " ".join(re.findall(r"[^\s,()\[\]{}]+",
                                                                                            prompt)[:8]),
                                **values}

    def replace(match: re.Match) -> str:
        value = known.get(match.group(1).lower())
        return match.group(0) if value is None else str(value)

    return sanitize_filename(_PATTERN_TAG.sub(replace, pattern).replace("\n", " "))


# --- grids and base64 ----------------------------------------------------------------------------


def make_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """Paste images into one grid image, row by row.

    By default rows = round(sqrt(n)) and columns = ceil(n / rows), so the grid is close to square.
    Every cell has the size of the largest image; a smaller image sits centred in its cell on black.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    count = len(images)
    if rows is None:
        rows = max(1, round(math.sqrt(count)))
    if not 1 <= rows <= count:
        raise ValueError(f"rows must be between 1 and {count} (the number of images), got {rows}")
    cols = math.ceil(count / rows)
    rows = math.ceil(count / cols)  # drop rows that would stay empty
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    mode = "RGBA" if any(image.mode in ("RGBA", "LA", "PA") for image in images) else "RGB"
    grid = Image.new(mode, (cols * cell_w, rows * cell_h), "black")
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        x = col * cell_w + (cell_w - image.width) // 2
        y = row * cell_h + (cell_h - image.height) // 2
        grid.paste(image.convert(mode), (x, y))
    return grid


def decode_base64_image(data: str) -> Image.Image:
    """Decode a base64 image (PNG, JPEG, WebP, ...), with or without a ``data:image/...;base64,`` prefix.

    The pixels are loaded, so a truncated file fails here. Raises ValueError saying what is wrong.
    """
    text = data.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("data URL must look like 'data:image/png;base64,<data>'")
    if not text:
        raise ValueError("image data is empty")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ValueError(f"image data is not valid base64 ({error})") from None
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; here any image above the limit is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if limit and image.width * image.height > limit:
                raise ValueError(f"the image is {image.width}x{image.height} = {image.width * image.height} "
                                 f"pixels, more than the limit of {limit}")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"the image has more pixels than the limit of {limit} ({error})") from None
    except UnidentifiedImageError:
        raise ValueError("base64 data is not an image format Pillow can read") from None
    except OSError as error:
        raise ValueError(f"image data is damaged or truncated ({error})") from None
    return image


def encode_base64_png(image: Image.Image, infotext: str) -> str:
    """Raw base64 (no ``data:`` prefix) of a PNG of ``image`` with ``infotext`` embedded."""
    return base64.b64encode(embed_infotext(image, infotext, "png")).decode("ascii")


def encode_base64_image(image: Image.Image, infotext: str, fmt: str = "png", *, quality: int = 95,
                        lossless: bool = False) -> str:
    """Raw base64 of ``image`` as png, jpg or webp with ``infotext`` embedded (as A1111's API answers images:
    PNG text chunk, or EXIF UserComment for JPEG and WebP)."""
    return base64.b64encode(embed_infotext(image, infotext, fmt, quality=quality, lossless=lossless)).decode("ascii")
