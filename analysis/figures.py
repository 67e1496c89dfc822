"""Figures of the probes (matplotlib, Agg): each function draws one PNG from arrays and table rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm

from analysis.probes import NORM_BIN_EDGES, log_attention, normalise_maps
from vitreg.artifacts import top_percent_mask

MAX_PROGRESSION_COLUMNS = 12


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _map(axis: plt.Axes, values: np.ndarray, title: str, colorbar_label: str, **style) -> None:
    image = axis.imshow(values, cmap=style.pop("cmap", "viridis"), interpolation="nearest", **style)
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    plt.colorbar(image, ax=axis, fraction=0.046, pad=0.03).set_label(colorbar_label, fontsize=8)


def norm_layers(
    model: str, layers: Sequence[int], counts: np.ndarray, outlier_fraction: Sequence[float], path: Path
) -> Path:
    """Patch-norm histogram per layer (log norm x layer, colour = count) and the outlier fraction per layer."""
    figure, (heat, line) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    masked = np.ma.masked_equal(counts, 0)
    image = heat.pcolormesh(NORM_BIN_EDGES, np.arange(len(layers) + 1) - 0.5, masked, norm=LogNorm(), cmap="magma")
    heat.set_xscale("log")
    heat.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    used = NORM_BIN_EDGES[:-1][counts.sum(0) > 0]
    if used.size:
        heat.set_xlim(used.min() / 1.5, used.max() * 3)
    heat.set_xlabel("patch-token L2 norm (pre-norm, log scale)")
    heat.set_ylabel("layer (block output)")
    heat.set_title(f"{model}: norm distribution per layer")
    plt.colorbar(image, ax=heat).set_label("tokens (log scale)")
    line.plot(outlier_fraction, range(len(layers)), marker="o")
    line.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    line.set_xlabel("outlier fraction")
    line.set_title("outliers per layer")
    line.grid(alpha=0.3)
    return _save(figure, path)


def norm_comparison(counts: dict[str, np.ndarray], registers: dict[str, int], path: Path) -> Path:
    """Last-layer patch-norm histograms of every model, side by side (with and without registers)."""
    figure, axes = plt.subplots(
        1, len(counts), figsize=(4.2 * len(counts), 3.8), sharex=True, squeeze=False, layout="constrained"
    )
    centres = np.sqrt(NORM_BIN_EDGES[:-1] * NORM_BIN_EDGES[1:])
    nonzero = np.flatnonzero(sum(counts.values()) > 0)
    for axis, (model, values) in zip(axes[0], counts.items(), strict=True):
        axis.bar(
            centres,
            values,
            width=np.diff(NORM_BIN_EDGES),
            align="center",
            color="tab:blue" if not registers[model] else "tab:green",
        )
        axis.set_xscale("log")
        axis.set_yscale("log")
        if nonzero.size:
            axis.set_xlim(NORM_BIN_EDGES[nonzero[0]] / 1.5, NORM_BIN_EDGES[nonzero[-1] + 1] * 1.5)
        axis.set_title(f"{model}\n({registers[model]} registers)", fontsize=9)
        axis.set_xlabel("patch norm, last layer (log)")
        axis.set_ylabel("tokens (log)")
    figure.suptitle("Last-layer patch-norm distributions")
    return _save(figure, path)


def attention_maps(model: str, pixels: np.ndarray, maps: np.ndarray, registers: np.ndarray, path: Path) -> Path:
    """Per image: the image, CLS attention over it, that map linear and log, and each register's map.

    All maps are the last block's attention over the patches, head mean.
    """
    shown_registers = min(registers.shape[1], 4)
    columns = 4 + shown_registers
    figure, axes = plt.subplots(
        len(maps), columns, figsize=(3.4 * columns, 3 * len(maps)), squeeze=False, layout="constrained"
    )
    for row, (image, cls_map) in enumerate(zip(pixels, maps, strict=True)):
        height, width = image.shape[:2]
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("image", fontsize=9)
        axes[row, 1].imshow(image)
        # The patch map stretched over the image: each cell covers its patch.
        axes[row, 1].imshow(cls_map, cmap="inferno", alpha=0.6, extent=(0, width, height, 0), interpolation="nearest")
        axes[row, 1].set_title("CLS attention over the image", fontsize=9)
        for axis in axes[row, :2]:
            axis.axis("off")
        _map(axes[row, 2], cls_map, "CLS attention (last block)", "attention")
        _map(axes[row, 3], log_attention(cls_map), "CLS attention, log10", "log10 attention")
        for r in range(shown_registers):
            _map(axes[row, 4 + r], registers[row, r], f"register {r} attention", "attention")
    figure.suptitle(f"{model}: last-block attention over patches (head mean)")
    return _save(figure, path)


def attention_progression(
    model: str,
    layers: Sequence[int],
    maps: np.ndarray,
    names: Sequence[str],
    tokens: Sequence[int],
    grid: tuple,
    path: Path,
) -> Path:
    """Attention of each query (rows) over the patches, per layer (columns), log scale, first figure image."""
    step = max(1, math.ceil(len(layers) / MAX_PROGRESSION_COLUMNS))
    columns = list(range(0, len(layers), step))
    figure, axes = plt.subplots(
        len(names), len(columns), figsize=(1.9 * len(columns) + 1, 1.9 * len(names) + 0.6), squeeze=False
    )
    logs = log_attention(normalise_maps(maps))
    low, high = np.percentile(logs, 1), logs.max()
    image = None
    for q, name in enumerate(names):
        for c, index in enumerate(columns):
            axis = axes[q, c]
            image = axis.imshow(logs[index, q], cmap="inferno", vmin=low, vmax=high, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if q == 0:
                axis.set_title(f"layer {layers[index]}", fontsize=9)
            if c == 0:
                axis.set_ylabel(name, fontsize=9)
            if tokens[q] >= 0:  # patch queries: mark where the query token sits
                axis.plot(tokens[q] % grid[1], tokens[q] // grid[1], "c+", markersize=8, mew=2)
    figure.colorbar(image, ax=axes, fraction=0.02, pad=0.02).set_label("log10 attention share")
    figure.suptitle(f"{model}: attention across layers (first image; + marks the query patch)")
    return _save(figure, path)


def correspondence(model: str, norms: np.ndarray, attention: np.ndarray, percent: float, path: Path) -> Path:
    """Patch norms with red dots on the top-attention tokens, dot area proportional to attention."""
    figure, axes = plt.subplots(1, len(norms), figsize=(4.6 * len(norms), 4), squeeze=False)
    top = top_percent_mask(torch.tensor(attention.reshape(len(attention), -1)), percent).numpy()
    for axis, norm_map, attention_map, chosen in zip(axes[0], norms, attention, top, strict=True):
        _map(axis, norm_map, "patch norm, last layer", "L2 norm")
        rows, cols = np.unravel_index(np.flatnonzero(chosen), norm_map.shape)
        sizes = 400 * attention_map[rows, cols] / attention_map.max()
        axis.scatter(
            cols, rows, s=sizes, c="red", edgecolors="white", linewidths=0.8, label=f"top {percent:g}% CLS attention"
        )
        axis.legend(loc="lower right", fontsize=7)
    figure.suptitle(f"{model}: high-norm tokens vs high-attention tokens (dot size = attention)")
    return _save(figure, path)


def neighbours(values: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Distribution of patch-embedding cosine similarity to the 4 neighbours: artifact vs normal, per model."""
    figure, axes = plt.subplots(
        1, len(values), figsize=(4.2 * len(values), 3.8), squeeze=False, sharex=True, layout="constrained"
    )
    bins = np.linspace(-1, 1, 41)
    for axis, (model, groups) in zip(axes[0], values.items(), strict=True):
        for group, colour in (("normal", "tab:blue"), ("artifact", "tab:red")):
            data = groups[group]
            if data.size:
                axis.hist(data, bins=bins, density=True, alpha=0.55, color=colour, label=f"{group} (n={data.size})")
        axis.set_title(model, fontsize=9)
        axis.set_xlabel("cosine similarity to neighbours")
        axis.set_ylabel("density")
        axis.legend(fontsize=7)
    figure.suptitle("Input-patch similarity with 4 neighbours")
    return _save(figure, path)


