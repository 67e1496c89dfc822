"""Turn task results into tables (CSV), figures (PNG), key metrics and the claim-by-claim summary (markdown)."""

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
from analysis.probes import first_outlier_layer
from analysis.specs import ModelSpec
from analysis.tasks import TaskResult

CLAIMS = (
    "Artifact tokens are high-norm outliers",
    "They appear in large enough models after long training",
    "They hold global, not local, information",
    "They appear where patches are redundant (similar to their neighbours)",
    "Registers remove them and do not hurt (often help) downstream tasks",
)
NOT_HURT_TOLERANCE = 0.01  # "does not hurt": with registers at most 1 point below without


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


def _registers(report: Report, model: str) -> int:
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
        registers = {model: _registers(report, model) for model in counts}
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


# ---------------------------------------------------------------- metrics and summary


def _number(value: object) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _fmt(value: object, percent: bool = False) -> str:
    number = _number(value)
    if math.isnan(number):
        return "n/a"
    return f"{100 * number:.1f}%" if percent else f"{number:.3g}"


def _last(report: Report, probe: str, model: str) -> dict:
    rows = report.rows(probe, model)
    return max(rows, key=lambda row: row.get("layer", -1)) if rows else {}


def key_metrics(report: Report) -> dict[str, float]:
    """The few numbers per model worth comparing across runs in MLflow (finite values only)."""
    metrics: dict[str, float] = {}
    for spec in report.models:
        model = spec.label
        last = _last(report, "norms", model)
        values = {
            "outlier_fraction_last": last.get("outlier_fraction"),
            "max_median_ratio_last": last.get("max_median_ratio"),
            "first_outlier_layer": _first_layer(report, model),
        }
        for row in report.rows("correspondence", model):
            values |= {"correspondence_iou": row["iou"], "correspondence_precision": row["precision"]}
        for row in report.rows("neighbours", model):
            values |= {"neighbour_cos_artifact": row["artifact_mean"], "neighbour_cos_normal": row["normal_mean"]}
        for row in report.rows("global", model):
            values[f"global_acc_{row['tokens']}"] = row["accuracy_mean"]
        for row in report.rows("representation", model):
            values[f"repr_acc_{row['features']}"] = row["accuracy_mean"]
        for row in _last_layer_rows(report, "local", model):
            values[f"local_top1_{row['tokens']}"] = row["top1"]
        for row in report.rows("segmentation", model):
            values[f"miou_{row['variant']}"] = row["miou_mean"]
        for row in report.rows("removal", model):
            for key in (
                "total_variation_clean",
                "total_variation_removed",
                "cls_accuracy_clean",
                "cls_accuracy_removed",
            ):
                values[f"removal_{key}"] = row.get(key)
        for key, value in values.items():
            number = _number(value)
            if math.isfinite(number):
                metrics[f"{slug(model)}.{slug(key)}"] = number
    return metrics


def _first_layer(report: Report, model: str) -> int | None:
    rows = report.rows("norms", model)
    return first_outlier_layer([r["layer"] for r in rows], [r["outlier_fraction"] for r in rows]) if rows else None


def _last_layer_rows(report: Report, probe: str, model: str) -> list[dict]:
    rows = report.rows(probe, model)
    if not rows:
        return []
    top = max(row["layer"] for row in rows)
    return [row for row in rows if row["layer"] == top]


def _has_artifacts(report: Report, model: str) -> bool | None:
    last = _last(report, "norms", model)
    return None if not last else last["outlier_fraction"] > 0


