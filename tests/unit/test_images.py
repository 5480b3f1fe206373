"""Image files: embedded infotext, output names, atomic saves, grids, base64."""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
from PIL import ExifTags, Image

from pipelines.images import saving as images
from pipelines.images.saving import (
    dated_output_dir,
    decode_base64_image,
    embed_infotext,
    encode_base64_png,
    make_grid,
    next_counter,
    read_image_metadata,
    read_infotext,
    save_image,
)

INFOTEXT = (
    "a red fox in snow\n"
    "Negative prompt: blurry\nugly\n"
    'Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 64x48, '
    'Lora hashes: "a: 0123456789ab, b: ba9876543210", Version: test'
)
UNICODE_INFOTEXT = "雪の中の狐 🦊\nNegative prompt: ぼやけ\nSteps: 5, Sampler: Euler, Seed: 1"


def _picture(size=(64, 48), mode="RGB") -> Image.Image:
    image = Image.new(mode, size)
    image.putdata([((x * 4) % 256, (y * 5) % 256, 128) + ((255,) if mode == "RGBA" else ())
                   for y in range(size[1]) for x in range(size[0])])
    return image


def test_png_uses_a_text_chunk_named_parameters():
    data = embed_infotext(_picture(), INFOTEXT, "png")
    assert b"tEXtparameters\x00" in data
    assert read_infotext(data) == INFOTEXT
    with Image.open(io.BytesIO(data)) as image:
        assert image.text["parameters"] == INFOTEXT
        assert image.size == (64, 48)


def test_png_uses_itxt_when_the_text_is_not_latin1():
    data = embed_infotext(_picture(), UNICODE_INFOTEXT, "png")
    assert b"iTXtparameters\x00" in data and b"tEXtparameters" not in data
    assert read_infotext(data) == UNICODE_INFOTEXT


@pytest.mark.parametrize("fmt", ["jpg", "jpeg", "webp", "JPG", ".webp"])
@pytest.mark.parametrize("text", [INFOTEXT, UNICODE_INFOTEXT])
def test_jpeg_and_webp_keep_the_infotext_in_exif_user_comment(fmt, text):
    data = embed_infotext(_picture(), text, fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format in ("JPEG", "WEBP")
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert comment == b"UNICODE\x00" + text.encode("utf-16-be")
    assert read_infotext(data) == text


def test_read_infotext_accepts_paths_strings_and_open_images(tmp_path):
    path = tmp_path / "x.webp"
    path.write_bytes(embed_infotext(_picture(), INFOTEXT, "webp"))
    assert read_infotext(path) == INFOTEXT
    assert read_infotext(str(path)) == INFOTEXT
    with Image.open(path) as image:
        assert read_infotext(image) == INFOTEXT


def test_read_infotext_without_metadata_is_none():
    for fmt in ("png", "jpg", "webp"):
        assert read_infotext(embed_infotext(_picture(), "", fmt)) is None
    assert read_infotext(_picture()) is None


def test_read_infotext_understands_other_user_comment_encodings():
    # Some tools write little-endian UTF-16 or ASCII UserComments; the reader copes with both.
    for comment in (b"UNICODE\x00" + b"\xff\xfe" + "a cat".encode("utf-16-le"),
                    b"UNICODE\x00" + "a cat".encode("utf-16-le"),
                    b"ASCII\x00\x00\x00a cat"):
        buffer = io.BytesIO()
        _picture().save(buffer, "JPEG", exif=images._exif_with_user_comment(comment))
        assert read_infotext(buffer.getvalue()) == "a cat"


def test_read_image_metadata_lists_text_chunks_and_exif():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", INFOTEXT)
    info.add_text("postprocessing", "Postprocess upscale by: 2")
    buffer = io.BytesIO()
    _picture().save(buffer, "PNG", pnginfo=info)
    assert read_image_metadata(buffer.getvalue()) == {
        "parameters": INFOTEXT,
        "postprocessing": "Postprocess upscale by: 2",
    }
    jpeg_metadata = read_image_metadata(embed_infotext(_picture(), UNICODE_INFOTEXT, "jpg"))
    assert jpeg_metadata["UserComment"] == UNICODE_INFOTEXT


def test_jpeg_drops_alpha_and_rejects_text_too_long_for_exif():
    data = embed_infotext(_picture(mode="RGBA"), INFOTEXT, "jpg")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
    with pytest.raises(ValueError, match="too long for JPEG"):
        embed_infotext(_picture(), "x" * 40000, "jpg")
    assert read_infotext(embed_infotext(_picture(), "x" * 40000, "webp")) == "x" * 40000


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="'gif' is not supported"):
        embed_infotext(_picture(), INFOTEXT, "gif")


# --- files ---------------------------------------------------------------------------------------


def test_dated_output_dir():
    when = datetime(2024, 3, 9, 23, 59)
    assert dated_output_dir(Path("/o"), "txt2img", when) == Path("/o/txt2img-images/2024-03-09")
    assert dated_output_dir(Path("/o"), "img2img", when, grids=True) == Path("/o/img2img-grids/2024-03-09")
    assert dated_output_dir(Path("/o"), "extras").name == datetime.now().strftime("%Y-%m-%d")
    with pytest.raises(ValueError, match="'inpaint'"):
        dated_output_dir(Path("/o"), "inpaint")


