"""The X/Y/Z plot: one job per combination of up to three axes' values, drawn as labelled grids.

``script_args`` (API and UI alike), in A1111's order::

    [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
     z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
     vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode, confirm]

A type is an axis label ("Seed", "Checkpoint name", ...; any case) or its index in :data:`AXIS_TYPES`.
Trailing arguments may be left out (their defaults: legend on, no sub-images, no sub-grids, fixed seeds,
margin 0). ``confirm`` must be true for a plot of more than :data:`CONFIRM_ABOVE` cells.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from webui.extension_api import (
    ExtensionAPI,
    GenerationRequest,
    GenerationResult,
    JobControl,
    JobRunner,
    SelectableScript,
    annotated_grid,
    combine_grids,
    infotext_with_params,
    labels,
    save_grid,
    validate_args,
)

from .axes import AxisType, find_axis_type

TITLE = "X/Y/Z plot"
#: A plot with more cells than this runs only with ``confirm`` set.
CONFIRM_ABOVE = 100
MAX_SEED = 4294967294


class XyzArgs(BaseModel):
    """``script_args`` of a plot, in A1111's order; trailing ones may be left out. A type is an axis label or
    its index; values are the axis's text; the dropdown values replace the text for axes with choices."""

    x_type: str | int = "Nothing"
    x_values: str | None = ""
    x_values_dropdown: list[Any] | None = None
    y_type: str | int = "Nothing"
    y_values: str | None = ""
    y_values_dropdown: list[Any] | None = None
    z_type: str | int = "Nothing"
    z_values: str | None = ""
    z_values_dropdown: list[Any] | None = None
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds_x: bool = False
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: float = Field(0, ge=0, le=500)
    csv_mode: bool = False
    confirm: bool = False


@dataclass(frozen=True)
class Axis:
    """An axis of one plot: its type, its parsed values and the text they came from (for the infotext)."""

    type: AxisType
    values: list[Any]
    text: str


@dataclass(frozen=True)
class PlotArgs:
    """Parsed ``script_args`` of a plot."""

    axes: tuple[Axis, Axis, Axis]  # x, y, z
    draw_legend: bool = True
    include_images: bool = False
    include_subgrids: bool = False
    keep_random_seeds: bool = False
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)
    margin: int = 0

    @property
    def cell_count(self) -> int:
        x, y, z = self.axes
        return len(x.values) * len(y.values) * len(z.values)


@dataclass
class Throughput:
    """Seconds per image of the plots run so far, for the UI's time estimate (a fact of this machine)."""

    seconds: float = 0.0
    images: int = 0

    def add(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images

    @property
    def per_image(self) -> float | None:
        return self.seconds / self.images if self.images else None


def parse_plot_args(args: Sequence[Any] | XyzArgs, api: ExtensionAPI) -> PlotArgs:
    """Check every axis value against the app (checkpoints, samplers, ...) before anything runs."""
    raw = validate_args(XyzArgs, args)
    axes = []
    for letter, (type_name, text, picked) in zip("XYZ", ((raw.x_type, raw.x_values, raw.x_values_dropdown),
                                                        (raw.y_type, raw.y_values, raw.y_values_dropdown),
                                                        (raw.z_type, raw.z_values, raw.z_values_dropdown))):
        text = text or ""
        picked = picked or []
        try:
            axis_type = find_axis_type(type_name)
            parsed = axis_type.parse(text, [] if raw.csv_mode else picked, api)
        except (ValueError, LookupError) as error:
            raise ValueError(f"{letter} axis ({type_name}): {error}") from None
        shown = ", ".join(map(str, picked)) if picked and not raw.csv_mode and axis_type.choices else text
        axes.append(Axis(axis_type, parsed, shown))
    parsed_args = PlotArgs(
        axes=(axes[0], axes[1], axes[2]), draw_legend=raw.draw_legend, include_images=raw.include_lone_images,
        include_subgrids=raw.include_sub_grids, keep_random_seeds=raw.no_fixed_seeds,
        vary_seeds=(raw.vary_seeds_x, raw.vary_seeds_y, raw.vary_seeds_z), margin=int(raw.margin_size),
    )
    if parsed_args.cell_count > CONFIRM_ABOVE and not raw.confirm:
        raise ValueError(f"this plot has {parsed_args.cell_count} cells (more than {CONFIRM_ABOVE}); "
                         "set confirm (the last argument) to run it anyway")
    return parsed_args


@dataclass
class Cell:
    """One job of the plot: where its image goes and the request that makes it."""

    ix: int
    iy: int
    iz: int
    request: Any
    result: Any = None


@dataclass
class Plan:
    cells: list[Cell] = field(default_factory=list)

    def ordered(self, loaded: str | None = None) -> list[Cell]:
        """The run order: cells with the same checkpoint together (each loads once), the ``loaded`` one
        first; otherwise the grid order, Z then Y then X."""
        first_seen: dict[Any, int] = {loaded: -1}
        for cell in self.cells:
            first_seen.setdefault(cell.request.checkpoint, len(first_seen))
        return sorted(self.cells, key=lambda c: first_seen[c.request.checkpoint])


def _fixed_seeds(request: Any, keep_random: bool) -> dict[str, int]:
    """Seed -1 picked once for the whole plot (so every cell differs only by its axes) unless kept random."""
    if keep_random:
        return {}
    fixed = {}
    if request.seed == -1:
        fixed["seed"] = random.randint(0, MAX_SEED)
    if request.subseed == -1:
        fixed["subseed"] = random.randint(0, MAX_SEED)
    return fixed


def _short(error: ValueError) -> str:
    """A request validation error as "field: message" lines, without pydantic's headers and links."""
    details = getattr(error, "errors", None)
    if not callable(details):
        return str(error)
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in details())


