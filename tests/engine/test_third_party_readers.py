"""Images we write must read back in the tools people already use (docs/compatibility.md §1):
sd-parsers and unstable-reader (the library behind SD Prompt Reader)."""

from __future__ import annotations

import pytest
from PIL import Image
from sd_parsers import ParserManager
from unstable_reader import ImageMetadataExtractor

from pipelines.images.infotext import build_infotext, parse_infotext
from pipelines.images.saving import read_infotext, save_image

PROMPT = "a lighthouse on a cliff, (dramatic sky:1.2)\nhighly detailed"
NEGATIVE = "blurry, lowres\nwatermark, text"
PARAMS = {
    "Steps": 28,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 6.5,
    "Seed": 3056755576,
    "Size": "64x48",
    "Model hash": "540e663c24",
    "Model": "epicrealism",
    "Lora hashes": "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f",
    "Version": "test",
}
INFOTEXT = build_infotext(PROMPT, NEGATIVE, PARAMS)


def _saved(tmp_path, fmt: str):
    image = Image.new("RGB", (64, 48), (200, 120, 40))
    return save_image(image, tmp_path, seed=PARAMS["Seed"], infotext=INFOTEXT, fmt=fmt)


def test_the_infotext_under_test_has_the_a1111_shape():
    assert INFOTEXT.split("\n")[-1].startswith("Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5")
    assert '\nNegative prompt: blurry, lowres\nwatermark, text\n' in INFOTEXT


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_our_reader_round_trips(tmp_path, fmt):
    path = _saved(tmp_path, fmt)
    assert read_infotext(path) == INFOTEXT
    parsed = parse_infotext(read_infotext(path))
    assert parsed["Prompt"] == PROMPT and parsed["Negative prompt"] == NEGATIVE
    assert {key: parsed[key] for key in PARAMS} == PARAMS


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_sd_parsers_reads_our_images(tmp_path, fmt):
    info = ParserManager().parse(_saved(tmp_path, fmt))
    assert info is not None, "sd-parsers found no metadata"
    assert info.generator.value == "AUTOMATIC1111"
    assert info.full_prompt == PROMPT
    assert info.full_negative_prompt == NEGATIVE
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"scheduler": "Karras", "cfg_scale": "6.5", "seed": "3056755576", "steps": "28"}
    assert (sampler.model.name, sampler.model.hash) == ("epicrealism", "540e663c24")
    # sd-parsers splits the parameters line on every "," and ":" without honouring JSON quoting, so
    # a quoted value such as "Lora hashes" comes back torn (a reader limitation; A1111 writes the same
    # quoting). The pairs before it are intact; this is what it makes of the rest.
    assert info.metadata["Size"] == "64x48"
    assert info.metadata["Version"] == "test"
    assert "Lora hashes" not in info.metadata
    assert info.metadata["film"] == '0a1b2c3d4e5f"'


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_unstable_reader_reads_our_images(tmp_path, fmt):
    extractor = ImageMetadataExtractor(str(_saved(tmp_path, fmt)))
    extractor.extract_metadata()
    assert extractor.tool == "A1111 webUI"
    assert extractor.raw == INFOTEXT
    assert extractor.prompt == PROMPT
    assert extractor.negative == NEGATIVE
    assert extractor.seed == "3056755576"
    assert extractor.steps == "28"
    assert extractor.sampler == "DPM++ 2M"
    assert extractor.cfg == "6.5"
    assert extractor.model == "epicrealism"
    assert (extractor.width, extractor.height) == ("64", "48")


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_exif_user_comment_is_laid_out_as_piexif_writes_it(tmp_path, fmt):
    # A1111 writes JPEG/WebP metadata with piexif; piexif-based readers must find the same bytes,
    # typed UNDEFINED (Pillow's own writer would type it BYTE, which piexif returns as a tuple).
    pytest.importorskip("piexif")
    import piexif.helper

    with Image.open(_saved(tmp_path, fmt)) as image:
        exif = piexif.load(image.info["exif"])
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert comment == piexif.helper.UserComment.dump(INFOTEXT, encoding="unicode")
    assert piexif.helper.UserComment.load(comment) == INFOTEXT


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_unstable_reader_bug_with_some_latin1_letters_in_exif(tmp_path, fmt):
    # unstable-reader first decodes the UserComment as "utf-16" without a byte order mark, which
    # Python reads as little-endian; A1111 (and we) write big-endian as the EXIF spec and piexif do.
    # Letters U+00D8..U+00DF ("Ø", "ß", ...) then turn into lone surrogates, the decode raises and
    # unstable-reader gives up. A byte order mark would avoid it but would put U+FEFF in front of the
    # prompt for A1111, piexif and sd-parsers, so our writer stays as A1111's. PNG is unaffected.
    text = "Ørsted, Straße\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1"
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, seed=1, infotext=text, fmt=fmt)
    extractor = ImageMetadataExtractor(str(path))
    extractor.extract_metadata()
    assert extractor.prompt == ""
    assert read_infotext(path) == text
    assert ParserManager().parse(path).full_prompt == "Ørsted, Straße"
    png = save_image(Image.new("RGB", (8, 8)), tmp_path, seed=1, infotext=text, fmt="png")
    extractor = ImageMetadataExtractor(str(png))
    extractor.extract_metadata()
    assert extractor.prompt == "Ørsted, Straße"