def _claim_outliers(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        model, last = spec.label, _last(report, "norms", spec.label)
        if not last:
            continue
        text = (
            f"- `{model}`: last layer {_fmt(last['outlier_fraction'], True)} of patches are outliers "
            f"(threshold {_fmt(last['outlier_threshold'])}), max/median norm {_fmt(last['max_median_ratio'])}"
        )
        for row in report.rows("correspondence", model):
            text += (
                f"; top-{row['percent']:g}% norm vs top-{row['percent']:g}% CLS attention: precision "
                f"{_fmt(row['precision'])}, IoU {_fmt(row['iou'])}; mean CLS attention on artifacts "
                f"{_fmt(row['attention_artifact_mean'])} vs normal {_fmt(row['attention_normal_mean'])}"
            )
        lines.append(text + ".")
    found = [s.label for s in report.models if _has_artifacts(report, s.label)]
    if not lines:
        return ["Not tested: run the `norms` probe."]
    verdict = (
        f"Outliers found in {', '.join(f'`{m}`' for m in found)}." if found else "No model showed an outlier group."
    )
    return [*lines, "", f"**Reading:** {verdict}"]


def _claim_size(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        info, first = report.info.get(spec.label, {}), _first_layer(report, spec.label)
        if not report.rows("norms", spec.label):
            continue
        where = f"from layer {first} of {info.get('depth', '?')}" if first is not None else "none"
        lines.append(
            f"- `{spec.label}`: {_fmt(info.get('parameters', math.nan) / 1e6)} M parameters, artifacts {where}."
        )
    if not lines:
        return ["Not tested: run the `norms` probe."]
    with_artifacts = [s.label for s in report.models if _has_artifacts(report, s.label)]
    sizes = {s.label: report.info.get(s.label, {}).get("parameters", math.nan) for s in report.models}
    if with_artifacts:
        smallest = min(with_artifacts, key=lambda m: sizes[m])
        reading = f"the smallest model with artifacts is `{smallest}` ({_fmt(sizes[smallest] / 1e6)} M parameters)"
    else:
        reading = "no model here has artifacts"
    return [*lines, "", f"**Reading:** {reading}; training length is not measured by these probes."]


def _pct(value: object) -> str:
    return _fmt(value, percent=True)


def _global_text(rows: dict[str, dict]) -> str:
    a, n = rows.get("artifact", {}), rows.get("normal", {})
    return (
        f"class from one token: artifact {_pct(a.get('accuracy_mean'))} ± {_pct(a.get('accuracy_std'))} "
        f"vs normal {_pct(n.get('accuracy_mean'))} ± {_pct(n.get('accuracy_std'))}"
    )


def _local_text(rows: dict[str, dict]) -> str:
    a, n = rows.get("artifact", {}), rows.get("normal", {})
    return (
        f"position top-1 (last layer): artifact {_pct(a.get('top1'))} (prior {_pct(a.get('majority_top1'))}, "
        f"distance {_fmt(a.get('mean_distance'))}) vs normal {_pct(n.get('top1'))} "
        f"(distance {_fmt(n.get('mean_distance'))})"
    )


def _compare(rows: dict[str, dict], key: str) -> float:
    """artifact minus normal for `key` (nan when a group is missing)."""
    return _number(rows.get("artifact", {}).get(key)) - _number(rows.get("normal", {}).get(key))


def _claim_global(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        model = spec.label
        global_rows = {row["tokens"]: row for row in report.rows("global", model)}
        local_rows = {row["tokens"]: row for row in _last_layer_rows(report, "local", model)}
        parts = [_global_text(global_rows)] if global_rows else []
        parts += [_local_text(local_rows)] if local_rows else []
        if parts:
            more_global = _compare(global_rows, "accuracy_mean") > 0 if global_rows else None
            less_local = _compare(local_rows, "top1") < 0 if local_rows else None
            verdict = _verdict(more_global, less_local, _has_artifacts(report, model))
            lines.append(f"- `{model}`: {'; '.join(parts)}. {verdict}")
    return lines or ["Not tested: run the `global` and `local` probes (they need class labels for `global`)."]


def _verdict(more_global: bool | None, less_local: bool | None, has_artifacts: bool | None) -> str:
    checks = [check for check in (more_global, less_local) if check is not None]
    if has_artifacts is False or not checks:
        return "No artifacts to compare." if has_artifacts is False else ""
    if all(checks):
        return "Supports the claim."
    return "Does not support the claim." if not any(checks) else "Mixed."


def _claim_neighbours(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        for row in report.rows("neighbours", spec.label):
            art, normal = _number(row["artifact_mean"]), _number(row["normal_mean"])
            reading = (
                "no artifacts"
                if math.isnan(art)
                else "supports the claim"
                if art > normal
                else "does not support the claim"
            )
            artifact_part = f"artifact {_fmt(art)} (n={row['artifact_count']})"
            normal_part = f"normal {_fmt(normal)} (n={row['normal_count']})"
            lines.append(
                f"- `{spec.label}`: input-patch cosine to 4 neighbours, {artifact_part} vs {normal_part}: {reading}."
            )
    return lines or ["Not tested: run the `neighbours` probe."]


def _claim_registers(report: Report) -> list[str]:
    lines = []
    families: dict[str, list[ModelSpec]] = {}
    for spec in report.models:
        families.setdefault(spec.family, []).append(spec)
    for family, specs in families.items():
        counts = {_registers(report, s.label) for s in specs}
        if len(counts) < 2:
            continue
        ordered = sorted(specs, key=lambda s: _registers(report, s.label))
        base = ordered[0].label
        for spec in ordered[1:]:
            pair = (
                f"`{spec.label}` ({_registers(report, spec.label)} registers) vs `{base}` ({_registers(report, base)})"
            )
            lines.append(f"- `{family}`: {pair}: {_compare_pair(report, spec.label, base)}")
    for spec in report.models:
        variants = report.rows("segmentation", spec.label)
        block = [row for row in variants if row["variant"].startswith("last_block")]
        if block:
            text = ", ".join(
                f"{row['registers']} reg {_fmt(row['miou_mean'], True)} ± {_fmt(row['miou_std'], True)}"
                for row in block
            )
            linear = [row for row in variants if row["variant"] == "linear"]
            head = f"linear head {_fmt(linear[0]['miou_mean'], True)}; " if linear else ""
            lines.append(f"- `{spec.label}` segmentation, {head}last block + registers trained: {text}.")
    return lines or ["Not tested: give models of one family with and without registers (and/or run `segmentation`)."]


def _compare_pair(report: Report, with_registers: str, without: str) -> str:
    parts, hurts = [], []
    a, b = _last(report, "norms", with_registers), _last(report, "norms", without)
    if a and b:
        parts.append(f"outlier fraction {_fmt(a['outlier_fraction'], True)} vs {_fmt(b['outlier_fraction'], True)}")
    for probe, key, value in (
        ("representation", "features", "accuracy_mean"),
        ("segmentation", "variant", "miou_mean"),
    ):
        rows_a = {row[key]: row for row in report.rows(probe, with_registers)}
        rows_b = {row[key]: row for row in report.rows(probe, without)}
        for name in rows_a.keys() & rows_b.keys():
            x, y = _number(rows_a[name][value]), _number(rows_b[name][value])
            parts.append(f"{probe} {name} {_fmt(x, True)} vs {_fmt(y, True)}")
            hurts.append(x < y - NOT_HURT_TOLERANCE)
    removed = bool(a and b) and a["outlier_fraction"] < b["outlier_fraction"]
    reading = [
        ("fewer outliers with registers" if removed else "registers did not reduce outliers") if a and b else "",
        ("downstream not hurt (within 1 point)" if not any(hurts) else "downstream hurt by more than 1 point")
        if hurts
        else "",
    ]
    readings = "; ".join(r for r in reading if r)
    return "; ".join(parts) + (f". Reading: {readings}." if readings else ".")


def _removal_text(row: dict) -> str:
    return (
        f"- `{row['model']}`: removal at layer {row['layer']} ({row['layer_choice']}), "
        f"{_fmt(row['removed_per_image'])} tokens per image; CLS-map total variation "
        f"{_fmt(row['total_variation_clean'])} -> {_fmt(row['total_variation_removed'])} (lower is smoother); "
        f"outliers at the last layer {_pct(row['outlier_fraction_clean'])} -> {_pct(row['outlier_fraction_removed'])}; "
        f"CLS linear-probe accuracy {_pct(row.get('cls_accuracy_clean'))} -> {_pct(row.get('cls_accuracy_removed'))}; "
        f"model head unchanged on {_pct(row['head_agreement'])} of images."
    )


def _error_lines(errors: list[dict]) -> list[str]:
    """One line per (model, error), listing the probes it cost (a model that fails to load costs them all)."""
    probes_of: dict[tuple[str, str], list[str]] = {}
    for error in errors:
        probes_of.setdefault((error["model"], error["error"]), []).append(error["probe"])
    return [f"- `{model}` ({', '.join(dict.fromkeys(p))}): {text}" for (model, text), p in probes_of.items()]


def summary_markdown(report: Report, title: str, notes: Sequence[str] = ()) -> str:
    """The run's findings claim by claim, with the numbers behind each statement."""
    sections = [_claim_outliers, _claim_size, _claim_global, _claim_neighbours, _claim_registers]
    lines = [f"# {title}", "", *notes, ""]
    for number, (claim, section) in enumerate(zip(CLAIMS, sections, strict=True), start=1):
        lines += [f"## Claim {number}: {claim}", "", *section(report), ""]
    removal_rows = report.rows("removal")
    if removal_rows:
        lines += ["## Artifact removal at inference", ""]
    lines += [_removal_text(row) for row in removal_rows]
    if removal_rows:
        lines.append("")
    if report.errors:
        lines += ["## Errors", "", *_error_lines(report.errors), ""]
    if report.figures:
        lines += ["## Figures", "", *(f"- [{path.name}]({path.name})" for path in report.figures), ""]
    return "\n".join(lines)
