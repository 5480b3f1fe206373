"""styles.csv: read, apply, save atomically, delete (docs/compatibility.md §3)."""

from __future__ import annotations

import csv

import pytest

from pipelines.prompts.styles import Style, StyleDatabase, merge_style_text

A1111_FILE = (
    "name,prompt,negative_prompt\n"
    'cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing"\n'
    'sharp,"highly detailed, sharp focus",blurry\n'
    "empty,,\n"
)


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_FILE, encoding="utf-8")
    return path


def test_reads_an_a1111_file(styles_file):
    database = StyleDatabase(styles_file)
    assert database.names() == ["cinematic", "sharp", "empty"]
    assert database.get("sharp") == Style("sharp", "highly detailed, sharp focus", "blurry")
    assert database.get("missing") is None


def test_missing_file_is_empty(tmp_path):
    assert StyleDatabase(tmp_path / "styles.csv").styles() == []


@pytest.mark.parametrize(
    ("style_text", "text", "expected"),
    [
        ("cinematic still of {prompt}, film grain", "a cat", "cinematic still of a cat, film grain"),
        ("highly detailed", "a cat", "a cat, highly detailed"),
        ("highly detailed", "", "highly detailed"),
        ("", "a cat", "a cat"),
        ("{prompt}", "", ""),
        (" sharp ", " a cat ", "a cat, sharp"),
    ],
)
def test_merge(style_text, text, expected):
    assert merge_style_text(style_text, text) == expected


def test_apply_in_order(styles_file):
    database = StyleDatabase(styles_file)
    prompt, negative = database.apply("a cat", "ugly", ["cinematic", "sharp", "empty"])
    assert prompt == "cinematic still of a cat, film grain, highly detailed, sharp focus"
    assert negative == "ugly, cartoon, drawing, blurry"
    assert database.apply("a cat", "", []) == ("a cat", "")
    with pytest.raises(KeyError, match="nope"):
        database.apply("a cat", "", ["sharp", "nope"])


def test_save_replace_and_delete_write_the_file(styles_file):
    database = StyleDatabase(styles_file)
    database.save(Style("new, with comma", 'say "hi" {prompt}', "bad\nlines"))
    database.save(Style("sharp", "sharper", ""))
    assert [path.name for path in styles_file.parent.iterdir()] == ["styles.csv"]  # no temp file left
    reread = StyleDatabase(styles_file)
    assert reread.names() == ["cinematic", "sharp", "empty", "new, with comma"]
    assert reread.get("new, with comma") == Style("new, with comma", 'say "hi" {prompt}', "bad\nlines")
    assert reread.get("sharp").prompt == "sharper"
    with open(styles_file, encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == ["name", "prompt", "negative_prompt"]

    reread.delete("cinematic")
    assert StyleDatabase(styles_file).names() == ["sharp", "empty", "new, with comma"]
    with pytest.raises(KeyError):
        reread.delete("cinematic")
    with pytest.raises(ValueError, match="name"):
        reread.save(Style(" "))


def test_save_creates_the_file(tmp_path):
    path = tmp_path / "sub" / "styles.csv"
    StyleDatabase(path).save(Style("a", "b", "c"))
    assert StyleDatabase(path).styles() == [Style("a", "b", "c")]