def plan_cells(request: Any, args: PlotArgs, current_checkpoint: str | None) -> Plan:
    """Every cell's request, built (and so validated) before any generation: a bad combination, like a
    schedule a sampler cannot run, fails here naming the cell."""
    x, y, z = args.axes
    base = {name: getattr(request, name) for name in type(request).model_fields}
    base.update(_fixed_seeds(request, args.keep_random_seeds))
    for axis in args.axes:
        if axis.type.label == "Prompt S/R":
            search = axis.values[0]
            if search not in request.prompt and search not in request.negative_prompt:
                raise ValueError(f"Prompt S/R: the search term {search!r} (the first value) is in neither the "
                                 "prompt nor the negative prompt")
    plan = Plan()
    for iz, vz in enumerate(z.values):
        for iy, vy in enumerate(y.values):
            for ix, vx in enumerate(x.values):
                fields = dict(base)
                for axis, value in ((x, vx), (y, vy), (z, vz)):
                    axis.type.apply(fields, value, axis.values)
                offset = (ix if args.vary_seeds[0] else 0) + (iy * len(x.values) if args.vary_seeds[1] else 0) \
                    + (iz * len(x.values) * len(y.values) if args.vary_seeds[2] else 0)
                if offset and fields["seed"] != -1:
                    fields["seed"] = (fields["seed"] + offset) % (MAX_SEED + 1)
                fields["checkpoint"] = fields.get("checkpoint") or current_checkpoint
                try:
                    sub = type(request).model_validate(fields)
                except ValueError as error:
                    where = ", ".join(a.type.caption(v) for a, v in ((x, vx), (y, vy), (z, vz)) if a.type.caption(v))
                    raise ValueError(f"the cell {where}: {_short(error)}") from None
                plan.cells.append(Cell(ix, iy, iz, sub))
    return plan


def grid_params(args: PlotArgs) -> dict[str, object]:
    """What the grid's infotext records of the plot: ``Script: X/Y/Z plot, X Type: Seed, X Values: ...``."""
    params: dict[str, object] = {"Script": TITLE}
    for letter, axis in zip("XYZ", args.axes):
        if axis.type.label != "Nothing":
            params[f"{letter} Type"] = axis.type.label
            params[f"{letter} Values"] = axis.text
    return params


