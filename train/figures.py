"""End-of-run figures from one tapped forward pass over the fixed validation images (matplotlib, Agg, PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import torch

from vitreg import Taps, detect_artifacts


def _show_map(axis: plt.Axes, values: torch.Tensor, title: str, cmap: str = "viridis") -> None:
    image = axis.imshow(values.detach().float().cpu().numpy(), cmap=cmap, interpolation="nearest")
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
    plt.colorbar(image, ax=axis, fraction=0.046, pad=0.04)


def _show_image(axis: plt.Axes, image: torch.Tensor, title: str) -> None:
    axis.imshow(image.detach().cpu().permute(1, 2, 0).numpy())  # (H, W, 3) uint8
    axis.set_title(title, fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def attention_figure(
    taps: Taps, images: torch.Tensor, layer: int, path: Path, title: str, max_registers: int = 4
) -> Path:
    """Per image (columns): the input, the CLS attention over patches, registers' attention, patch norms.

    Args:
        taps: `run_taps` output with `layer` among its norm and attention layers.
        images: (B, 3, H, W) uint8 images that were tapped (un-normalised, for display).
        layer: block index (non-negative) to show.
        path: PNG to write.
        title: figure title (run name, epoch).
        max_registers: show at most this many registers (the first ones).
    """
    return _save(draw_attention(taps, images, layer, title, max_registers), path)


def draw_attention(taps: Taps, images: torch.Tensor, layer: int, title: str, max_registers: int = 4) -> plt.Figure:
    """The figure of `attention_figure`, not yet saved: axes[row, column], rows image / CLS / registers / norms."""
    count = images.shape[0]
    registers = min(taps.num_registers, max_registers)
    rows = 3 + registers
    figure, axes = plt.subplots(rows, count, figsize=(max(6.0, 2.6 * count), 2.3 * rows), squeeze=False)
    cls_maps = taps.cls_attention_map(layer)  # (B, rows, cols)
    norm_maps = taps.patch_norm_map(layer)  # (B, rows, cols)
    for column in range(count):
        _show_image(axes[0, column], images[column], f"image {column}")
        _show_map(axes[1, column], cls_maps[column], f"CLS attention, block {layer}")
        for register in range(registers):
            reg_map = taps.register_attention_map(layer, register)[column]
            _show_map(axes[2 + register, column], reg_map, f"register {register} attention")
        _show_map(axes[rows - 1, column], norm_maps[column], "patch-token L2 norm", cmap="magma")
    figure.suptitle(f"{title}\nblock {layer}: head-mean attention, pre-norm patch norms", fontsize=10)
    figure.tight_layout()
    return figure


def norm_histogram(taps: Taps, layer: int, path: Path, title: str) -> Path:
    """Histogram (log count) of the pre-norm patch-token norms at `layer`, with the `auto` outlier threshold."""
    return _save(draw_norm_histogram(taps, layer, title), path)


def draw_norm_histogram(taps: Taps, layer: int, title: str) -> plt.Figure:
    """The figure of `norm_histogram`, not yet saved: one axis, bars of all images' patch norms, threshold line."""
    norms = taps.patch_norms[taps.layers.index(layer)]  # (B, N)
    report = detect_artifacts(norms, method="auto")
    values = norms.detach().float().cpu().numpy().ravel()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    bins = max(10, min(80, int(math.sqrt(values.size)) * 2))
    axis.hist(values, bins=bins, color="tab:blue", alpha=0.85, log=True)
    if math.isfinite(report.threshold):
        axis.axvline(report.threshold, color="tab:red", linestyle="--", label=f"auto threshold {report.threshold:.1f}")
    axis.axvline(float(np.median(values)), color="black", linestyle=":", label=f"median {np.median(values):.1f}")
    axis.set_xlabel("L2 norm of patch token (pre-norm output)")
    axis.set_ylabel("tokens (log scale)")
    axis.set_title(
        f"{title}\nblock {layer}: outliers {100 * report.outlier_fraction:.2f}%, "
        f"max/median {report.max_median_ratio:.2f}",
        fontsize=10,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
