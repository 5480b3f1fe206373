"""Annotated image grids for the scripts that compare images (X/Y/Z plot, prompt matrix).

A grid is one image: the cells in rows and columns, with the column headings on top and the row headings
on the left. A heading is wrapped to its box and drawn in one font size that fits every heading, so the
labels stay readable whatever the cell size. :func:`combine_grids` puts several grids (one per Z value)
side by side under their own headings; :func:`save_grid` writes one to ``outputs/<mode>-grids/``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipelines.images.infotext import build_infotext
from pipelines.images.saving import dated_output_dir, save_image
from pipelines.options import Options

#: Font sizes in pixels: headings start at a size that suits the cell (MIN_FONT to MAX_FONT) and shrink, down
#: to FIT_FONT, until every word fits the cell's width; a word that still does not fit is broken.
MIN_FONT, MAX_FONT, FIT_FONT = 14, 48, 10
#: Headings and the space around them; an unfinished cell (interrupted plot) is drawn in EMPTY.
BACKGROUND, TEXT, INACTIVE_TEXT, EMPTY = (255, 255, 255), (0, 0, 0), (153, 153, 153), (200, 200, 200)


@dataclass(frozen=True)
class GridLabel:
    """One line of a heading; an inactive one (a prompt matrix part left out) is grey and struck through."""

    text: str
    active: bool = True


#: The lines of one column's or row's heading.
Heading = Sequence[GridLabel]


def labels(*texts: str) -> list[GridLabel]:
    """A heading of active lines."""
    return [GridLabel(text) for text in texts]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in scalable font: no font file to ship or find on the user's system.
    return ImageFont.load_default(size)


def _text_width(text: str, font) -> float:
    return font.getlength(text) if text else 0.0


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word longer than the width is broken between characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_width(candidate, font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if _text_width(line + char, font) > width and line:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _fits(headings: Sequence[Heading], font, width: int) -> bool:
    """Whether every word of every heading fits ``width`` without being broken."""
    return all(_text_width(word, font) <= width for heading in headings for label in heading
               for word in label.text.split())


def _pick_font(headings: Sequence[Heading], width: int, start: int):
    """The largest size from ``start`` down to FIT_FONT at which no word needs breaking."""
    size = start
    while size > FIT_FONT and not _fits(headings, _font(size), width):
        size -= 1
    return _font(size)


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _heading_height(heading: Heading, font, width: int) -> int:
    lines = sum(len(_wrap(label.text, font, width)) for label in heading)
    return lines * _line_height(font)


def _draw_heading(draw: ImageDraw.ImageDraw, heading: Heading, font, box: tuple[int, int, int, int]) -> None:
    """Draw ``heading`` centred in ``box`` (left, top, right, bottom), each line wrapped to the box width."""
    left, top, right, bottom = box
    width = right - left
    line_h = _line_height(font)
    wrapped = [(line, label.active) for label in heading for line in _wrap(label.text, font, width)]
    y = top + (bottom - top - len(wrapped) * line_h) / 2
    for line, active in wrapped:
        text_w = _text_width(line, font)
        x = left + (width - text_w) / 2
        draw.text((x, y), line, fill=TEXT if active else INACTIVE_TEXT, font=font)
        if not active:  # struck through, as A1111 shows the parts a prompt matrix cell leaves out
            middle = y + line_h / 2
            draw.line((x, middle, x + text_w, middle), fill=INACTIVE_TEXT, width=max(1, font.size // 12))
        y += line_h


def annotated_grid(cells: Sequence[Image.Image | None], cols: int, *, col_headings: Sequence[Heading] | None = None,
                   row_headings: Sequence[Heading] | None = None, margin: int = 0) -> Image.Image:
    """The ``cells`` (row by row, ``cols`` per row) in one image, headings on top and on the left.

    Every cell is as large as the largest image; None (a cell an interrupted plot did not make) is grey.
    ``margin`` pixels separate the cells. Headings are optional (A1111's "Draw legend"); when given there must
    be one per column / row.
    """
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    images = [cell for cell in cells if cell is not None]
    if not images:
        raise ValueError("annotated_grid needs at least one finished image")
    rows = math.ceil(len(cells) / cols)
    if col_headings is not None and len(col_headings) != cols:
        raise ValueError(f"{len(col_headings)} column headings for {cols} columns")
    if row_headings is not None and len(row_headings) != rows:
        raise ValueError(f"{len(row_headings)} row headings for {rows} rows")
    if margin < 0:
        raise ValueError(f"margin must not be negative, got {margin}")
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    start = max(MIN_FONT, min(MAX_FONT, (cell_w + cell_h) // 25))
    pad = max(4, start // 3)

    left_w = max(cell_w * 3 // 4, 10 * MIN_FONT) if row_headings else 0
    fonts = {}
    top_h = 0
    if col_headings:
        fonts["col"] = _pick_font(col_headings, cell_w - 2 * pad, start)
        top_h = max(_heading_height(h, fonts["col"], cell_w - 2 * pad) for h in col_headings) + 2 * pad
    if row_headings:
        fonts["row"] = font = _pick_font(row_headings, left_w - 2 * pad, start)
        # A row heading also has to fit the cell's height: smaller type before lines run past the cell.
        while font.size > FIT_FONT and max(_heading_height(h, font, left_w - 2 * pad) for h in row_headings) > cell_h:
            fonts["row"] = font = _font(font.size - 1)

    width = left_w + cols * cell_w + (cols - 1) * margin
    height = top_h + rows * cell_h + (rows - 1) * margin
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for index, cell in enumerate(cells):
        row, col = divmod(index, cols)
        x = left_w + col * (cell_w + margin)
        y = top_h + row * (cell_h + margin)
        if cell is None:
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=EMPTY)
            continue
        grid.paste(cell.convert("RGB"), (x + (cell_w - cell.width) // 2, y + (cell_h - cell.height) // 2))
    for col, heading in enumerate(col_headings or []):
        x = left_w + col * (cell_w + margin)
        _draw_heading(draw, heading, fonts["col"], (x + pad, pad, x + cell_w - pad, top_h - pad))
    for row, heading in enumerate(row_headings or []):
        y = top_h + row * (cell_h + margin)
        _draw_heading(draw, heading, fonts["row"], (pad, y, left_w - pad, y + cell_h))
    return grid


def combine_grids(grids: Sequence[Image.Image], headings: Sequence[Heading] | None = None, *,
                  margin: int = 0) -> Image.Image:
    """Several grids (one per Z value) in one image, each under its heading, side by side or one below the
    other, whichever is closer to square."""
    if not grids:
        raise ValueError("combine_grids needs at least one grid")
    if headings is not None and len(headings) != len(grids):
        raise ValueError(f"{len(headings)} headings for {len(grids)} grids")
    cell_w = max(g.width for g in grids)
    cell_h = max(g.height for g in grids)
    side_by_side = abs(math.log(len(grids) * cell_w / cell_h)) <= abs(math.log(cell_w / (len(grids) * cell_h)))
    start = max(MIN_FONT, min(MAX_FONT, (cell_w + cell_h) // 40))
    pad = max(4, start // 3)
    top_h = 0
    font = None
    if headings:
        font = _pick_font(headings, cell_w - 2 * pad, start)
        top_h = max(_heading_height(h, font, cell_w - 2 * pad) for h in headings) + 2 * pad
    block_h = top_h + cell_h
    count = len(grids)
    if side_by_side:
        size = (count * cell_w + (count - 1) * margin, block_h)
    else:
        size = (cell_w, count * block_h + (count - 1) * margin)
    combined = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(combined)
    for k, grid in enumerate(grids):
        x, y = (k * (cell_w + margin), 0) if side_by_side else (0, k * (block_h + margin))
        if headings:
            _draw_heading(draw, headings[k], font, (x + pad, y + pad, x + cell_w - pad, y + top_h - pad))
        combined.paste(grid.convert("RGB"), (x + (cell_w - grid.width) // 2, y + top_h))
    return combined


def infotext_with_params(infotext: str, params: Mapping[str, object]) -> str:
    """``infotext`` with ``params`` added to its parameters line (before ``Version``), quoted as infotext
    values are; e.g. the grid of a plot records ``Script: X/Y/Z plot, X Type: Seed, X Values: "1,2"``."""
    extra = build_infotext("", "", params)
    if not extra:
        return infotext
    head, _, last = infotext.rpartition("\n")
    if not last.startswith("Steps:"):
        return f"{infotext}\n{extra}" if infotext else extra
    before, marker, version = last.partition(", Version: ")
    line = f"{before}, {extra}{marker}{version}"
    return f"{head}\n{line}" if head else line


def save_grid(image: Image.Image, outputs_dir: Path, mode: str, *, seed: int, infotext: str,
              fmt: str | None = None, options: Options | None = None) -> Path:
    """Save a script's grid as ``<folder>/NNNNN-<seed>-grid.<fmt>`` with its infotext embedded (atomic,
    numbered like every saved image). With the job's ``options`` (``run_job.options``), the folder and format
    are the ``outdir_<mode>_grids`` and ``grid_format`` options; else ``outputs_dir/<mode>-grids/YYYY-MM-DD``
    and ``fmt`` (png)."""
    if options is not None:
        folder, fmt = options.output_dir(outputs_dir, mode, grids=True), fmt or options.grid_format
    else:
        folder = dated_output_dir(outputs_dir, mode, grids=True)
    return save_image(image, folder, seed=seed, infotext=infotext, fmt=fmt or "png", suffix="-grid")
