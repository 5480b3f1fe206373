"""Prompts from file or textbox: one job per line; a line is a prompt, or options in command-line style::

    a photo of a cat
    --prompt "a photo of a dog" --negative_prompt "blurry" --seed 5 --steps 10 --sampler_name "Euler a"

``script_args``, in A1111's order: ``[iterate_seed, same_random_seed, prompt_position, prompt_txt]``;
iterate_seed: the next line's seed is this line's plus its image count; same_random_seed: a seed of -1 is
drawn once for all lines; prompt_position "start" or "end": where a line's prompt goes relative to the
prompt of the tab (when that is not empty).
"""

from __future__ import annotations

import random
import shlex
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from webui.extension_api import GenerationRequest, GenerationResult, JobControl, JobRunner, SelectableScript

TITLE = "Prompts from file or textbox"
MAX_SEED = 4294967294
MAX_LINES = 1000


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{text!r} is not true or false")


#: The options a line may set: option -> (request field, converter).
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "subseed": ("subseed", int),
    "subseed_strength": ("subseed_strength", float),
    "seed_resize_from_w": ("seed_resize_from_w", int),
    "seed_resize_from_h": ("seed_resize_from_h", int),
    "sampler_name": ("sampler_name", str),
    "sampler_index": ("sampler_name", str),
    "scheduler": ("scheduler", str),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "batch_size": ("batch_size", int),
    "n_iter": ("n_iter", int),
    "clip_skip": ("clip_skip", int),
    "denoising_strength": ("denoising_strength", float),
    "tiling": ("tiling", _bool),
    "sd_model": ("checkpoint", str),
    "checkpoint": ("checkpoint", str),
    "styles": ("styles", str),  # takes every value up to the next option
}


def parse_line(line: str, number: int) -> dict[str, Any]:
    """The request fields one line sets; ValueError names the line and the option."""
    if not line.lstrip().startswith("--"):
        return {"prompt": line.strip()}
    try:
        tokens = shlex.split(line)
    except ValueError as error:
        raise ValueError(f"line {number}: {error}") from None
    fields: dict[str, Any] = {}
    pos = 0
    while pos < len(tokens):
        token = tokens[pos]
        if not token.startswith("--"):
            raise ValueError(f"line {number}: expected an option like --seed, got {token!r}")
        name = token[2:]
        if name not in OPTIONS:
            raise ValueError(f"line {number}: unknown option --{name}; known: "
                             + ", ".join(f"--{option}" for option in OPTIONS))
        field, convert = OPTIONS[name]
        values = []
        pos += 1
        while pos < len(tokens) and not tokens[pos].startswith("--"):
            values.append(tokens[pos])
            pos += 1
        if name == "styles":
            fields["styles"] = values
            continue
        if len(values) != 1:
            raise ValueError(f"line {number}: --{name} takes one value, got {len(values)}")
        try:
            fields[field] = convert(values[0])
        except ValueError:
            raise ValueError(f"line {number}: --{name}: {values[0]!r} is not a valid value") from None
    return fields


class FileArgs(BaseModel):
    """``script_args`` in A1111's order; every line is parsed when they are validated (:attr:`lines`)."""

    model_config = ConfigDict(frozen=True)

    iterate_seed: bool
    same_random_seed: bool
    prompt_position: Literal["start", "end"]
    prompt_txt: str
    _lines: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _parse_lines(self) -> FileArgs:
        numbered = [(k + 1, line) for k, line in enumerate(self.prompt_txt.splitlines()) if line.strip()]
        if not numbered:
            raise ValueError("prompt_txt has no lines: write one prompt (or line of options) per line")
        if len(numbered) > MAX_LINES:
            raise ValueError(f"prompt_txt has {len(numbered)} lines; at most {MAX_LINES}")
        self._lines = [parse_line(line, k) for k, line in numbered]
        return self

    @property
    def lines(self) -> list[dict[str, Any]]:
        """The request fields each non-empty line sets."""
        return self._lines

    @property
    def at_start(self) -> bool:
        """Whether a line's prompt goes before the tab's prompt."""
        return self.prompt_position == "start"


class PromptsFromFile(SelectableScript[FileArgs]):
    """The "Prompts from file or textbox" script (see the module docstring for its arguments)."""

    title = TITLE

    def run(self, request: GenerationRequest, args: FileArgs, run_job: JobRunner,
            control: JobControl) -> GenerationResult:
        """One job per line, each image with its own infotext; an interrupt keeps the finished lines."""
        started = time.perf_counter()
        base = {name: getattr(request, name) for name in type(request).model_fields}
        seed = request.seed
        if seed == -1 and (args.iterate_seed or args.same_random_seed):
            seed = random.randint(0, MAX_SEED)
        requests = []
        for number, line in enumerate(args.lines, start=1):
            fields = {**base, "seed": seed, **line}
            if "prompt" in line and request.prompt:
                pieces = [line["prompt"], request.prompt] if args.at_start else [request.prompt, line["prompt"]]
                fields["prompt"] = " ".join(pieces)
            try:
                sub = type(request).model_validate(fields)  # every line is checked before the first job
            except ValueError as error:
                raise ValueError(f"line {number}: {error}") from None
            requests.append(sub)
            if args.iterate_seed and seed != -1:
                seed = (seed + sub.image_count) % (MAX_SEED + 1)
        result = GenerationResult(request=request)
        batches = [sub.n_iter for sub in requests]
        control.start_series(sum(batches))
        results = run_job.map(requests)  # an engine pool runs them at once on its replicas
        try:
            for k, _sub in enumerate(requests):
                if control.interrupted:
                    result.interrupted = True
                    break
                control.series_position(sum(batches[:k]), f"{TITLE}: line {k + 1} of {len(requests)}")
                done = next(results)
                for name in ("images", "infotexts", "seeds", "subseeds", "prompts", "negative_prompts", "paths"):
                    getattr(result, name).extend(getattr(done, name))
                result.warnings.extend(w for w in done.warnings if w not in result.warnings)
                result.model_title = done.model_title or result.model_title
                if done.interrupted:
                    result.interrupted = True
                    break
        finally:
            results.close()
            control.end_series()
        if len(result.paths) != len(result.images):
            result.paths.clear()  # the gallery shows saved files only when every image has one
        result.seconds = time.perf_counter() - started
        return result
