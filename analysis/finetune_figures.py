"""The study's figures of fine-tuned models, from one tapped forward pass per model on a few fixed images.

- `progression_figure`: the [CLS] attention map of every block of one model, with the [CLS] token's norm per block
  printed over each map and plotted below the maps (the study's Figures 13 and 22, one model per figure);
- `progression_across_figure`: the same for several models on one image, one row per model;
- `schedules_figure`: [CLS] vs register attention of the last block, one column per trial (e.g. one lambda schedule
  each), rows: the [CLS] map, then each register's map (the study's Figure 23).

Every map is the head-mean attention of one query token over the patches, rescaled to sum 1 over the patches (a
block that sends most of its attention to [CLS] or the registers still shows where its patch attention goes), and
every figure draws its maps on one log10 colour scale, so blocks and trials compare by colour. The [CLS] norm is the
L2 norm of the [CLS] token in the block's pre-norm output (the residual stream, before the final LayerNorm).

The data behind the panels comes from pure functions (`attention_summary`, `progression_panels`,
`schedule_panels`); the drawing only lays them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import Normalize
from timm.models.vision_transformer import VisionTransformer

from analysis.data import DataSpec, open_splits
from analysis.probes import log_attention, normalise_maps
from analysis.report import slug
from analysis.specs import ModelSpec, load_model
from vitreg import count_registers, run_taps

CMAP = "inferno"


@dataclass(frozen=True)
class AttentionSummary:
    """What the fine-tuned figures show of one model on B images.

    Attributes:
        label: the model's name in the figures.
        title: a second line under the label (e.g. the lambda schedule).
        layers: the blocks, 0-based.
        cls_maps: (B, L, rows, cols) [CLS] attention over the patches at each block, head mean, sums to 1.
        cls_norms: (B, L) L2 norm of the [CLS] token in each block's pre-norm output.
        register_maps: (B, R, rows, cols) each register's attention over the patches in the last block, likewise.
        pixels: (B, H, W, 3) the images in [0, 1].
    """

    label: str
    title: str
    layers: list[int]
    cls_maps: np.ndarray
    cls_norms: np.ndarray
    register_maps: np.ndarray
    pixels: np.ndarray

    @property
    def registers(self) -> int:
        return self.register_maps.shape[1]


@torch.no_grad()
def attention_summary(
    model: VisionTransformer, images: torch.Tensor, pixels: np.ndarray, label: str, title: str = ""
) -> AttentionSummary:
    """Tap every block of `model` (eval mode) on normalised `images` (B, 3, S, S) once; see `AttentionSummary`."""
    model.eval()
    taps = run_taps(model, images, layers=None, attention_layers=None)
    last = taps.attention_layers[-1]
    cls_maps = torch.stack([taps.cls_attention_map(layer) for layer in taps.attention_layers], dim=1)
    register_maps = [taps.register_attention_map(last, register) for register in range(count_registers(model))]
    rows, cols = taps.grid
    return AttentionSummary(
        label=label,
        title=title,
        layers=list(taps.attention_layers),
        cls_maps=normalise_maps(cls_maps.float().cpu().numpy()),  # (B, L, rows, cols)
        cls_norms=taps.cls_norms.T.float().cpu().numpy(),  # (B, L)
        register_maps=normalise_maps(
            torch.stack(register_maps, dim=1).float().cpu().numpy()
            if register_maps
            else np.zeros((len(images), 0, rows, cols), dtype=np.float32)
        ),  # (B, R, rows, cols)
        pixels=np.asarray(pixels),
    )


def progression_panels(summary: AttentionSummary, image: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `image`'s row of the progression figure: the [CLS] maps (L, rows, cols) and norms (L,) per block."""
    return summary.cls_maps[image], summary.cls_norms[image]


