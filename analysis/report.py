"""Turn task results into one `Report`: merged tables (CSV) and figures (PNG). Metrics and the claim-by-claim
summary are in `analysis.summary`."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from analysis import figures
from analysis.specs import ModelSpec
from analysis.tasks import TaskResult


@dataclass
class Report:
    """Everything a run found, merged over tasks; models keep the order they were given in."""

    models: list[ModelSpec]
    info: dict[str, dict] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    figure_data: dict[str, dict[str, dict]] = field(default_factory=dict)  # kind -> model -> data
    errors: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def rows(self, probe: str, model: str | None = None, **match: object) -> list[dict]:
        return [
            row
            for row in self.tables.get(probe, [])
            if (model is None or row["model"] == model) and all(row.get(k) == v for k, v in match.items())
        ]


def _merge_layered(parts: list[dict], arrays: Sequence[str]) -> dict:
    """Chunks of one model's per-layer figure data -> one, ordered by layer."""
    parts = sorted(parts, key=lambda part: part["layers"][0])
    merged = {**parts[0], "layers": [layer for part in parts for layer in part["layers"]]}
    for name in arrays:
        merged[name] = np.concatenate([part[name] for part in parts])
    return merged


def merge_results(results: list[TaskResult], models: list[ModelSpec]) -> Report:
    """Collect rows (with a leading `model` column), figure data and errors of every task."""
    report = Report(models=models)
    order = {spec.label: index for index, spec in enumerate(models)}
    layered: dict[str, dict[str, list[dict]]] = {}
    for result in sorted(results, key=lambda r: (order.get(r.model, 0), r.group, r.chunk)):
        if result.info:
            report.info.setdefault(result.model, result.info)
        for probe, rows in result.tables.items():
            report.tables.setdefault(probe, []).extend({"model": result.model, **row} for row in rows)
        for kind, data in result.figures.items():
            if kind in ("norm_layers", "attention_progression"):
                layered.setdefault(kind, {}).setdefault(result.model, []).append(data)
            else:
                report.figure_data.setdefault(kind, {})[result.model] = data
        report.errors.extend(result.errors)
    arrays = {"norm_layers": ("counts",), "attention_progression": ("maps",)}
    for kind, per_model in layered.items():
        report.figure_data[kind] = {model: _merge_layered(parts, arrays[kind]) for model, parts in per_model.items()}
    for rows in report.tables.values():
        rows.sort(key=lambda row: (order.get(row["model"], 0), row.get("layer", -1)))
    return report


# ---------------------------------------------------------------- tables


def write_csv(rows: list[dict], path: Path) -> Path:
    """Rows as CSV; columns in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tables(report: Report, out: Path) -> list[Path]:
    """One CSV per probe (failed models appear as rows with an `error`), plus models.csv and errors.csv."""
    paths = []
    probes = list(report.tables) + [e["probe"] for e in report.errors if e["probe"] not in report.tables]
    for probe in dict.fromkeys(probes):
        failed = [{"model": e["model"], "error": e["error"]} for e in report.errors if e["probe"] == probe]
        paths.append(write_csv(report.tables.get(probe, []) + failed, out / f"{probe}.csv"))
    models = [
        {"model": spec.label, "name": spec.name, "family": spec.family, **report.info.get(spec.label, {})}
        for spec in report.models
    ]
    paths.append(write_csv(models, out / "models.csv"))
    if report.errors:
        paths.append(write_csv(report.errors, out / "errors.csv"))
    return paths


# ---------------------------------------------------------------- figures


def register_count(report: Report, model: str) -> int:
    return int(report.info.get(model, {}).get("registers", 0))


def _norm_layers(report: Report, model: str, data: dict, path: Path) -> Path:
    fractions = {row["layer"]: row["outlier_fraction"] for row in report.rows("norms", model)}
    outliers = [fractions.get(layer, math.nan) for layer in data["layers"]]
    return figures.norm_layers(model, data["layers"], data["counts"], outliers, path)


def _attention_maps(report: Report, model: str, data: dict, path: Path) -> Path:
    return figures.attention_maps(model, data["pixels"], data["maps"], data["registers"], path)


def _attention_progression(report: Report, model: str, data: dict, path: Path) -> Path:
    patch_tokens = [t if n.endswith("patch") else -1 for t, n in zip(data["tokens"], data["names"], strict=True)]
    return figures.attention_progression(
        model, data["layers"], data["maps"], data["names"], patch_tokens, data["grid"], path
    )


def _correspondence(report: Report, model: str, data: dict, path: Path) -> Path:
    return figures.correspondence(model, data["norms"], data["attention"], data["percent"], path)


def _removal(report: Report, model: str, data: dict, path: Path) -> Path:
    return figures.removal(model, data["layer"], data["clean"], data["removed"], data["removed_mask"], path)


# figure data kind -> (file name prefix, drawer); one PNG per model
PER_MODEL_FIGURES = {
    "norm_layers": ("norms", _norm_layers),
    "attention_maps": ("attention", _attention_maps),
    "attention_progression": ("attention_layers", _attention_progression),
    "correspondence": ("correspondence", _correspondence),
    "removal": ("removal", _removal),
}
# probe table -> bar chart (bar group column, value, error, title, y label); one PNG for all models
BAR_FIGURES = {
    "global": ("tokens", "accuracy_mean", "accuracy_std", "Global information: image class from one token", "accuracy"),
    "representation": ("features", "accuracy_mean", "accuracy_std", "Representation quality: linear probe", "accuracy"),
    "segmentation": ("variant", "miou_mean", "miou_std", "Segmentation: linear heads on frozen features", "mIoU"),
}


def _figure_jobs(report: Report, out: Path) -> list[tuple[str, Callable[[], Path]]]:
    """(name, draw) for every figure the data allow."""
    data = report.figure_data
    jobs = []
    for kind, (prefix, draw) in PER_MODEL_FIGURES.items():
        for model, item in data.get(kind, {}).items():
            jobs.append((f"{prefix}_{model}", partial(draw, report, model, item, out / f"{prefix}_{slug(model)}.png")))
    if data.get("norm_last"):
        counts = {model: item["counts"] for model, item in data["norm_last"].items()}
        registers = {model: register_count(report, model) for model in counts}
        jobs.append(
            ("norms_last_layer", partial(figures.norm_comparison, counts, registers, out / "norms_last_layer.png"))
        )
    if data.get("neighbours"):
        jobs.append(("neighbours", partial(figures.neighbours, data["neighbours"], out / "neighbours.png")))
    for probe, spec in BAR_FIGURES.items():
        if report.tables.get(probe):
            jobs.append((probe, partial(figures.grouped_bars, report.tables[probe], *spec, out / f"{probe}.png")))
    if report.tables.get("local"):
        jobs.append(("local", partial(figures.local_information, report.tables["local"], out / "local.png")))
    return jobs


def draw_figures(report: Report, out: Path) -> list[Path]:
    """Every figure the data allow; a figure that fails is recorded as an error and the others are drawn."""
    paths = []
    for name, draw in _figure_jobs(report, out):
        try:
            paths.append(draw())
        except Exception as error:  # one bad figure must not cost the others
            text = f"{type(error).__name__}: {error}"
            report.errors.append({"model": "", "probe": f"figure {name}", "group": "report", "chunk": 0, "error": text})
    report.figures = paths
    return paths


def slug(text: str) -> str:
    """`text` made safe for file and MLflow metric names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