def grouped_bars(
    rows: list[dict], group_key: str, value_key: str, error_key: str | None, title: str, ylabel: str, path: Path
) -> Path:
    """Bars per model, one colour per `group_key` value, with error bars (std over seeds)."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    groups = list(dict.fromkeys(str(row[group_key]) for row in rows))
    width = 0.8 / len(groups)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.6 * len(models) * len(groups) ** 0.5), 4))
    for g, group in enumerate(groups):
        values = [_lookup(rows, model, group_key, group, value_key) for model in models]
        errors = (
            [np.nan_to_num(_lookup(rows, model, group_key, group, error_key)) for model in models]
            if error_key
            else None
        )
        positions = np.arange(len(models)) + (g - (len(groups) - 1) / 2) * width
        axis.bar(positions, values, width, yerr=errors, capsize=3, label=group)
    axis.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(f"{title}\n(error bars: std over seeds)" if error_key else title, fontsize=11)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def _lookup(rows: list[dict], model: str, key: str, value: str, field: str) -> float:
    """The number in `field` of the model's row whose `key` is `value`; nan (no bar) when there is none."""
    for row in rows:
        if row["model"] == model and str(row[key]) == value:
            number = row.get(field)
            return float(number) if number is not None else math.nan
    return math.nan


def local_information(rows: list[dict], path: Path) -> Path:
    """Position-prediction top-1 accuracy per layer, artifact vs normal tokens, per model."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, model in enumerate(models):
        colour = f"C{index % 10}"
        for group, style in (("normal", "-o"), ("artifact", "--s")):
            chosen = sorted(
                (r["layer"], r["top1"], r["mean_distance"])
                for r in rows
                if r["model"] == model and r["tokens"] == group
            )
            if chosen and not all(math.isnan(top1) for _, top1, _ in chosen):
                layers, top1, distance = zip(*chosen, strict=True)
                axes[0].plot(layers, top1, style, color=colour, label=f"{model} {group}", markersize=4)
                axes[1].plot(layers, distance, style, color=colour, label=f"{model} {group}", markersize=4)
    axes[0].set_ylabel("top-1 position accuracy")
    axes[1].set_ylabel("mean distance (patches)")
    for axis in axes:
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Local information: predicting a token's position from its embedding")
    return _save(figure, path)


def removal(
    model: str, layer: int, clean: np.ndarray, removed: np.ndarray, removed_mask: np.ndarray, path: Path
) -> Path:
    """Last-block CLS attention before and after removing artifacts at `layer` (red dots: removed tokens)."""
    figure, axes = plt.subplots(len(clean), 2, figsize=(8.4, 3.6 * len(clean)), squeeze=False)
    for row in range(len(clean)):
        high = max(clean[row].max(), removed[row].max())
        _map(axes[row, 0], clean[row], "CLS attention, as is", "attention", vmin=0, vmax=high)
        _map(axes[row, 1], removed[row], f"after removal at layer {layer}", "attention", vmin=0, vmax=high)
        rows, cols = np.nonzero(removed_mask[row])
        axes[row, 1].scatter(cols, rows, s=60, c="red", edgecolors="white", label="removed tokens")
        if rows.size:
            axes[row, 1].legend(loc="lower right", fontsize=7)
    figure.suptitle(f"{model}: artifact removal at inference")
    return _save(figure, path)