def schedule_panels(summaries: Sequence[AttentionSummary], image: int) -> np.ndarray:
    """The grid of the schedules figure for image `image`: (1 + R, S, rows, cols), R the most registers of any
    model; row 0 holds each model's last-block [CLS] map, row 1 + r its register r's map (NaN where a model has
    fewer registers). Every model must have the same patch grid."""
    grids = {summary.cls_maps.shape[-2:] for summary in summaries}
    if len(grids) != 1:
        raise ValueError(f"schedules figure: the models' patch grids differ ({sorted(grids)}); probe at one img_size")
    registers = max(summary.registers for summary in summaries)
    panels = np.full((1 + registers, len(summaries), *grids.pop()), np.nan, dtype=np.float32)
    for column, summary in enumerate(summaries):
        panels[0, column] = summary.cls_maps[image, -1]
        panels[1 : 1 + summary.registers, column] = summary.register_maps[image]
    return panels


# ---------------------------------------------------------------- drawing


def _log_scale(maps: Sequence[np.ndarray]) -> tuple[Normalize, float]:
    """One log10 colour scale for all `maps` (..., rows, cols) of a figure, from the 1st percentile of their values
    to the largest (NaN panels ignored), and log10 of the share every patch gets under uniform attention."""
    values = np.concatenate([log_attention(np.asarray(m)).ravel() for m in maps])
    values = values[np.isfinite(values)]
    patches = int(np.prod(np.asarray(maps[0]).shape[-2:]))
    return Normalize(float(np.percentile(values, 1)), float(values.max())), float(np.log10(1 / patches))


