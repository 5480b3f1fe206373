"""The A1111 prompt language as plain text operations (docs/compatibility.md §6); no torch here.

Three independent passes, applied in this order by the caller:

1. :func:`extract_extra_networks` takes ``<name:args>`` tags out of the prompt.
2. :func:`get_prompt_schedule` resolves prompt editing ``[from:to:when]`` and alternation ``[a|b]``
   into one plain prompt per range of sampling steps.
3. :func:`parse_prompt_attention` turns one plain prompt into ``(text, weight)`` pieces for the
   emphasis syntax ``(x)``, ``[x]``, ``(x:1.3)`` and the ``BREAK`` keyword.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ("BREAK", -1.0)

# `:1.3)` closing an open round bracket sets its weight; anything else after `:` is plain text.
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_PLAIN_RUN = re.compile(r"[^\\()\[\]:]+")
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# Lark's SIGNED_NUMBER, which A1111's schedule grammar uses for `when`.
_SCHEDULE_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")


# --------------------------------------------------------------------------- emphasis


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces following A1111's emphasis rules.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` multiplies by ``w``; nesting
    multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters (a lone backslash is
    dropped, as in A1111). A bracket that is never closed still applies its factor to everything
    after it; a closing bracket with no opener is literal text. The word ``BREAK`` (upper case,
    whole word) becomes the marker ``("BREAK", -1.0)``, which no bracket scales. Neighbouring
    pieces of equal weight are merged. An empty prompt gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []  # [text, weight, is_break_marker]
    round_starts: list[int] = []
    square_starts: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    def add_text(chunk: str) -> None:
        pieces.append([chunk, 1.0, False])

    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            # The escaped character is literal; a backslash before anything else vanishes.
            following = text[pos + 1] if pos + 1 < len(text) else ""
            if following and following in "()[]\\":
                add_text(following)
                pos += 2
            else:
                add_text("")
                pos += 1
        elif char == "(":
            round_starts.append(len(pieces))
            pos += 1
        elif char == "[":
            square_starts.append(len(pieces))
            pos += 1
        elif char == ":":
            match = _WEIGHT_CLOSE.match(text, pos)
            weight = _as_float(match.group(1)) if match else None
            if match and round_starts and weight is not None:
                scale_from(round_starts.pop(), weight)
                pos = match.end()
            elif match:
                add_text(match.group(0))
                pos = match.end()
            else:
                add_text(":")
                pos += 1
        elif char == ")":
            if round_starts:
                scale_from(round_starts.pop(), ROUND_MULTIPLIER)
            else:
                add_text(")")
            pos += 1
        elif char == "]":
            if square_starts:
                scale_from(square_starts.pop(), SQUARE_MULTIPLIER)
            else:
                add_text("]")
            pos += 1
        else:
            run = _PLAIN_RUN.match(text, pos)
            assert run is not None  # every character the branches above leave out starts a plain run
            for index, part in enumerate(_BREAK.split(run.group(0))):
                if index:
                    pieces.append([BREAK_MARKER[0], BREAK_MARKER[1], True])
                add_text(part)
            pos = run.end()

    # Unclosed brackets apply to the rest of the prompt: round ones first, then square ones.
    for start in round_starts:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_starts:
        scale_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for piece in pieces:
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    if not merged:
        return [("", 1.0)]
    return [(piece[0], piece[1]) for piece in merged]


def _as_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        # `[.\d]+` also matches "1.2.3" or "."; A1111 crashes there, we keep it as text.
        return None


# --------------------------------------------------------------------------- extra networks


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<name:arg1:arg2>`` tag, e.g. ``<lora:film:0.8>`` -> name "lora", args ("film", "0.8")."""

    name: str
    args: tuple[str, ...]


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every ``<name:args>`` tag from ``prompt``; return the remaining text and the tags in order."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match) -> str:
        tags.append(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tags


# --------------------------------------------------------------------------- prompt editing


@dataclass
class _Scheduled:
    before: list | None  # None for the `[to:when]` form
    after: list
    when: str  # the number exactly as written: a "." makes it a fraction of the steps


@dataclass
class _Alternate:
    options: list[list]


class _NoMatch(Exception):
    """A bracket group that is not well formed; at the top level it is kept as literal text."""


#: How deep brackets may nest in a prompt; deeper is refused (a parser recursing that deep would fail).
MAX_NESTING = 100


def check_nesting(text: str, field: str = "prompt") -> str:
    """``text`` unchanged, or ValueError naming ``field`` when its brackets ``( [ {`` nest deeper than
    :data:`MAX_NESTING` (escaped brackets do not count)."""
    depth = deepest = 0
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}" and depth:
            depth -= 1
    if deepest > MAX_NESTING:
        raise ValueError(f"{field}: brackets are nested {deepest} deep, more than the limit of {MAX_NESTING}")
    return text


class _SyntaxError(Exception):
    """A prompt that A1111's schedule grammar rejects; such a prompt is used as written."""


