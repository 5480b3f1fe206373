"""Infotext: the A1111 "PNG info" text that records how an image was made (docs/compatibility.md §1).

Layout::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...

:func:`build_infotext` writes it, :func:`parse_infotext` reads it back into infotext keys, and one
table (:data:`_TABLE`) maps infotext keys to request fields in both directions
(:func:`infotext_params_from_fields`, :func:`request_fields_from_infotext`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, SupportsIndex, SupportsInt

#: Keys that come first, in this order; every other key follows in insertion order, then "Version".
STANDARD_KEYS: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Clip skip",
    "RNG",
    "Tiling",
)

#: Schedule types an old-style sampler name ("DPM++ 2M Karras") may end with. Kept here rather than
#: imported from ``samplers`` so that reading metadata never imports diffusers; a test checks the
#: two lists agree.
SCHEDULE_LABELS: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                                   "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")

#: Values of keys that are missing from an infotext (A1111 writes them only when not the default).
PARSE_DEFAULTS: Mapping[str, object] = {"Clip skip": 1, "Schedule type": "Automatic", "RNG": "GPU"}

_NEGATIVE_PREFIX = "Negative prompt:"

# One `key: value` pair of the parameters line; a value is either a JSON string or runs to the next comma.
_PAIR_RE = re.compile(r'\s*(\w[^,:"\n]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*?)\s*(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_INT_RE = re.compile(r"^-?\d+$")
_FLOAT_RE = re.compile(r"^-?\d+\.\d+$")


# --- writing -------------------------------------------------------------------------------------


def _format_value(value: object) -> str:
    # A1111 writes whole numbers without ".0" ("CFG scale: 7").
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    # Quote what would otherwise break the line apart, and what would be mistaken for a quoted
    # value or lose its surrounding spaces when read back.
    if any(ch in text for ch in ",:\n") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _as_int(value: object) -> int:
    """``int(value)`` for a value read from an infotext or a request field (a number or a numeric string)."""
    if isinstance(value, (str, bytes, bytearray, SupportsInt, SupportsIndex)):
        return int(value)
    raise TypeError(f"expected a number, got {type(value).__name__}: {value!r}")


def _ordered_params(params: Mapping[str, object]) -> list[tuple[str, object]]:
    present = {key: value for key, value in params.items() if value is not None}
    clip_skip = present.get("Clip skip")
    if clip_skip is not None and _as_int(clip_skip) <= 1:
        del present["Clip skip"]
    standard = [(key, present[key]) for key in STANDARD_KEYS if key in present]
    others = [(key, value) for key, value in present.items() if key not in STANDARD_KEYS and key != "Version"]
    version = [("Version", present["Version"])] if "Version" in present else []
    return standard + others + version


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Write an A1111 infotext.

    ``params`` is keyed by infotext key names ("Steps", "Sampler", "CFG scale", ...). Standard keys
    are put in A1111's order whatever the insertion order, other keys follow in insertion order and
    "Version" comes last. None values are dropped, "Clip skip" is written only when above 1, and a
    value containing ``,``, ``:`` or a newline is written as a JSON string.
    Raises ValueError for a key that could not be read back (one holding ``,``, ``:``, ``"`` or a
    newline, or not starting with a letter or digit).
    """
    for key in params:
        if not re.fullmatch(r'\w[^,:"\n]*', key) or key != key.strip():
            raise ValueError(f"infotext key {key!r} cannot be written: it must start with a letter or digit "
                             "and hold no ',', ':', '\"' or newline")
    line = ", ".join(f"{key}: {_format_value(value)}" for key, value in _ordered_params(params))
    text = prompt
    if negative_prompt:
        text += f"\n{_NEGATIVE_PREFIX} {negative_prompt}"
    if line:
        text += f"\n{line}"
    return text.strip()


# --- reading -------------------------------------------------------------------------------------


def _typed(value: str) -> object:
    """Turn number-looking text into int/float, but only when nothing is lost ("0123" stays text)."""
    if _INT_RE.match(value) and str(int(value)) == value:
        return int(value)
    if _FLOAT_RE.match(value) and str(float(value)) == value:
        return float(value)
    return value