def _show(axis: plt.Axes, values: np.ndarray, scale: Normalize) -> matplotlib.image.AxesImage:
    image = axis.imshow(log_attention(values), cmap=CMAP, norm=scale, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    return image


def _colorbar(figure: plt.Figure, image: matplotlib.image.AxesImage, axes: np.ndarray, uniform: float) -> None:
    bar = figure.colorbar(image, ax=axes, fraction=0.025, pad=0.01)
    bar.set_label(f"log10 share of the query's patch attention\n(uniform: {uniform:.2f})", fontsize=8)


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _heading(summary: AttentionSummary) -> str:
    return f"{summary.label}\n{summary.title}" if summary.title else summary.label


def progression_figure(summary: AttentionSummary, path: Path) -> Path:
    """One row per image: the image, then the [CLS] map of every block (its [CLS] norm in the title); below, the
    [CLS] norm per block as a line per image."""
    count, depth = summary.cls_maps.shape[:2]
    figure = plt.figure(figsize=(1.7 * (depth + 1) + 1.2, 1.9 * count + 2.6), layout="constrained")
    grid = figure.add_gridspec(count + 1, depth + 1, height_ratios=[1] * count + [1.2])
    scale, uniform = _log_scale([summary.cls_maps])
    shown = None
    map_axes = []
    for image in range(count):
        maps, norms = progression_panels(summary, image)
        picture = figure.add_subplot(grid[image, 0])
        picture.imshow(summary.pixels[image])
        picture.set_axis_off()
        picture.set_title(f"image {image}", fontsize=8)
        for column, layer in enumerate(summary.layers):
            axis = figure.add_subplot(grid[image, column + 1])
            shown = _show(axis, maps[column], scale)
            axis.set_title(f"block {layer}\n|CLS| = {norms[column]:.3g}", fontsize=8)
            map_axes.append(axis)
    _colorbar(figure, shown, np.array(map_axes), uniform)
    line = figure.add_subplot(grid[count, 1:])
    for image in range(count):
        line.plot(summary.layers, summary.cls_norms[image], marker="o", markersize=3, label=f"image {image}")
    line.set_xticks(summary.layers)
    line.set_xlabel("block")
    line.set_ylabel("[CLS] norm (pre-norm)")
    line.grid(alpha=0.3)
    line.legend(fontsize=7)
    details = f"\n{summary.title.replace(chr(10), '; ')}" if summary.title else ""
    figure.suptitle(f"{summary.label}: [CLS] attention over the patches per block (head mean){details}", fontsize=10)
    return _save(figure, path)


def progression_across_figure(summaries: Sequence[AttentionSummary], image: int, path: Path) -> Path:
    """One row per model for image `image`: the [CLS] map of every block with its [CLS] norm (Figures 13, 22)."""
    depth = max(len(summary.layers) for summary in summaries)
    figure, axes = plt.subplots(
        len(summaries),
        depth + 1,
        figsize=(1.7 * (depth + 1) + 1.2, 2.0 * len(summaries) + 0.8),
        squeeze=False,
        layout="constrained",
    )
    scale, uniform = _log_scale([summary.cls_maps[image] for summary in summaries])
    shown = None
    for row, summary in enumerate(summaries):
        maps, norms = progression_panels(summary, image)
        axes[row, 0].imshow(summary.pixels[image])
        axes[row, 0].set_title(_heading(summary), fontsize=8)
        for column in range(depth + 1):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        for column, layer in enumerate(summary.layers):
            shown = _show(axes[row, column + 1], maps[column], scale)
            axes[row, column + 1].set_title(f"block {layer}\n|CLS| = {norms[column]:.3g}", fontsize=8)
        for column in range(len(summary.layers) + 1, depth + 1):
            axes[row, column].set_axis_off()
    _colorbar(figure, shown, axes[:, 1:], uniform)
    figure.suptitle(f"[CLS] attention per block, image {image} (|CLS|: [CLS] norm of the block's output)", fontsize=10)
    return _save(figure, path)


def schedules_figure(summaries: Sequence[AttentionSummary], image: int, path: Path) -> Path:
    """[CLS] vs register attention of the last block: one column per model, rows [CLS], [REG] 0, [REG] 1, ..."""
    panels = schedule_panels(summaries, image)  # (1 + R, S, rows, cols)
    rows, columns = panels.shape[:2]
    figure, axes = plt.subplots(
        rows + 1, columns, figsize=(2.3 * columns + 1.2, 2.2 * (rows + 1) + 0.6), squeeze=False, layout="constrained"
    )
    scale, uniform = _log_scale([panels])
    shown = None
    for column, summary in enumerate(summaries):
        axes[0, column].imshow(summary.pixels[image])
        axes[0, column].set_title(_heading(summary), fontsize=8)
        axes[0, column].set_axis_off()
        for row in range(rows):
            axis = axes[row + 1, column]
            if np.isnan(panels[row, column]).all():
                axis.set_axis_off()
                axis.text(0.5, 0.5, "no such register", ha="center", va="center", fontsize=8, color="grey")
                continue
            shown = _show(axis, panels[row, column], scale)
            if column == 0 or np.isnan(panels[row, column - 1]).all():
                axis.set_ylabel("[CLS]" if row == 0 else f"[REG] {row - 1}", fontsize=9)
    if shown is not None:
        _colorbar(figure, shown, axes[1:, :], uniform)
    figure.suptitle(f"Last-block attention over the patches, image {image}: [CLS] vs registers", fontsize=10)
    return _save(figure, path)


# ---------------------------------------------------------------- models to figures


def summarise(specs: Sequence[ModelSpec], titles: Sequence[str], data: DataSpec, images: int) -> list[AttentionSummary]:
    """Load each model and tap it on the same first `images` test images of `data` (each at its resolution, with
    its normalisation)."""
    _, test, _ = open_splits(data, specs[0].name)
    indices = test.indices[:images]
    summaries = []
    for spec, title in zip(specs, titles, strict=True):
        model, mean, std = load_model(spec)
        batch = test.source.load(indices, model.patch_embed.img_size[0], mean, std)
        summaries.append(attention_summary(model, batch.images, batch.pixels.numpy(), spec.label, title))
    return summaries


def draw_finetune_figures(summaries: Sequence[AttentionSummary], out_dir: Path) -> list[Path]:
    """Every fine-tuned figure: a progression per model; per image, the progression of all models and the
    schedules comparison."""
    paths = [progression_figure(summary, out_dir / f"progression_{slug(summary.label)}.png") for summary in summaries]
    for image in range(len(summaries[0].pixels)):
        paths.append(progression_across_figure(summaries, image, out_dir / f"progression_all_image{image}.png"))
        paths.append(schedules_figure(summaries, image, out_dir / f"last_block_cls_vs_registers_image{image}.png"))
    return paths
