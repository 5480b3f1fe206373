"""The value syntax of an X/Y/Z plot axis (as A1111 users write it).

- A comma-separated list, read as CSV so that a value may hold a comma when quoted: ``Euler, "a, b"``.
- For number axes, an item may be a range: ``1-5`` (step 1), ``1-10 (+2)`` (step 2; ``10-1 (-3)`` counts
  down), ``1-10 [5]`` (5 values evenly spaced, ends included). Negative numbers work: ``-5--1``.
"""

from __future__ import annotations

import csv
import io
import re

#: A range may not expand to more values than this (a typo like ``1-1000000`` should not hang the UI).
MAX_RANGE_VALUES = 1000

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_INT_RANGE = re.compile(rf"^({_INT})\s*-\s*({_INT})\s*(?:\(\s*({_INT})\s*\)|\[\s*(\d+)\s*\])?$")
_FLOAT_RANGE = re.compile(rf"^({_FLOAT})\s*-\s*({_FLOAT})\s*(?:\(\s*({_FLOAT})\s*\)|\[\s*(\d+)\s*\])?$")


def split_values(text: str) -> list[str]:
    """The comma-separated items of ``text`` (CSV quoting, whitespace stripped, empty items dropped)."""
    items: list[str] = []
    for row in csv.reader(io.StringIO(text.strip()), skipinitialspace=True):
        items.extend(item.strip() for item in row if item.strip())
    return items


def _number(text: str, kind: type) -> int | float:
    return kind(text.replace(" ", ""))


def _expand(start: float, end: float, step: float | None, count: int | None, kind: type, item: str) -> list:
    if count is not None:
        if count < 1:
            raise ValueError(f"{item!r}: the count in [ ] must be at least 1")
        if count > MAX_RANGE_VALUES:
            raise ValueError(f"{item!r}: at most {MAX_RANGE_VALUES} values per range")
        if count == 1:
            return [kind(start)]
        # int() truncates like A1111, so 1-10 [5] is 1, 3, 5, 7, 10.
        return [kind(round(start + (end - start) * i / (count - 1), 10)) for i in range(count)]
    if step is None:
        step = 1 if end >= start else -1
    if step == 0:
        raise ValueError(f"{item!r}: the step in ( ) must not be 0")
    length = int((end - start) / step + 1e-9) + 1
    if length <= 0:
        raise ValueError(f"{item!r}: a step of {step} never gets from {start} to {end}")
    if length > MAX_RANGE_VALUES:
        raise ValueError(f"{item!r}: expands to {length} values; at most {MAX_RANGE_VALUES} per range")
    return [kind(round(start + i * step, 10)) for i in range(length)]


def parse_numbers(text: str, kind: type) -> list[int] | list[float]:
    """The numbers ``text`` lists, ranges expanded; ``kind`` is int or float. ValueError names a bad item."""
    pattern = _INT_RANGE if kind is int else _FLOAT_RANGE
    values: list = []
    for item in split_values(text):
        match = pattern.match(item)
        if match:
            start, end, step, count = match.groups()
            values.extend(_expand(_number(start, kind), _number(end, kind),
                                  _number(step, kind) if step else None, int(count) if count else None, kind, item))
            continue
        try:
            values.append(_number(item, kind))
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{item!r} is not {what} or a range like 1-5, 1-10 (+2) or 1-10 [5]") from None
    return values