class XyzPlot(SelectableScript[PlotArgs]):
    """The X/Y/Z plot script: arguments :class:`XyzArgs`, resolved into :class:`PlotArgs` (checked axes)."""

    title = TITLE
    Args = XyzArgs

    def __init__(self, api: ExtensionAPI):
        self.api = api
        self.throughput = Throughput()

    def parse_args(self, args: Sequence[Any]) -> PlotArgs:
        """Parse and check the axes; ValueError names the axis, the value and the allowed ones."""
        return parse_plot_args(args, self.api)

    def run(self, request: GenerationRequest, args: PlotArgs, run_job: JobRunner,
            control: JobControl) -> GenerationResult:
        """Run every cell (checkpoint by checkpoint), then draw and save the grids; an interrupt keeps
        the finished cells."""
        started = time.perf_counter()
        current = self.api.current_model()
        plan = plan_cells(request, args, request.checkpoint or (current.file.title if current else None))
        ordered = plan.ordered(current.file.title if current else None)
        per_cell = request.image_count
        control.start_series(len(ordered) * request.n_iter, f"{TITLE}: image 1 of {len(ordered) * per_cell}")
        interrupted = False
        # run_job.map: one engine runs the cells one by one; an engine pool runs them at once on its replicas
        results = run_job.map([cell.request for cell in ordered])
        try:
            for k, cell in enumerate(ordered):
                if control.interrupted:
                    interrupted = True
                    break
                control.series_position(k * request.n_iter,
                                        f"{TITLE}: image {k * per_cell + 1} of {len(ordered) * per_cell}")
                cell.result = next(results)
                if cell.result.interrupted:
                    interrupted = True
                    break
        finally:
            results.close()
            control.end_series()
        finished = [c for c in plan.cells if c.result is not None and c.result.images]
        if finished:
            self.throughput.add(sum(c.result.seconds for c in finished), sum(len(c.result.images) for c in finished))
        return self._assemble(request, args, plan, interrupted, time.perf_counter() - started, run_job.options)

    def _assemble(self, request: Any, args: PlotArgs, plan: Plan, interrupted: bool, seconds: float,
                  options: Any) -> Any:
        """The result: the grid (combined when there are several Z values), the sub-grids, then the cells."""
        x, y, z = args.axes
        done = [cell for cell in plan.cells if cell.result is not None and cell.result.images]
        result = GenerationResult(request=request, interrupted=interrupted, seconds=seconds,
                                  model_title=done[-1].result.model_title if done else "")
        if not done:
            result.warnings.append(f"{TITLE} interrupted before its first image.")
            return result
        params = grid_params(args)
        grids, grid_infotexts, grid_seeds = [], [], []
        for iz in range(len(z.values)):
            cells = [c for c in plan.cells if c.iz == iz]
            images = [c.result.images[0] if c.result is not None and c.result.images else None for c in cells]
            first = next((c.result for c in cells if c.result is not None and c.result.images), None)
            if first is None:
                continue
            col_headings = [labels(x.type.caption(v)) for v in x.values] if args.draw_legend else None
            row_headings = [labels(y.type.caption(v)) for v in y.values] if args.draw_legend else None
            if args.draw_legend and x.type.label == "Nothing":
                col_headings = None
            if args.draw_legend and y.type.label == "Nothing":
                row_headings = None
            grids.append((iz, annotated_grid(images, len(x.values), col_headings=col_headings,
                                             row_headings=row_headings, margin=args.margin)))
            grid_infotexts.append(infotext_with_params(first.infotexts[0], params))
            grid_seeds.append(first.seeds[0])
        shown: list[tuple[Any, str, int]] = []
        if len(grids) > 1:
            headings = [labels(z.type.caption(z.values[iz])) for iz, _ in grids] if args.draw_legend else None
            combined = combine_grids([grid for _, grid in grids], headings, margin=args.margin)
            shown.append((combined, grid_infotexts[0], grid_seeds[0]))
            if args.include_subgrids:
                shown.extend((grid, text, seed) for (_, grid), text, seed in zip(grids, grid_infotexts, grid_seeds))
        else:
            shown.append((grids[0][1], grid_infotexts[0], grid_seeds[0]))
        for image, infotext, seed in shown:
            if request.save_images and options.grid_save:
                result.paths.append(save_grid(image, self.api.outputs_dir, request.mode, seed=seed,
                                              infotext=infotext, options=options))
            result.images.append(image)
            result.infotexts.append(infotext)
            result.seeds.append(seed)
            result.subseeds.append(-1)
            result.prompts.append(request.prompt)
            result.negative_prompts.append(request.negative_prompt)
        if args.include_images:
            for cell in done:
                result.extend(cell.result)
        if len(result.paths) != len(result.images):
            result.paths = []  # the gallery shows saved files only when every image has one
        for cell in done:
            result.warnings.extend(w for w in cell.result.warnings if w not in result.warnings)
        if interrupted:
            result.warnings.append(f"{TITLE} interrupted: {len(done)} of {len(plan.cells)} cells finished.")
        return result

