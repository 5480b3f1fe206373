"""The results of an evaluation: one table (candidate x metric), a bar chart, a contact sheet per prompt, and
CSV / JSON exports, all written into the run's folder.

Per-image metrics (CLIP score, SSIM, PSNR) are a mean with a 95% interval (Student's t over the prompts x seeds
images); per-set metrics are one figure per candidate (FID; KID and Inception Score with the library's standard
deviation over subsets / splits). The best candidate of each column is marked.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.evaluation.metrics import HIGHER_IS_BETTER, METRIC_LABELS, METRICS, PER_IMAGE_METRICS
from pipelines.images.grids import annotated_grid, labels

RESULTS_JSON, RESULTS_CSV, PER_IMAGE_CSV, CHART, CONTACT_DIR = (
    "results.json", "results.csv", "per_image.csv", "chart.png", "contact_sheets")


@dataclass
class Cell:
    """One figure of the table: ``mean``, the 95% interval (``low``, ``high``) or a std, and ``n`` images."""

    mean: float
    low: float | None = None
    high: float | None = None
    std: float | None = None
    n: int = 0
    best: bool = False

    def text(self) -> str:
        mark = " ★" if self.best else ""
        if self.low is not None and self.high is not None and math.isfinite(self.mean):
            return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]{mark}"
        if self.std is not None:
            return f"{self.mean:.4g} ± {self.std:.2g}{mark}"
        return f"{self.mean:.4g}{mark}"


@dataclass
class EvaluationReport:
    candidates: list[str]
    metrics: list[str]
    cells: dict[str, dict[str, Cell]]
    per_image: dict[str, dict[str, list[float]]]
    messages: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the table as shown: candidate, then one column per metric."""
        headers = ["candidate", *(METRIC_LABELS[name] for name in self.metrics)]
        rows = [[c, *(self.cells[c][name].text() if name in self.cells[c] else "–" for name in self.metrics)]
                for c in self.candidates]
        return headers, rows

    def value(self, candidate: str, metric: str) -> float | None:
        cell = self.cells.get(candidate, {}).get(metric)
        return cell.mean if cell else None

    def to_json(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "metrics": self.metrics, "prompts": self.prompts, "seeds": self.seeds,
                "messages": self.messages, "higher_is_better": {k: HIGHER_IS_BETTER[k] for k in self.metrics},
                "results": {c: {k: asdict(v) for k, v in cells.items()} for c, cells in self.cells.items()},
                "per_image": self.per_image, "images": self.images}


