"""The ``parameters`` of ``/sdapi/v1/png-info`` as A1111's API answers them (docs/compatibility.md §1, §8).

The engine's :func:`~pipelines.images.infotext.parse_infotext` gives typed values for our own use (the UI's
paste, the X/Y/Z plot). A1111's API answers what its infotext parser leaves: values as text, a ``WxH``
value only as ``<key>-1``/``<key>-2`` (text too), and its defaults for keys the infotext leaves out, some
of them numbers. Clients that read png-info (and write it back into a request) expect exactly that.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# One "key: value" of the parameters line (A1111's key charset: word characters, space, "-" and "/").
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"

#: What A1111's parser sets when the infotext lacks the key, with A1111's types.
DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("Clip skip", "1"),
    ("Hires sampler", "Use same sampler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def _unquote(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def a1111_parameters(infotext: str) -> dict[str, Any]:
    """``infotext`` parsed the way A1111's API reports it (see the module docstring); "" gives the defaults."""
    *lines, last = infotext.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(_NEGATIVE_PREFIX):
            negative.append(line[len(_NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = _unquote(value)
        size = _SIZE_RE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    if "Hires resize-1" not in result:
        result["Hires resize-1"] = result["Hires resize-2"] = 0
    for key, default in DEFAULTS:
        result.setdefault(key, default)
    _old_hires_fix(result)
    return result


def _old_hires_fix(result: dict[str, Any]) -> None:
    """An old infotext's "First pass size" becomes the size, and its size the hires resize (A1111 does the same)."""
    first_w, first_h = result.get("First pass size-1"), result.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    width, height = int(result.get("Size-1", 512)), int(result.get("Size-2", 512))
    first_w, first_h = int(first_w), int(first_h)
    if first_w == 0 or first_h == 0:  # A1111's old default first pass: about 512x512 area, same aspect
        k = (512 * 512 / (width * height)) ** 0.5
        first_w, first_h = math.ceil(width * k / 64) * 64, math.ceil(height * k / 64) * 64
    result["Size-1"], result["Size-2"] = first_w, first_h
    result["Hires resize-1"], result["Hires resize-2"] = width, height
