"""The sweeps' comparison table (the study's Table 8 layout), its figure of accuracy against artifact metrics, and
the lambda-schedule figure (lambda, an artifact measure and accuracy against the epoch, one column per schedule).

Pure data in, files out: rows are plain dicts (one per trial), built by the caller from Tune results or MLflow
runs. Nothing here talks to Ray or MLflow; the metric names are those the training loop logs (train/loop.py).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Metrics of train/loop.py's EPOCH_METRICS that the reports read (MLflow keeps every epoch; a row takes the last).
ACC1_METRIC, ACC5_METRIC = "val/top1", "val/top5"  # percent
LAMBDA_METRIC = "train/lambda"  # lambda(epoch) actually used
ARTIFACT_METRICS = (
    "artifact/outlier_fraction",
    "artifact/high_norm_fraction",
    "artifact/max_median_ratio",
    "artifact/cls_attention_entropy",
)

# Columns of the study's Table 8, in its order, then ours. Keys are row-dict keys; titles are printed headers.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("frozen_blocks", "Layers frozen"),
    ("registers", "Registers"),
    ("trainable_parameters", "Parameters"),
    ("lambda", "L2-norm λ"),
    ("schedule", "λ schedule"),
    ("epochs", "Epochs"),
    ("acc1", "Acc@1 (%)"),
    ("acc5", "Acc@5 (%)"),
)
# Columns that identify a configuration; the printed table shows a value only where it changes (as the paper).
GROUP_COLUMNS = ("frozen_blocks", "registers")


@dataclass(frozen=True)
class SweepTable:
    """Rows in Table 8 order plus the artifact-metric columns they carry."""

    rows: tuple[dict[str, Any], ...]
    artifact_columns: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return (*(key for key, _ in TABLE_COLUMNS), *self.artifact_columns, "status", "sweep", "trial", "run_id")

    @property
    def sweeps(self) -> tuple[str, ...]:
        """The sweeps the rows come from, in table order (rows without one are not counted)."""
        return tuple(dict.fromkeys(str(row["sweep"]) for row in self.rows if row.get("sweep")))


def build_table(rows: Sequence[Mapping[str, Any]], artifact_columns: Sequence[str]) -> SweepTable:
    """Sort trial rows as Table 8 does: frozen blocks descending, then registers, lambda, schedule ascending.

    Args:
        rows: one dict per trial with (some of) the keys of `TABLE_COLUMNS`, the artifact columns, `status`,
            `sweep`, `trial` and `run_id`; missing values are shown empty.
        artifact_columns: the artifact-metric keys to show after accuracy, in this order.
    """

    def key(row: Mapping[str, Any]) -> tuple:
        return (
            -_number(row.get("frozen_blocks"), -1),
            _number(row.get("registers"), -1),
            _number(row.get("lambda"), -1),
            str(row.get("schedule", "")),
            str(row.get("sweep", "")),
            str(row.get("trial", "")),
        )

    return SweepTable(tuple(dict(row) for row in sorted(rows, key=key)), tuple(artifact_columns))


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(number) else number


def _format(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key == "trainable_parameters":
        return f"{int(value):,}"
    if key in ("acc1", "acc5"):
        return f"{float(value):.2f}"
    if key == "lambda":
        return f"{float(value):.2f}" if float(value) >= 0.01 or float(value) == 0 else f"{float(value):.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(table: SweepTable) -> str:
    """The table as aligned text: Table 8's columns, then artifact metrics and trial status.

    Frozen blocks and registers are printed only where they change (the paper's grouping); the best acc@1 of
    each frozen-blocks group is marked with `*` (the paper's bold). Rows from several sweeps get a `sweep` column.
    """
    extra = ["status", "sweep"] if len(table.sweeps) > 1 else ["status"]
    keys = [key for key, _ in TABLE_COLUMNS] + list(table.artifact_columns) + extra
    titles = [title for _, title in TABLE_COLUMNS] + list(table.artifact_columns) + extra
    best: dict[Any, float] = {}
    for row in table.rows:
        acc = _number(row.get("acc1"), -math.inf)
        group = row.get("frozen_blocks")
        best[group] = max(best.get(group, -math.inf), acc)

    lines: list[list[str]] = []
    previous: dict[str, Any] = {}
    for row in table.rows:
        cells = []
        changed = False
        for key in keys:
            text = _format(key, row.get(key))
            if key in GROUP_COLUMNS:
                changed = changed or previous.get(key) != row.get(key)
                if not changed:
                    text = ""
            if key == "acc1" and text and _number(row.get("acc1"), -math.inf) == best[row.get("frozen_blocks")]:
                text += "*"
            cells.append(text)
        previous = row
        lines.append(cells)
    widths = [
        max(len(title), *(len(line[i]) for line in lines)) if lines else len(title) for i, title in enumerate(titles)
    ]
    out = ["  ".join(title.ljust(width) for title, width in zip(titles, widths, strict=True))]
    out.append("  ".join("-" * width for width in widths))
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    if lines:
        out.append("* best acc@1 within its number of frozen blocks")
    return "\n".join(out)


def write_csv(table: SweepTable, path: Path) -> Path:
    """Every row with every column, unformatted (full precision), header = row keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table.columns), extrasaction="ignore")
        writer.writeheader()
        for row in table.rows:
            writer.writerow({key: row.get(key, "") for key in table.columns})
    return path