def _parse_pairs(line: str) -> dict[str, object]:
    pairs: dict[str, object] = {}
    for match in _PAIR_RE.finditer(line):
        key, raw = match.group(1), match.group(2)
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            try:
                value: object = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        else:
            value = _typed(raw)
        pairs[key] = value
        size = _SIZE_RE.match(value) if isinstance(value, str) else None
        if size:
            pairs[f"{key}-1"] = int(size.group(1))
            pairs[f"{key}-2"] = int(size.group(2))
    return pairs


def _split_old_sampler_name(parsed: dict[str, object]) -> None:
    # Before "Schedule type" existed, A1111 folded it into the sampler name: "DPM++ 2M Karras".
    sampler = parsed.get("Sampler")
    if "Schedule type" in parsed or not isinstance(sampler, str):
        return
    for label in sorted(SCHEDULE_LABELS, key=len, reverse=True):
        if sampler.endswith(" " + label) and len(sampler) > len(label) + 1:
            parsed["Sampler"] = sampler[: -len(label) - 1]
            parsed["Schedule type"] = label
            return


def parse_infotext(text: str) -> dict[str, object]:
    """Read an A1111 infotext into a dict keyed by infotext key names.

    The result always holds "Prompt" and "Negative prompt", then every `key: value` of the
    parameters line (numbers as int/float, quoted values JSON-decoded, a "WxH" value also as
    "<key>-1" and "<key>-2"), then the A1111 defaults for missing keys (Clip skip 1, Schedule type
    Automatic, RNG GPU). The last line counts as parameters only when it holds at least 3 pairs.
    An old-style sampler name such as "DPM++ 2M Karras" is split into "Sampler" and "Schedule type".
    """
    lines = text.replace("\r\n", "\n").strip().split("\n")
    params: dict[str, object] = {}
    if len(_PAIR_RE.findall(lines[-1])) >= 3:
        params = _parse_pairs(lines.pop())

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if not negative_lines and line.startswith(_NEGATIVE_PREFIX):
            negative_lines.append(line[len(_NEGATIVE_PREFIX):])
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)

    parsed: dict[str, object] = {
        "Prompt": "\n".join(prompt_lines).strip(),
        "Negative prompt": "\n".join(negative_lines).strip(),
        **params,
    }
    _split_old_sampler_name(parsed)
    for key, default in PARSE_DEFAULTS.items():
        parsed.setdefault(key, default)
    return parsed


# --- request fields <-> infotext keys ------------------------------------------------------------


def _always(fields: Mapping[str, Any]) -> bool:
    return True


def _hires(fields: Mapping[str, Any]) -> bool:
    return bool(fields.get("enable_hr"))


def _variation(fields: Mapping[str, Any]) -> bool:
    return (fields.get("subseed_strength") or 0) > 0


def _when(field: str, test: Callable[[Any], bool], gate: Callable[[Mapping[str, Any]], bool] = _always):
    """A condition on one field's value (None never passes), optionally behind a gate like `_hires`."""
    return lambda fields: gate(fields) and fields.get(field) is not None and test(fields[field])


_SIZE = "size"  # kind of an entry whose two fields are written as one "WxH" value


@dataclass(frozen=True)
class _Entry:
    """One infotext key and the request field(s) it stands for.

    ``written`` says whether a request's fields call for the key; ``absent`` is the field value a
    missing key implies (None: a missing key says nothing about the field).
    """

    key: str
    fields: tuple[str, ...]
    kind: Any  # int, float, str, bool or _SIZE
    written: Callable[[Mapping[str, Any]], bool] | None = None
    absent: object = None


