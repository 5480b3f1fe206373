"""Prompt styles kept in A1111's ``styles.csv`` (columns name, prompt, negative_prompt; docs/compatibility.md §3)."""

from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.files import write_atomically

FIELDS = ("name", "prompt", "negative_prompt")
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    """One saved style."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_style_text(style_text: str, text: str) -> str:
    """Put ``text`` into ``style_text``'s ``{prompt}`` placeholder, or join the two with ", "."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


class StyleDatabase:
    """The styles of one CSV file; a missing file is an empty list until a style is saved."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._styles: dict[str, Style] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again (for edits made outside the app)."""
        styles: dict[str, Style] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8-sig", newline="") as handle:
                for row in csv.DictReader(handle):
                    name = (row.get("name") or "").strip()
                    if name:
                        styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
        with self._lock:
            self._styles = styles

    def styles(self) -> list[Style]:
        """All styles in file order."""
        return list(self._styles.values())

    def names(self) -> list[str]:
        """All style names in file order."""
        return list(self._styles)

    def get(self, name: str) -> Style | None:
        """The style called ``name``, or None."""
        return self._styles.get(name)

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        """Apply the named styles in order to a prompt and negative prompt.

        Raises ``KeyError`` naming every unknown style, so that a typo is not silently ignored.
        """
        unknown = [name for name in names if name not in self._styles]
        if unknown:
            raise KeyError(f"unknown style(s): {', '.join(unknown)}")
        for name in names:
            style = self._styles[name]
            prompt = merge_style_text(style.prompt, prompt)
            negative_prompt = merge_style_text(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def save(self, style: Style) -> None:
        """Add ``style``, or replace the style of the same name in place, and write the file."""
        if not style.name.strip():
            raise ValueError("a style needs a name")
        with self._lock:
            styles = dict(self._styles)
            styles[style.name] = style
            self._write(styles)
            self._styles = styles

    def delete(self, name: str) -> None:
        """Remove the style called ``name`` and write the file; ``KeyError`` if there is none."""
        with self._lock:
            if name not in self._styles:
                raise KeyError(f"unknown style: {name}")
            styles = {key: value for key, value in self._styles.items() if key != name}
            self._write(styles)
            self._styles = styles

    def _write(self, styles: dict[str, Style]) -> None:
        # Written atomically, so a crash never leaves a half-written styles.csv.
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=FIELDS)
        writer.writeheader()
        for style in styles.values():
            writer.writerow({"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt})
        write_atomically(self.path, text.getvalue().encode("utf-8"))
