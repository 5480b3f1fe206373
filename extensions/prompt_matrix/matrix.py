"""Prompt matrix: ``a cat|red|blue`` makes one image per combination of the optional parts (2^n), in a grid
whose headings show which parts each row and column has.

``script_args``, in A1111's order: ``[put_at_start, different_seeds, prompt_type, variations_delimiter,
margin_size]``; prompt_type is "positive" or "negative" (which prompt holds the ``|``), variations_delimiter
"comma" or "space". Trailing arguments may be left out.
"""

from __future__ import annotations

import random
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from webui.extension_api import (
    ExtensionAPI,
    GenerationRequest,
    GenerationResult,
    GridLabel,
    JobControl,
    JobRunner,
    SelectableScript,
    annotated_grid,
    infotext_with_params,
    save_grid,
)

TITLE = "Prompt matrix"
MAX_SEED = 4294967294
#: 2^MAX_PARTS images at most: a stray "|" in a long prompt should not start thousands of jobs.
MAX_PARTS = 8


class MatrixArgs(BaseModel):
    """``script_args`` of a prompt matrix, in A1111's order; trailing ones may be left out."""

    model_config = ConfigDict(frozen=True)

    put_at_start: bool = False
    different_seeds: bool = False
    prompt_type: Literal["positive", "negative"] = "positive"
    variations_delimiter: Literal["comma", "space"] = "comma"
    margin_size: float = Field(0, ge=0, le=500)

    @field_validator("prompt_type", "variations_delimiter", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def negative(self) -> bool:
        """Whether the negative prompt holds the ``|``."""
        return self.prompt_type == "negative"

    @property
    def joiner(self) -> str:
        """What joins the parts."""
        return {"comma": ", ", "space": " "}[self.variations_delimiter]

    @property
    def margin(self) -> int:
        """Grid margin in pixels."""
        return int(self.margin_size)


def combinations(prompt: str, args: MatrixArgs) -> tuple[list[str], list[str]]:
    """(the optional parts, the prompt of each combination); combination i has part k when bit k of i is set."""
    base, *parts = [part.strip() for part in prompt.split("|")]
    if not parts:
        raise ValueError("the prompt has no '|': write the optional parts after it, e.g. 'a cat|red|blue'")
    if len(parts) > MAX_PARTS:
        raise ValueError(f"{len(parts)} optional parts make {2 ** len(parts)} images; at most {MAX_PARTS} parts")
    prompts = []
    for i in range(2 ** len(parts)):
        chosen = [part for k, part in enumerate(parts) if i & (1 << k)]
        pieces = [*chosen, base] if args.put_at_start else [base, *chosen]
        prompts.append(args.joiner.join(piece for piece in pieces if piece))
    return parts, prompts


class PromptMatrix(SelectableScript[MatrixArgs]):
    """The prompt matrix script (see the module docstring for its arguments)."""

    title = TITLE

    def __init__(self, api: ExtensionAPI):
        self.api = api

    def run(self, request: GenerationRequest, args: MatrixArgs, run_job: JobRunner,
            control: JobControl) -> GenerationResult:
        """One job per combination, then the grid (first) and every image with its own infotext."""
        started = time.perf_counter()
        source = request.negative_prompt if args.negative else request.prompt
        parts, prompts = combinations(source, args)
        seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        base = {name: getattr(request, name) for name in type(request).model_fields}
        requests = []
        for i, text in enumerate(prompts):
            fields = {**base, "negative_prompt" if args.negative else "prompt": text,
                      "seed": (seed + i * request.image_count) % (MAX_SEED + 1) if args.different_seeds else seed}
            requests.append(type(request).model_validate(fields))  # all checked before the first job
        result = GenerationResult(request=request)
        cells: list[Any] = [None] * len(requests)
        control.start_series(len(requests) * request.n_iter)
        results = run_job.map(requests)  # an engine pool runs them at once on its replicas
        try:
            for i, _sub in enumerate(requests):
                if control.interrupted:
                    result.interrupted = True
                    break
                control.series_position(i * request.n_iter, f"{TITLE}: image {i + 1} of {len(requests)}")
                done = next(results)
                _extend(result, done)
                cells[i] = done.images[0] if done.images else None
                if done.interrupted:
                    result.interrupted = True
                    break
        finally:
            results.close()
            control.end_series()
        if any(cell is not None for cell in cells):
            _add_grid(result, request, self.api, parts, cells, args, run_job.options)
        result.seconds = time.perf_counter() - started
        return result


def _extend(result: Any, done: Any) -> None:
    result.extend(done)
    result.warnings.extend(w for w in done.warnings if w not in result.warnings)
    result.model_title = done.model_title or result.model_title


def _add_grid(result: Any, request: Any, api: ExtensionAPI, parts: list[str], cells: list[Any],
              args: MatrixArgs, options: Any) -> None:
    """The labelled grid goes first, as A1111 returns it: the first half of the parts across the top, the
    rest down the left, each heading naming every part, struck through where the cell leaves it out."""
    half = len(parts) // 2
    top, left = parts[:half], parts[half:]
    col_headings = [[GridLabel(part, bool(col & (1 << k))) for k, part in enumerate(top)]
                    for col in range(2 ** half)] if top else None
    row_headings = [[GridLabel(part, bool(row & (1 << k))) for k, part in enumerate(left)]
                    for row in range(2 ** len(left))]
    grid = annotated_grid(cells, 2 ** half, col_headings=col_headings, row_headings=row_headings,
                          margin=args.margin)
    infotext = infotext_with_params(result.infotexts[0], {"Script": TITLE})
    if request.save_images and options.grid_save:
        path = save_grid(grid, api.outputs_dir, request.mode, seed=result.seeds[0], infotext=infotext,
                         options=options)
        result.paths.insert(0, path)
    result.images.insert(0, grid)
    result.infotexts.insert(0, infotext)
    result.seeds.insert(0, result.seeds[0])
    result.subseeds.insert(0, result.subseeds[0])
    result.prompts.insert(0, request.prompt)
    result.negative_prompts.insert(0, request.negative_prompt)
    if len(result.paths) != len(result.images):
        result.paths.clear()  # the gallery shows saved files only when every image has one