# Axis labels of the artifact metrics the training loop reports (others are shown by their key).
METRIC_LABELS = {
    "artifact/outlier_fraction": "outlier fraction of patch tokens (auto detector)",
    "artifact/high_norm_fraction": "fraction of patch tokens with norm > 3x median",
    "artifact/max_median_ratio": "max / median patch-token norm",
    "artifact/cls_attention_entropy": "CLS attention entropy (1 = uniform)",
    "artifact/cls_attention_to_registers": "share of CLS attention on registers",
}


def plot_accuracy_vs_artifacts(table: SweepTable, path: Path, title: str) -> Path:
    """One panel per artifact metric: acc@1 (y) against the metric (x) for every trial with both values.

    Colour = number of registers, marker = frozen blocks, point label = lambda (and schedule when it varies).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    metrics = list(table.artifact_columns) or ["lambda"]
    rows = [row for row in table.rows if math.isfinite(_number(row.get("acc1"), math.nan))]
    registers = sorted({row.get("registers") for row in rows}, key=lambda v: _number(v, -1))
    frozen = sorted({row.get("frozen_blocks") for row in rows}, key=lambda v: _number(v, -1))
    schedules = {row.get("schedule") for row in rows}
    colours = plt.get_cmap("tab10")
    markers = "osD^v<>pPX*h"

    columns = min(2, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 4.5 * lines + 1.0), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for row in rows:
            x = _number(row.get(metric), math.nan)
            y = _number(row.get("acc1"), math.nan)
            if math.isnan(x):
                continue
            colour = colours(registers.index(row.get("registers")) % 10)
            marker = markers[frozen.index(row.get("frozen_blocks")) % len(markers)]
            ax.scatter(x, y, color=colour, marker=marker, s=60, edgecolors="black", linewidths=0.5, zorder=3)
            label = f"λ={_format('lambda', row.get('lambda'))}"
            if len(schedules) > 1:
                label += f" {row.get('schedule')}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel(METRIC_LABELS.get(metric, metric))
        ax.set_ylabel("validation acc@1 (%)")
        ax.grid(True, alpha=0.3)
    # One legend for the figure: colours (registers) and markers (frozen blocks), as proxy artists.
    handles = [
        plt.Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=f"registers: {r}")
        for i, r in enumerate(registers)
    ] + [
        plt.Line2D([], [], color="grey", marker=markers[i % len(markers)], linestyle="", label=f"frozen blocks: {f}")
        for i, f in enumerate(frozen)
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9, frameon=True)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class RunHistory:
    """One trained run's per-epoch metrics, for the lambda-schedule figure.

    Args:
        label: how the legend names the run (e.g. `λ=0.1 reg4 frozen10`).
        schedule: its lambda schedule (the figure's column).
        series: metric name -> (epoch, value) points in epoch order.
    """

    label: str
    schedule: str
    series: Mapping[str, Sequence[tuple[int, float]]]


def run_label(row: Mapping[str, Any], with_sweep: bool = False) -> str:
    """A trial's short name for legends: `λ=0.01 reg4 frozen10` (and `[sweep]` when rows of several sweeps mix)."""
    label = f"λ={_format('lambda', row.get('lambda'))} reg{_format('registers', row.get('registers'))}"
    label += f" frozen{_format('frozen_blocks', row.get('frozen_blocks'))}"
    return f"{label} [{row.get('sweep')}]" if with_sweep else label


# What the lambda-schedule figure's drawn lines hold: (schedule, metric, run label) -> (epochs, values).
PlottedLines = dict[tuple[str, str, str], tuple[tuple[float, ...], tuple[float, ...]]]


def plot_schedule_histories(
    runs: Sequence[RunHistory], measures: Sequence[str], path: Path, title: str
) -> PlottedLines:
    """The lambda-schedule figure: one column per schedule; rows lambda(epoch), each artifact measure, acc@1.

    Every run is one line per row, in the same colour down its column; rows share their y axis across
    columns, so schedules compare at a glance. Returns the data of every line as drawn (read back from the
    figure), so callers and tests see exactly what the PNG shows.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes or CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = [LAMBDA_METRIC, *measures, ACC1_METRIC]
    schedules = sorted({run.schedule for run in runs}, key=lambda name: (name != "constant", name))
    if not schedules:
        schedules = ["(no runs)"]
    width, height = 4.6 * len(schedules), 2.8 * len(metrics)
    fig, axes = plt.subplots(
        len(metrics), len(schedules), figsize=(width, height + 1.2), sharex="col", sharey="row", squeeze=False
    )
    colours = plt.get_cmap("tab10")
    plotted: PlottedLines = {}
    for column, schedule in enumerate(schedules):
        column_runs = [run for run in runs if run.schedule == schedule]
        for line, metric in enumerate(metrics):
            ax = axes[line, column]
            for index, run in enumerate(column_runs):
                points = list(run.series.get(metric, ()))
                if not points:
                    continue
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, marker="o", markersize=3, color=colours(index % 10), label=run.label)
            for drawn in ax.get_lines():
                x, y = drawn.get_data()
                plotted[(schedule, metric, drawn.get_label())] = (tuple(map(float, x)), tuple(map(float, y)))
            if line == 0:
                ax.set_title(f"schedule: {schedule}")
            if column == 0:
                ax.set_ylabel(_axis_label(metric), fontsize=8)
            if line == len(metrics) - 1:
                ax.set_xlabel("epoch (0-based, as in λ(epoch))")
                if column_runs:
                    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1, frameon=False)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return plotted


def _axis_label(metric: str) -> str:
    if metric == LAMBDA_METRIC:
        return "λ(epoch)"
    if metric == ACC1_METRIC:
        return "validation acc@1 (%)"
    return METRIC_LABELS.get(metric, metric)