def _present_fields(*names: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda fields: all(fields.get(name) is not None for name in names)


_TABLE: tuple[_Entry, ...] = (
    _Entry("Steps", ("steps",), int),
    _Entry("Sampler", ("sampler_name",), str),
    _Entry("Schedule type", ("scheduler",), str),
    _Entry("CFG scale", ("cfg_scale",), float),
    # Forge's key for Flux.1 dev's guidance; written only for a family that uses it (the field is None otherwise).
    _Entry("Distilled CFG Scale", ("distilled_cfg_scale",), float),
    # Forge's key for the flow-matching shift; written only when a job sets one (None: the model's own).
    _Entry("Shift", ("shift",), float),
    _Entry("Seed", ("seed",), int),
    _Entry("Size", ("width", "height"), _SIZE),
    _Entry("Model hash", ("sd_model_hash",), str, _when("sd_model_hash", bool)),
    _Entry("Model", ("sd_model_name",), str, _when("sd_model_name", bool)),
    _Entry("VAE hash", ("sd_vae_hash",), str, _when("sd_vae_hash", bool)),
    _Entry("VAE", ("sd_vae_name",), str, _when("sd_vae_name", bool)),
    _Entry("Variation seed", ("subseed",), int, lambda f: _variation(f) and f.get("subseed") is not None),
    _Entry("Variation seed strength", ("subseed_strength",), float, _variation, absent=0.0),
    _Entry("Seed resize from", ("seed_resize_from_w", "seed_resize_from_h"), _SIZE,
           lambda f: (f.get("seed_resize_from_w") or 0) > 0 and (f.get("seed_resize_from_h") or 0) > 0),
    _Entry("Denoising strength", ("denoising_strength",), float),
    _Entry("Clip skip", ("clip_skip",), int, _when("clip_skip", lambda v: v > 1), absent=1),
    _Entry("RNG", ("rng",), str, _when("rng", lambda v: v != "GPU"), absent="GPU"),
    _Entry("Tiling", ("tiling",), bool, _when("tiling", bool), absent=False),
    _Entry("Hires upscale", ("hr_scale",), float, _when("hr_scale", lambda v: True, _hires)),
    # One side given (the other 0, kept to the aspect ratio) is written as A1111 does: "Hires resize: 96x0".
    _Entry("Hires resize", ("hr_resize_x", "hr_resize_y"), _SIZE,
           lambda f: _hires(f) and ((f.get("hr_resize_x") or 0) > 0 or (f.get("hr_resize_y") or 0) > 0)),
    # A1111 leaves "Hires steps" out when it is 0 (= as many as the first pass).
    _Entry("Hires steps", ("hr_second_pass_steps",), int, _when("hr_second_pass_steps", bool, _hires)),
    _Entry("Hires upscaler", ("hr_upscaler",), str, _when("hr_upscaler", bool, _hires)),
    # The optional hires settings: written only when they differ from "the same as the first pass".
    _Entry("Hires checkpoint", ("hr_checkpoint_name",), str, _when("hr_checkpoint_name", bool, _hires)),
    _Entry("Hires sampler", ("hr_sampler_name",), str, _when("hr_sampler_name", bool, _hires)),
    _Entry("Hires schedule type", ("hr_scheduler",), str, _when("hr_scheduler", bool, _hires)),
    _Entry("Hires prompt", ("hr_prompt",), str, _when("hr_prompt", bool, _hires)),
    _Entry("Hires negative prompt", ("hr_negative_prompt",), str, _when("hr_negative_prompt", bool, _hires)),
    # A job writes the refiner's keys itself once the refiner took over (as A1111); "Refiner" is "name [hash]".
    _Entry("Refiner", ("refiner_checkpoint",), str, _when("refiner_checkpoint", bool)),
    _Entry("Refiner switch at", ("refiner_switch_at",), float,
           lambda f: bool(f.get("refiner_checkpoint")) and f.get("refiner_switch_at") is not None),
)

_MODULE_KEY = "Module"
_MODULE_RE = re.compile(rf"{_MODULE_KEY} (\d+)")
_HIRES_KEYS = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler")
_KEY_OF_PROMPT = {"Prompt": "prompt", "Negative prompt": "negative_prompt"}


def infotext_params_from_fields(fields: Mapping[str, object]) -> dict[str, object]:
    """Turn request field values into ordered infotext params for :func:`build_infotext`.

    Field names are the A1111 API names (steps, sampler_name, width, ...). Keys are written only
    when they carry information: width/height become "Size: WxH", variation keys need
    subseed_strength > 0, "Clip skip" needs clip_skip > 1, "RNG" is written unless "GPU", hires keys
    need enable_hr; ``additional_modules`` become "Module 1", "Module 2", ... Fields the table does not know are
    ignored, except ``extra``: a dict of
    infotext key -> value appended as is. prompt and negative_prompt go to build_infotext directly.
    """
    params: dict[str, object] = {}
    for entry in _TABLE:
        written = entry.written or _present_fields(*entry.fields)
        if not written(fields):
            continue
        if entry.kind is _SIZE:
            width, height = (fields[name] for name in entry.fields)
            params[entry.key] = f"{_as_int(width)}x{_as_int(height)}"
        else:
            params[entry.key] = fields[entry.fields[0]]
    modules = fields.get("additional_modules") or []
    if not isinstance(modules, list):
        raise TypeError(f"additional_modules: expected a list of module names, got {type(modules).__name__}")
    for number, module in enumerate(modules, start=1):
        params[f"{_MODULE_KEY} {number}"] = module  # Forge's: each module's file name without extension
    extra = fields.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra: expected a mapping of infotext key -> value, got {type(extra).__name__}")
    for key, value in extra.items():
        params.setdefault(key, value)
    return params


def _coerce(entry: _Entry, key: str, value: object) -> object:
    problem = f"infotext key {key!r}: cannot read {value!r} as {entry.kind.__name__}"
    if entry.kind is str:
        return str(value)
    if entry.kind is bool:
        text = str(value).lower()
        if text not in ("true", "false"):
            raise ValueError(problem)
        return text == "true"
    try:
        return entry.kind(value)
    except (TypeError, ValueError):
        raise ValueError(problem) from None


def request_fields_from_infotext(parsed: Mapping[str, object]) -> dict[str, object]:
    """Turn :func:`parse_infotext` output into request fields (A1111 API names).

    Every key the table knows becomes its field(s), typed (steps int, cfg_scale float, ...); keys
    whose absence has a meaning give that value (no variation keys: subseed_strength 0, no "Tiling":
    False, no hires keys: enable_hr False); "Module N" keys become ``additional_modules`` in order. Keys
    the table does not know are kept under their infotext names in ``fields["extra"]`` (present only
    when not empty). Raises ValueError naming the key when a value has the wrong type (e.g. "Steps: many").
    """
    fields: dict[str, object] = {}
    known = set(_KEY_OF_PROMPT)
    for key, field_name in _KEY_OF_PROMPT.items():
        if key in parsed:
            fields[field_name] = str(parsed[key])
    for entry in _TABLE:
        known.add(entry.key)
        if entry.kind is _SIZE:
            known.update((f"{entry.key}-1", f"{entry.key}-2"))
        if entry.key not in parsed:
            if entry.absent is not None:
                fields[entry.fields[0]] = entry.absent
            continue
        if entry.kind is _SIZE:
            if f"{entry.key}-1" not in parsed or f"{entry.key}-2" not in parsed:
                raise ValueError(f"infotext key {entry.key!r}: expected WIDTHxHEIGHT, got {parsed[entry.key]!r}")
            fields[entry.fields[0]] = _as_int(parsed[f"{entry.key}-1"])
            fields[entry.fields[1]] = _as_int(parsed[f"{entry.key}-2"])
        else:
            fields[entry.fields[0]] = _coerce(entry, entry.key, parsed[entry.key])
    modules = sorted((int(found.group(1)), key) for key in parsed if (found := _MODULE_RE.fullmatch(key)))
    if modules:
        fields["additional_modules"] = [str(parsed[key]) for _, key in modules]
        known.update(key for _, key in modules)
    fields["enable_hr"] = any(key in parsed for key in _HIRES_KEYS)
    if fields["enable_hr"]:
        fields.setdefault("hr_second_pass_steps", 0)
    # "<key>-1"/"<key>-2" are only a reading aid for a "WxH" value; the value itself is kept.
    derived = {f"{key}-{n}" for key, value in parsed.items()
               if isinstance(value, str) and _SIZE_RE.match(value) for n in (1, 2)}
    extra = {key: value for key, value in parsed.items() if key not in known and key not in derived}
    if extra:
        fields["extra"] = extra
    return fields