class _ScheduleParser:
    """Recursive-descent version of A1111's prompt-editing grammar.

    Inside a bracket group only well-formed groups, plain text and whitespace may appear. At the
    top level a bracket or colon that does not start a well-formed group is literal text. A ``|``
    outside an alternation, or a backslash at the end of the text or before a line break, makes
    the whole prompt invalid, as it does for A1111's parser.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def parse(self) -> list:
        text, nodes, pos = self.text, [], 0
        while pos < len(text):
            char = text[pos]
            if char in "([":
                try:
                    group, pos = self._group(pos)
                    nodes.extend(group)
                    continue
                except _NoMatch:
                    nodes.append(char)
                    pos += 1
            elif char in ")]:":
                nodes.append(char)
                pos += 1
            elif char == "|":
                raise _SyntaxError(f"'|' outside an alternation at {pos}")
            else:
                end = self._plain_end(pos)
                if end == pos:
                    raise _SyntaxError(f"dangling backslash at {pos}")
                nodes.append(text[pos:end])
                pos = end
        return nodes

    def _plain_end(self, pos: int) -> int:
        text = self.text
        while pos < len(text):
            char = text[pos]
            if char == "\\":
                if pos + 1 >= len(text) or text[pos + 1] == "\n":
                    break
                pos += 2
            elif char in "[]():|":
                break
            else:
                pos += 1
        return pos

    def _sequence(self, pos: int) -> tuple[list, int]:
        """Parse plain text and nested groups up to the next ``: ) ] |`` or the end."""
        text, nodes = self.text, []
        while pos < len(text) and text[pos] not in ":)]|":
            if text[pos] in "([":
                group, pos = self._group(pos)
                nodes.extend(group)
            else:
                end = self._plain_end(pos)
                if end == pos:
                    raise _NoMatch
                nodes.append(text[pos:end])
                pos = end
        return nodes, pos

    def _at(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def _group(self, pos: int) -> tuple[list, int]:
        opener = self.text[pos]
        first, pos = self._sequence(pos + 1)
        if opener == "(":
            if self._at(pos) == ")":
                return ["(", *first, ")"], pos + 1
            if self._at(pos) == ":":
                second, end = self._sequence(pos + 1)
                if self._at(end) == ")":
                    return ["(", *first, ":", *second, ")"], end + 1
            raise _NoMatch
        if self._at(pos) == "]":
            return ["[", *first, "]"], pos + 1
        if self._at(pos) == "|":
            options = [first]
            while self._at(pos) == "|":
                option, pos = self._sequence(pos + 1)
                options.append(option)
            if self._at(pos) == "]":
                return [_Alternate(options)], pos + 1
            raise _NoMatch
        if self._at(pos) == ":":
            number = _SCHEDULE_NUMBER.match(self.text, pos + 1)
            if number:
                return [_Scheduled(None, first, number.group(1))], number.end()
            second, end = self._sequence(pos + 1)
            if self._at(end) == ":":
                number = _SCHEDULE_NUMBER.match(self.text, end + 1)
                if number:
                    return [_Scheduled(first, second, number.group(1))], number.end()
        raise _NoMatch


def _resolve_when(node: _Scheduled, steps: int, hires_base_steps: int | None) -> int:
    value = float(node.when)
    if "." in node.when:
        offset = 1.0 if hires_base_steps is not None else 0.0
        value = (value - offset) * steps
    elif hires_base_steps is not None:
        value -= hires_base_steps
    return min(steps, int(value))


def _change_steps(nodes: list, steps: int, hires_base_steps: int | None) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = _resolve_when(node, steps, hires_base_steps)
            if when >= 1:
                found.add(when)
            found |= _change_steps(node.before or [], steps, hires_base_steps)
            found |= _change_steps(node.after, steps, hires_base_steps)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                found |= _change_steps(option, steps, hires_base_steps)
    return found


def _render(nodes: list, step: int, steps: int, hires_base_steps: int | None) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            when = _resolve_when(node, steps, hires_base_steps)
            chosen = (node.before or []) if step <= when else node.after
            parts.append(_render(chosen, step, steps, hires_base_steps))
        else:
            option = node.options[(step - 1) % len(node.options)]
            parts.append(_render(option, step, steps, hires_base_steps))
    return "".join(parts)


def get_prompt_schedule(prompt: str, steps: int, hires_base_steps: int | None = None) -> list[tuple[int, str]]:
    """Resolve prompt editing and alternation into ``[(end_step, text), ...]``.

    Steps are 1-based: sampling step ``i`` (0-based) uses the first entry with ``end_step >= i + 1``;
    the last entry always ends at ``steps``. ``[from:to:when]`` uses ``from`` up to and including
    step ``when`` (an integer is a step, a number with a "." a fraction of ``steps``), ``[to:when]``
    and ``[from::when]`` leave one side empty, ``[a|b]`` alternates every step. The emphasis syntax
    is kept in the returned texts for :func:`parse_prompt_attention`. A prompt the grammar rejects
    (a ``|`` outside ``[...]``) is returned unchanged, as A1111 does.

    For a hires-fix second pass, pass its step count as ``steps`` and the first pass's step count
    as ``hires_base_steps``: integers then count from the start of the first pass and fractions run
    from 1.0 to 2.0 over the second pass, as in A1111.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    check_nesting(prompt)
    try:
        tree = _ScheduleParser(prompt).parse()
    except _SyntaxError:
        return [(steps, prompt)]
    ends = sorted(_change_steps(tree, steps, hires_base_steps) | {steps})
    return [(end, _render(tree, end, steps, hires_base_steps)) for end in ends]