def interval(values: Sequence[float]) -> Cell:
    """Mean and its 95% interval (Student's t); one value has no interval."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(values)
    if not finite:
        return Cell(math.inf if values else math.nan, n=n)
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return Cell(mean, n=n)
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    half = float(stats.t.ppf(0.975, len(finite) - 1)) * sd / math.sqrt(len(finite))
    return Cell(mean, mean - half, mean + half, n=n)


def build_report(spec: Any, manifest: Mapping[str, Any], per_image: dict[str, dict[str, list[float]]],
                 per_set: dict[str, dict[str, tuple[float, float | None]]], messages: list[str]) -> EvaluationReport:
    candidates = [c.name for c in spec.candidates]
    cells: dict[str, dict[str, Cell]] = {c: {} for c in candidates}
    for c in candidates:
        for name, values in per_image.get(c, {}).items():
            cells[c][name] = interval(values)
        for name, (mean, std) in per_set.get(c, {}).items():
            cells[c][name] = Cell(mean, std=std, n=sum(1 for e in manifest["images"] if e["candidate"] == c))
    shown = [name for name in METRICS if name in spec.metrics and any(name in cells[c] for c in candidates)]
    for name in shown:
        present = [c for c in candidates if name in cells[c] and not math.isnan(cells[c][name].mean)]
        if len(present) > 1:
            pick = max if HIGHER_IS_BETTER[name] else min
            best = pick(cells[c][name].mean for c in present)
            for c in present:
                cells[c][name].best = cells[c][name].mean == best
    return EvaluationReport(candidates, shown, cells, per_image, messages,
                            [p["text"] for p in manifest["prompts"]], list(spec.seeds), list(manifest["images"]))


def write_report(report: EvaluationReport, folder: Path, images: Mapping[str, Image.Image]) -> dict[str, Path]:
    """Write results.json, results.csv, per_image.csv, chart.png and one contact sheet per prompt."""
    folder = Path(folder)
    written = {"json": folder / RESULTS_JSON, "csv": folder / RESULTS_CSV, "per_image": folder / PER_IMAGE_CSV,
               "chart": folder / CHART}
    written["json"].write_text(json.dumps(report.to_json(), indent=2, default=_json_number), encoding="utf-8")
    with written["csv"].open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["candidate", "metric", "mean", "ci95_low", "ci95_high", "std", "n", "best"])
        for c in report.candidates:
            for name in report.metrics:
                cell = report.cells[c].get(name)
                if cell:
                    writer.writerow([c, name, cell.mean, _blank(cell.low), _blank(cell.high), _blank(cell.std),
                                     cell.n, int(cell.best)])
    with written["per_image"].open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        per_image_metrics = [n for n in report.metrics if n in PER_IMAGE_METRICS]
        writer.writerow(["candidate", "prompt_index", "seed", "path", *per_image_metrics])
        counters: dict[tuple[str, str], int] = {}
        for entry in report.images:
            row = [entry["candidate"], entry["prompt_index"], entry["seed"], entry["path"]]
            for name in per_image_metrics:
                values = report.per_image.get(entry["candidate"], {}).get(name, [])
                k = counters.get((entry["candidate"], name), 0)
                counters[(entry["candidate"], name)] = k + 1
                row.append(values[k] if k < len(values) else "")
            writer.writerow(row)
    bar_chart(report).save(written["chart"])
    for path in contact_sheets(report, folder / CONTACT_DIR, images):
        written[path.stem] = path
    return written


def _blank(value: float | None) -> object:
    return "" if value is None else value


def _json_number(value: object) -> object:
    return str(value)


def contact_sheets(report: EvaluationReport, folder: Path, images: Mapping[str, Image.Image]) -> list[Path]:
    """One annotated grid per prompt: a column per candidate, a row per seed (the checkpoint-study figure)."""
    folder.mkdir(parents=True, exist_ok=True)
    by_cell = {(e["candidate"], e["prompt_index"], e["seed"]): images.get(e["path"]) for e in report.images}
    written = []
    for pi, prompt in enumerate(report.prompts):
        cells = [by_cell.get((c, pi, seed)) for seed in report.seeds for c in report.candidates]
        if not any(cells):
            continue
        grid = annotated_grid(cells, len(report.candidates), col_headings=[labels(c) for c in report.candidates],
                              row_headings=[labels(f"seed {seed}") for seed in report.seeds])
        sheet = Image.new("RGB", (grid.width, grid.height + 28), "white")
        ImageDraw.Draw(sheet).text((6, 6), prompt[:160], fill="black", font=ImageFont.load_default(14))
        sheet.paste(grid, (0, 28))
        path = folder / f"prompt-{pi:03d}.png"
        sheet.save(path)
        written.append(path)
    return written


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def bar_chart(report: EvaluationReport, panel: tuple[int, int] = (260, 220)) -> Image.Image:
    """One bar panel per metric (candidates as coloured bars, 95% interval as a whisker), drawn with Pillow."""
    metrics = report.metrics or ["(none)"]
    w, h = panel
    chart = Image.new("RGB", (w * len(metrics), h + 24 + 18 * len(report.candidates)), "white")
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(13)
    for k, name in enumerate(metrics):
        x0 = k * w
        # Words, not arrows: Pillow's built-in font has no arrow glyphs.
        better = "higher" if HIGHER_IS_BETTER.get(name, True) else "lower"
        draw.text((x0 + 8, 4), f"{METRIC_LABELS.get(name, name)} ({better} is better)", fill="black", font=font)
        cells = [report.cells[c].get(name) for c in report.candidates]
        values = [cell.high if cell and cell.high is not None else cell.mean if cell else 0.0 for cell in cells]
        top = max([abs(v) for v in values if math.isfinite(v)] or [1.0]) or 1.0
        base_y, bar_area = h - 20, h - 50
        draw.line((x0 + 10, base_y, x0 + w - 10, base_y), fill="black")
        slot = (w - 20) / max(1, len(cells))
        for i, cell in enumerate(cells):
            if cell is None or not math.isfinite(cell.mean):
                continue
            left = x0 + 10 + i * slot + slot * 0.15
            right = left + slot * 0.7
            y = base_y - bar_area * max(cell.mean, 0.0) / top
            draw.rectangle((left, min(y, base_y), right, base_y), fill=PALETTE[i % len(PALETTE)],
                           outline="black" if cell.best else None, width=2 if cell.best else 1)
            if cell.low is not None and cell.high is not None:
                mid = (left + right) / 2
                lo = base_y - bar_area * max(cell.low, 0.0) / top
                hi = base_y - bar_area * max(cell.high, 0.0) / top
                draw.line((mid, lo, mid, hi), fill="black", width=1)
            draw.text((left, min(y, base_y) - 14), f"{cell.mean:.3g}", fill="black", font=font)
    for i, candidate in enumerate(report.candidates):
        y = h + 8 + 18 * i
        draw.rectangle((10, y, 22, y + 12), fill=PALETTE[i % len(PALETTE)])
        draw.text((28, y - 1), candidate, fill="black", font=font)
    return chart
