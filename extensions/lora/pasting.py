"""Pasting infotext back: LoRAs named in the prompt but missing here are found by their ``Lora hashes``."""

from __future__ import annotations

import re

from .library import LoraLibrary

_TAG = re.compile(r"<lora:([^:>]+)((?::[^>]*)?)>")
PROMPT_KEYS = ("Prompt", "Negative prompt")


def parse_hashes(value: object) -> dict[str, str]:
    """``"name: 12hex, name2: 12hex"`` -> {name: hash}; entries that do not parse are left out."""
    if not isinstance(value, str):
        return {}
    hashes: dict[str, str] = {}
    for entry in value.split(","):
        name, sep, short = entry.rpartition(":")
        if sep and name.strip() and short.strip():
            hashes[name.strip()] = short.strip().lower()
    return hashes


def resolve_by_hash(library: LoraLibrary, params: dict[str, object]) -> dict[str, object]:
    """Rewrite ``<lora:name:...>`` tags whose name is not found locally to the local file with the same hash.

    Tags whose name is found, or whose hash is not in ``Lora hashes``, or matches no local file, stay as they are.
    """
    hashes = parse_hashes(params.get("Lora hashes"))
    if not hashes:
        return params
    renamed: dict[str, str] = {}

    def local_name(name: str) -> str:
        if name not in renamed:
            renamed[name] = name
            if library.get(name) is None and name in hashes:
                found = library.find_by_hash(hashes[name])
                if found is not None:
                    renamed[name] = found.name
        return renamed[name]

    out = dict(params)
    for key in PROMPT_KEYS:
        text = out.get(key)
        if isinstance(text, str):
            out[key] = _TAG.sub(lambda m: f"<lora:{local_name(m.group(1))}{m.group(2)}>", text)
    return out
