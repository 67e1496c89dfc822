"""Key metrics (for MLflow) and the claim-by-claim summary (markdown) of a `Report`, each verdict with its interval.

A verdict follows one rule (`analysis.uncertainty.Interval.verdict`): **supports** when the 95% bootstrap interval
over images of the effect the claim is about lies wholly on the claimed side of 0 (or of a stated margin),
**contradicts** when it lies wholly on the other side, otherwise **inconclusive**. Within-model effects (artifact
minus normal) come from the tasks' `effects` table; with/without-register effects are bootstrapped here from the
per-image values the tasks leave in the figure data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from analysis.probes import first_outlier_layer
from analysis.report import Report, register_count, slug
from analysis.specs import ModelSpec
from analysis.uncertainty import (
    CONFIDENCE,
    INCONCLUSIVE,
    RESAMPLES,
    SUPPORTS,
    ImageValues,
    Interval,
    bootstrap_effect,
    combined_verdict,
)

CLAIMS = (
    "Artifact tokens are high-norm outliers",
    "They appear in large enough models after long training",
    "They hold global, not local, information",
    "They appear where patches are redundant (similar to their neighbours)",
    "Registers remove them and do not hurt (often help) downstream tasks",
)
NOT_HURT_TOLERANCE = 0.01  # "does not hurt": with registers at most 1 point below without


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


def _pct(value: object) -> str:
    return _fmt(value, percent=True)


def _last(report: Report, probe: str, model: str) -> dict:
    rows = report.rows(probe, model)
    return max(rows, key=lambda row: row.get("layer", -1)) if rows else {}


def _last_layer_rows(report: Report, probe: str, model: str) -> list[dict]:
    rows = report.rows(probe, model)
    if not rows:
        return []
    top = max(row["layer"] for row in rows)
    return [row for row in rows if row["layer"] == top]


def _first_layer(report: Report, model: str) -> int | None:
    rows = report.rows("norms", model)
    return first_outlier_layer([r["layer"] for r in rows], [r["outlier_fraction"] for r in rows]) if rows else None


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
            for key in ("total_variation_clean", "total_variation_removed"):
                values[f"removal_{key}"] = row.get(key)
            for key in ("cls_accuracy_clean_mean", "cls_accuracy_removed_mean"):
                values[f"removal_{key.removesuffix('_mean')}"] = row.get(key)
        for name, interval in _model_effects(report, model).items():
            values |= {f"effect_{name}": interval.estimate, f"effect_{name}_low": interval.low}
            values[f"effect_{name}_high"] = interval.high
        for key, value in values.items():
            number = _number(value)
            if math.isfinite(number):
                metrics[f"{slug(model)}.{slug(key)}"] = number
    return metrics


# ---------------------------------------------------------------- effects and verdicts


def _effect(report: Report, model: str, probe: str) -> Interval | None:
    """The interval a task computed for `probe` (for per-layer probes: the last layer's), None if not measured."""
    rows = [row for row in report.rows("effects", model) if row["probe"] == probe]
    return Interval.from_row(max(rows, key=lambda row: row.get("layer", -1))) if rows else None


def _outlier_share(report: Report, model: str) -> ImageValues | None:
    """Per-image share of last-layer patches flagged as outliers (from the norms probe), None if not measured."""
    return report.figure_data.get("norm_last", {}).get(model, {}).get("outlier_share")


def _share_interval(report: Report, model: str) -> Interval | None:
    """The mean outlier share of the last layer with its interval over images: above 0 means "has artifacts"."""
    share = _outlier_share(report, model)
    return None if share is None else bootstrap_effect(share)


def _model_effects(report: Report, model: str) -> dict[str, Interval]:
    effects = {probe: _effect(report, model, probe) for probe in ("global", "local", "neighbours", "correspondence")}
    effects["outlier_share"] = _share_interval(report, model)
    return {name: interval for name, interval in effects.items() if interval is not None}


def _has_artifacts(report: Report, model: str) -> bool | None:
    """Whether the last layer has artifacts by the verdict rule (the outlier share's interval excludes 0)."""
    interval = _share_interval(report, model)
    return None if interval is None else interval.verdict(+1) == SUPPORTS


def _judged(
    interval: Interval, direction: int, threshold: float = 0.0, scale: float = 100, unit: str = " points"
) -> str:
    """`effect [interval]: verdict` for one effect of a claim."""
    return f"{interval.text(scale, unit)}: {interval.verdict(direction, threshold)}"


def _verdict_line(verdicts: Sequence[str]) -> str:
    return f"**Verdict: {combined_verdict(verdicts)}**" if verdicts else ""


def _claim_outliers(report: Report) -> list[str]:
    lines, supported = [], []
    for spec in report.models:
        model, last, share = spec.label, _last(report, "norms", spec.label), _share_interval(report, spec.label)
        if not last:
            continue
        verdicts = [] if share is None else [share.verdict(+1)]
        per_image = f" (per image {_judged(share, +1, unit='%')})" if share else ""
        text = (
            f"- `{model}`: last layer {_pct(last['outlier_fraction'])} of patches are outliers{per_image} "
            f"(threshold {_fmt(last['outlier_threshold'])}), max/median norm {_fmt(last['max_median_ratio'])}"
        )
        for row in report.rows("correspondence", model):
            text += (
                f"; top-{row['percent']:g}% norm vs top-{row['percent']:g}% CLS attention: precision "
                f"{_fmt(row['precision'])}, IoU {_fmt(row['iou'])}; mean CLS attention on artifacts "
                f"{_fmt(row['attention_artifact_mean'])} vs normal {_fmt(row['attention_normal_mean'])}"
            )
        attention = _effect(report, model, "correspondence")
        if attention is not None and _has_artifacts(report, model):
            text += f", artifact - normal {_judged(attention, +1, scale=1, unit='')}"
            verdicts.append(attention.verdict(+1))
        if combined_verdict(verdicts) == SUPPORTS:
            supported.append(model)
        lines.append(f"{text}. {_verdict_line(verdicts)}")
    if not lines:
        return ["Not tested: run the `norms` probe."]
    found = [s.label for s in report.models if _has_artifacts(report, s.label)]
    listed = ", ".join(f"`{m}`" for m in found)
    reading = f"Outliers found in {listed} (share interval above 0)" if found else "No model showed an outlier group"
    supports = f"; supported (outliers, and more CLS attention where measured) for {', '.join(supported)}"
    return [*lines, "", f"**Reading:** {reading}{supports if supported else ''}."]


def _claim_size(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        info, first = report.info.get(spec.label, {}), _first_layer(report, spec.label)
        if not report.rows("norms", spec.label):
            continue
        where = f"from layer {first} of {info.get('depth', '?')}" if first is not None else "none"
        has = {True: "", False: " (not above 0 by its interval)", None: ""}[_has_artifacts(report, spec.label)]
        lines.append(
            f"- `{spec.label}`: {_fmt(info.get('parameters', math.nan) / 1e6)} M parameters, artifacts {where}{has}."
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
    return [
        *lines,
        "",
        f"**Reading:** {reading}; no verdict: this claim compares models (training length is not measured here).",
    ]


def _seed_text(row: dict, mean: str, std: str, count: str = "", items: str = "") -> str:
    """`95.0% ± 1.2% (3 seeds, 60 test tokens per seed)`: mean ± sample std over seeds, and n (std: none for 1)."""
    seeds = int(row.get("seeds", 0))
    spread = f" ± {_pct(row.get(std))}" if seeds > 1 else ""
    n = f", {_fmt(row.get(count))} {items}" if count else ""
    return f"{_pct(row.get(mean))}{spread} ({seeds} seed{'s' if seeds != 1 else ''}{n})"


GLOBAL_COLUMNS = ("accuracy_mean", "accuracy_std", "test_tokens_mean", "test tokens per seed")
LOCAL_COLUMNS = ("top1", "top1_std", "count", "tokens (train + test) per seed")


def _claim_global(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        model = spec.label
        global_rows = {row["tokens"]: row for row in report.rows("global", model)}
        local_rows = {row["tokens"]: row for row in _last_layer_rows(report, "local", model)}
        if not global_rows and not local_rows:
            continue
        if _has_artifacts(report, model) is False:
            lines.append(f"- `{model}`: no artifacts to compare. **Verdict: {INCONCLUSIVE}**")
            continue
        parts, verdicts = [], []
        if global_rows:
            a, n = global_rows.get("artifact", {}), global_rows.get("normal", {})
            parts.append(
                f"class from one token: artifact {_seed_text(a, *GLOBAL_COLUMNS)} vs normal "
                f"{_seed_text(n, *GLOBAL_COLUMNS)}"
            )
            effect = _effect(report, model, "global")
            if effect is not None:
                parts[-1] += f", artifact - normal {_judged(effect, +1)}"
                verdicts.append(effect.verdict(+1))
        if local_rows:
            a, n = local_rows.get("artifact", {}), local_rows.get("normal", {})
            parts.append(
                f"position top-1 (last layer): artifact {_seed_text(a, *LOCAL_COLUMNS)} (prior "
                f"{_pct(a.get('majority_top1'))}) vs normal {_seed_text(n, *LOCAL_COLUMNS)}"
            )
            effect = _effect(report, model, "local")
            if effect is not None:
                parts[-1] += f", artifact - normal {_judged(effect, -1)}"
                verdicts.append(effect.verdict(-1))
        lines.append(f"- `{model}`: {'; '.join(parts)}. {_verdict_line(verdicts)}")
    lines = lines or ["Not tested: run the `global` and `local` probes (they need class labels for `global`)."]
    return [*lines, "", "Claimed: artifact tokens classify the image better (> 0) and place themselves worse (< 0)."]


def _claim_neighbours(report: Report) -> list[str]:
    lines = []
    for spec in report.models:
        effect = _effect(report, spec.label, "neighbours")
        for row in report.rows("neighbours", spec.label):
            artifact_part = f"artifact {_fmt(row['artifact_mean'])} (n={row['artifact_count']} patches)"
            normal_part = f"normal {_fmt(row['normal_mean'])} (n={row['normal_count']})"
            judged = f", artifact - normal {_judged(effect, +1, scale=1, unit='')}" if effect else ""
            verdict = _verdict_line([effect.verdict(+1)] if effect else [])
            lines.append(
                f"- `{spec.label}`: input-patch cosine to 4 neighbours, {artifact_part} vs {normal_part}{judged}. "
                f"{verdict}"
            )
    return lines or ["Not tested: run the `neighbours` probe."]


def _claim_registers(report: Report) -> list[str]:
    lines = []
    families: dict[str, list[ModelSpec]] = {}
    for spec in report.models:
        families.setdefault(spec.family, []).append(spec)
    for family, specs in families.items():
        if len({register_count(report, s.label) for s in specs}) < 2:
            continue
        ordered = sorted(specs, key=lambda s: register_count(report, s.label))
        base = ordered[0].label
        for spec in ordered[1:]:
            counts = register_count(report, spec.label), register_count(report, base)
            pair = f"`{spec.label}` ({counts[0]} registers) vs `{base}` ({counts[1]})"
            lines.append(f"- `{family}`: {pair}: {_compare_pair(report, spec.label, base)}")
    for spec in report.models:
        variants = report.rows("segmentation", spec.label)
        block = [row for row in variants if row["variant"].startswith("last_block")]
        if block:
            text = ", ".join(f"{row['registers']} reg {_seed_text(row, 'miou_mean', 'miou_std')}" for row in block)
            linear = [row for row in variants if row["variant"] == "linear"]
            head = f"linear head {_pct(linear[0]['miou_mean'])}; " if linear else ""
            lines.append(f"- `{spec.label}` segmentation, {head}last block + registers trained: {text}.")
    lines = lines or ["Not tested: give models of one family with and without registers (and/or run `segmentation`)."]
    note = (
        f"Claimed: fewer outliers with registers (difference < 0), and downstream accuracy not more than "
        f"{100 * NOT_HURT_TOLERANCE:g} point below without (difference > -{100 * NOT_HURT_TOLERANCE:g} points). "
        "Segmentation mIoU is shown (mean ± std over seeds) but not judged: it is not a mean over images."
    )
    return [*lines, "", note]


def _paired(a: ImageValues, b: ImageValues) -> bool:
    """Two models measured on the same images (same ids): resample them together."""
    return np.array_equal(a.ids, b.ids)


def _compare_pair(report: Report, with_registers: str, without: str) -> str:
    parts, verdicts = [], []
    a, b = _outlier_share(report, with_registers), _outlier_share(report, without)
    if a is not None and b is not None:
        effect = bootstrap_effect(a, b, paired=_paired(a, b))
        parts.append(f"outlier share {_pct(a.value)} vs {_pct(b.value)}, difference {_judged(effect, -1)}")
        verdicts.append(effect.verdict(-1))
    rows_a = {row["features"]: row for row in report.rows("representation", with_registers)}
    rows_b = {row["features"]: row for row in report.rows("representation", without)}
    images_a = report.figure_data.get("representation_images", {}).get(with_registers, {})
    images_b = report.figure_data.get("representation_images", {}).get(without, {})
    for name in sorted(rows_a.keys() & rows_b.keys()):
        text = f"representation {name} {_pct(rows_a[name]['accuracy_mean'])} vs {_pct(rows_b[name]['accuracy_mean'])}"
        if name in images_a and name in images_b:
            effect = bootstrap_effect(images_a[name], images_b[name], paired=_paired(images_a[name], images_b[name]))
            text += f", difference {_judged(effect, +1, threshold=-NOT_HURT_TOLERANCE)}"
            verdicts.append(effect.verdict(+1, threshold=-NOT_HURT_TOLERANCE))
        parts.append(text)
    rows_a = {row["variant"]: row for row in report.rows("segmentation", with_registers)}
    rows_b = {row["variant"]: row for row in report.rows("segmentation", without)}
    for name in sorted(rows_a.keys() & rows_b.keys()):
        parts.append(f"segmentation {name} {_pct(rows_a[name]['miou_mean'])} vs {_pct(rows_b[name]['miou_mean'])}")
    return "; ".join(parts) + f". {_verdict_line(verdicts)}"


def _removal_text(report: Report, row: dict) -> str:
    text = (
        f"- `{row['model']}`: removal at layer {row['layer']} ({row['layer_choice']}), "
        f"{_fmt(row['removed_per_image'])} tokens per image; CLS-map total variation "
        f"{_fmt(row['total_variation_clean'])} -> {_fmt(row['total_variation_removed'])} (lower is smoother)"
    )
    removal = [effect for effect in report.rows("effects", row["model"]) if effect["probe"] == "removal"]
    effects = {effect["effect"]: Interval.from_row(effect) for effect in removal}
    smoothing = effects.get("total variation removed - clean")
    if smoothing is not None:
        text += f", change {_judged(smoothing, -1, scale=1, unit='')} (claimed: smoother, < 0)"
    text += (
        f"; outliers at the last layer {_pct(row['outlier_fraction_clean'])} -> {_pct(row['outlier_fraction_removed'])}"
    )
    if "cls_accuracy_clean_mean" in row:
        clean = _seed_text(row, "cls_accuracy_clean_mean", "cls_accuracy_clean_std")
        removed = _seed_text(row, "cls_accuracy_removed_mean", "cls_accuracy_removed_std")
        text += f"; CLS linear-probe accuracy {clean} -> {removed}"
        accuracy = effects.get("CLS accuracy removed - clean")
        if accuracy is not None:
            text += f", change {accuracy.text(100, ' points')}"
    return f"{text}; model head unchanged on {_pct(row['head_agreement'])} of images."


def _error_lines(errors: list[dict]) -> list[str]:
    """One line per (model, error), listing the probes it cost (a model that fails to load costs them all)."""
    probes_of: dict[tuple[str, str], list[str]] = {}
    for error in errors:
        probes_of.setdefault((error["model"], error["error"]), []).append(error["probe"])
    return [f"- `{model}` ({', '.join(dict.fromkeys(p))}): {text}" for (model, text), p in probes_of.items()]


HOW_TO_READ = (
    f"How to read: `a ± s (k seeds, n ...)` is the mean and sample standard deviation over k seeds, each seed "
    f"drawing its own stratified train/test split (and token picks), with n the test items per seed. A verdict "
    f"reads **supports** only when the {100 * CONFIDENCE:g}% bootstrap interval of the effect ({RESAMPLES} "
    f"resamples of images with replacement, percentile interval, seeded) lies wholly on the claimed side of 0 (or "
    f"of the stated margin), **contradicts** when it lies wholly on the other side, and **inconclusive** otherwise."
)


def summary_markdown(report: Report, title: str, notes: Sequence[str] = ()) -> str:
    """The run's findings claim by claim, with the numbers and the verdict (with its interval) behind each one."""
    sections = [_claim_outliers, _claim_size, _claim_global, _claim_neighbours, _claim_registers]
    lines = [f"# {title}", "", *notes, "", HOW_TO_READ, ""]
    for number, (claim, section) in enumerate(zip(CLAIMS, sections, strict=True), start=1):
        lines += [f"## Claim {number}: {claim}", "", *section(report), ""]
    removal_rows = report.rows("removal")
    if removal_rows:
        lines += ["## Artifact removal at inference", "", *(_removal_text(report, row) for row in removal_rows), ""]
    if report.errors:
        lines += ["## Errors", "", *_error_lines(report.errors), ""]
    if report.figures:
        lines += ["## Figures", "", *(f"- [{path.name}]({path.name})" for path in report.figures), ""]
    return "\n".join(lines)