def test_save_image_numbers_files_after_the_highest_counter(tmp_path):
    folder = tmp_path / "outputs" / "txt2img-images" / "2024-01-01"
    first = save_image(_picture(), folder, seed=42, infotext=INFOTEXT)
    assert first == folder / "00000-42.png"
    assert read_infotext(first) == INFOTEXT
    (folder / "00041-7.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not counted")
    second = save_image(_picture(), folder, seed=43, infotext=INFOTEXT, fmt="jpg", suffix="-hires")
    assert second.name == "00042-43-hires.jpg"
    assert read_infotext(second) == INFOTEXT
    assert next_counter(folder) == 43
    assert next_counter(tmp_path / "missing") == 0


def test_save_image_leaves_nothing_behind_when_encoding_fails(tmp_path):
    with pytest.raises(ValueError, match="too long"):
        save_image(_picture(), tmp_path / "out", seed=1, infotext="x" * 40000, fmt="jpg")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_save_image_leaves_nothing_behind_when_the_write_fails(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(images.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_image(_picture(), tmp_path, seed=1, infotext=INFOTEXT)
    assert list(tmp_path.iterdir()) == []


def test_save_image_rejects_suffix_with_a_path():
    with pytest.raises(ValueError, match="path separator"):
        save_image(_picture(), Path("/tmp"), seed=1, infotext="", suffix="/../x")


def test_concurrent_saves_get_distinct_names(tmp_path):
    picture = _picture((16, 16))

    def save_five(seed: int) -> list[Path]:
        return [save_image(picture, tmp_path, seed=seed, infotext=f"seed {seed}") for _ in range(5)]

    with ThreadPoolExecutor(max_workers=6) as pool:
        saved = [path for paths in pool.map(save_five, range(6)) for path in paths]
    assert len(set(saved)) == 30
    assert sorted(int(path.name[:5]) for path in saved) == list(range(30))
    assert sorted(os.listdir(tmp_path)) == sorted(path.name for path in saved)  # no temp files left
    for path in saved:
        assert read_infotext(path) == f"seed {path.stem.split('-')[1]}"


# --- grids ---------------------------------------------------------------------------------------


def _solid(color, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.mark.parametrize(("count", "grid_size"), [(1, (8, 6)), (2, (16, 6)), (3, (16, 12)), (4, (16, 12)),
                                                  (5, (24, 12)), (9, (24, 18))])
def test_grid_is_near_square(count, grid_size):
    grid = make_grid([_solid((i * 20, 0, 0)) for i in range(count)])
    assert grid.size == grid_size
    cols = grid_size[0] // 8
    for i in range(count):
        row, col = divmod(i, cols)
        assert grid.getpixel((col * 8 + 4, row * 6 + 3)) == (i * 20, 0, 0)


def test_grid_with_explicit_rows_and_empty_cells_black():
    grid = make_grid([_solid("white")] * 3, rows=3)
    assert grid.size == (8, 18)
    grid = make_grid([_solid("white")] * 3, rows=2)
    assert grid.size == (16, 12)
    assert grid.getpixel((12, 9)) == (0, 0, 0)


def test_grid_centres_smaller_images_in_equal_cells():
    grid = make_grid([_solid("red", (10, 10)), _solid("blue", (4, 4))], rows=1)
    assert grid.size == (20, 10)
    assert grid.getpixel((15, 5)) == (0, 0, 255)
    assert grid.getpixel((11, 1)) == (0, 0, 0)


def test_grid_refuses_nonsense():
    with pytest.raises(ValueError, match="at least one"):
        make_grid([])
    with pytest.raises(ValueError, match="rows must be between 1 and 2"):
        make_grid([_solid("red")] * 2, rows=3)


# --- base64 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_decode_base64_with_and_without_data_url(fmt):
    encoded = base64.b64encode(embed_infotext(_picture(), INFOTEXT, fmt)).decode()
    for data in (encoded, f"data:image/{fmt};base64,{encoded}", f"  {encoded}\n"):
        image = decode_base64_image(data)
        assert image.size == (64, 48)
        assert read_infotext(image) == INFOTEXT


def test_decode_base64_names_the_problem():
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64_image("this is not base64!")
    with pytest.raises(ValueError, match="not an image"):
        decode_base64_image(base64.b64encode(b"hello world").decode())
    with pytest.raises(ValueError, match="empty"):
        decode_base64_image("data:image/png;base64,")
    with pytest.raises(ValueError, match="data URL"):
        decode_base64_image("data:image/png,abcd")
    whole = embed_infotext(_picture(), "", "png")
    truncated = whole[: len(whole) // 2]
    with pytest.raises(ValueError, match="damaged or truncated"):
        decode_base64_image(base64.b64encode(truncated).decode())


def test_encode_base64_png_is_raw_base64_with_infotext():
    encoded = encode_base64_png(_picture(), INFOTEXT)
    assert not encoded.startswith("data:")
    raw = base64.b64decode(encoded)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_infotext(raw) == INFOTEXT
    assert decode_base64_image(encoded).getpixel((5, 7)) == _picture().getpixel((5, 7))


def test_reencoding_a_read_image_keeps_only_the_new_infotext():
    for source_fmt in ("png", "jpg", "webp"):
        image = decode_base64_image(base64.b64encode(embed_infotext(_picture(), "old", source_fmt)).decode())
        for fmt in ("png", "jpg", "webp"):
            assert read_infotext(embed_infotext(image, "", fmt)) is None
            assert read_infotext(embed_infotext(image, "new", fmt)) == "new"
