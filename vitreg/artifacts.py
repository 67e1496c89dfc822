"""Artifact detection on norm maps, and artifact removal at inference.

Detection methods:
- `threshold`: norms above an absolute value (the study used 100 on DINOv2).
- `top_percent`: the top p percent of tokens of each image (the study used 5%).
- `auto`: no threshold in norm units: Otsu's split of the log-norms, narrowed until its high side is rare (at
  most `max_fraction` of the tokens), accepted only when that rare group stands clearly above the bulk: more
  than `min_separation` bulk standard deviations, and a median norm at least `min_ratio` times the bulk's (a
  nearly constant bulk, such as a flat background, makes any textured patch many deviations away). A model
  without outliers yields an empty mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DETECTION_METHODS = ("threshold", "top_percent", "auto")


@dataclass
class ArtifactReport:
    """Outliers found in a (B, N) or (B, rows, cols) norm map."""

    mask: torch.Tensor  # bool, same shape as the norms
    method: str
    threshold: float  # norm value that separates outliers (nan when no split was found)
    outlier_fraction: float
    max_median_ratio: float
    positions: list[tuple[int, ...]]  # (image, index) or (image, row, col) of each outlier

    @property
    def count(self) -> int:
        return len(self.positions)


def otsu_split(values: np.ndarray) -> float:
    """Otsu's threshold on 1-D values, exactly (over the sorted values, no histogram bins); nan if constant."""
    sorted_values = np.sort(values.astype(np.float64).ravel())
    n = sorted_values.size
    if n < 2 or sorted_values[0] == sorted_values[-1]:
        return math.nan
    cumulative = np.cumsum(sorted_values)
    low_count = np.arange(1, n)  # the split after position i - 1 puts i values on the low side
    low_mean = cumulative[:-1] / low_count
    high_mean = (cumulative[-1] - cumulative[:-1]) / (n - low_count)
    between = low_count * (n - low_count) * (low_mean - high_mean) ** 2  # proportional to between-class variance
    between[sorted_values[1:] == sorted_values[:-1]] = -1  # split only between distinct values
    best = int(np.argmax(between))
    return float((sorted_values[best] + sorted_values[best + 1]) / 2)


def _auto_threshold(log_norms: np.ndarray, min_separation: float, max_fraction: float, min_ratio: float) -> float:
    """Norm threshold of a rare, clearly separate high group of log-norms, or nan when there is none.

    Otsu's split is taken; while its high side is too common (an object on a flat background, say) the high
    side is split again, since artifacts can be a rarer group above it. The split counts only if the rare group
    sits more than `min_separation` standard deviations of the bulk above the bulk's mean: a uniform or normal
    spread of norms has no such group (about 2), artifacts do (6 and more in DINOv2, DeiT-III).
    """
    values = log_norms.ravel().astype(np.float64)
    candidates = values
    while True:
        split = otsu_split(candidates)
        if math.isnan(split):
            return math.nan
        if (values > split).sum() <= max_fraction * values.size:
            break
        candidates = candidates[candidates > split]
    bulk, rare = values[values <= split], values[values > split]
    spread = bulk.std()
    separation = math.inf if spread == 0 else (rare.mean() - bulk.mean()) / spread
    ratio = math.exp(np.median(rare) - np.median(bulk))
    return math.exp(split) if separation > min_separation and ratio >= min_ratio else math.nan


def detect_artifacts(
    norms: torch.Tensor,
    method: str = "auto",
    threshold: float = 100.0,
    top_percent: float = 5.0,
    min_separation: float = 4.0,
    max_fraction: float = 0.1,
    min_ratio: float = 2.0,
) -> ArtifactReport:
    """Find high-norm outlier tokens in a norm map.

    Args:
        norms: (B, N) or (B, rows, cols) pre-norm L2 norms of patch tokens.
        method: one of `threshold`, `top_percent`, `auto`.
        threshold: absolute norm for `threshold`.
        top_percent: percent of tokens per image for `top_percent` (at least one token).
        min_separation: for `auto`, how many bulk standard deviations the rare group must sit above the bulk.
        max_fraction: largest fraction of tokens the `auto` split may call outliers.
        min_ratio: for `auto`, how many times the bulk's median norm the rare group's median must reach.
    """
    if method not in DETECTION_METHODS:
        raise ValueError(f"unknown detection method {method!r}; allowed: {', '.join(DETECTION_METHODS)}")
    if norms.dim() not in (2, 3):
        raise ValueError(f"norms must be (B, N) or (B, rows, cols); got shape {tuple(norms.shape)}")
    values = norms.detach().float().cpu()
    flat = values.reshape(values.shape[0], -1)  # (B, N)

    if method == "threshold":
        used = float(threshold)
        flat_mask = flat > used
    elif method == "top_percent":
        if not 0 < top_percent <= 100:
            raise ValueError(f"top_percent={top_percent}: must be in (0, 100]")
        flat_mask = top_percent_mask(flat, top_percent)
        used = float(flat[flat_mask].min())
    else:
        used = _auto_threshold(np.log(flat.clamp_min(1e-12).numpy()), min_separation, max_fraction, min_ratio)
        flat_mask = flat > used if math.isfinite(used) else torch.zeros_like(flat, dtype=torch.bool)

    mask = flat_mask.reshape(values.shape)
    median = float(flat.median())
    return ArtifactReport(
        mask=mask,
        method=method,
        threshold=used,
        outlier_fraction=float(mask.float().mean()),
        max_median_ratio=float(flat.max()) / median if median > 0 else math.inf,
        positions=[tuple(int(i) for i in index) for index in mask.nonzero()],
    )


def top_percent_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean (B, N) mask of the top `percent` scores of each row (at least one)."""
    k = max(1, math.ceil(scores.shape[1] * percent / 100))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


def neighbourhood_minimum(
    patches: torch.Tensor, grid: tuple[int, int], replace: torch.Tensor, connectivity: int = 8
) -> torch.Tensor:
    """Replace the flagged patch tokens by the element-wise minimum of their immediate neighbours.

    Neighbours that are flagged themselves are skipped (unless all are); borders do not wrap.

    Args:
        patches: (B, N, C) patch tokens, row-major over `grid`.
        grid: (rows, cols).
        replace: (B, N) bool mask of tokens to replace.
        connectivity: 4 (edge neighbours) or 8 (edges and corners).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}: must be 4 or 8")
    rows, cols = grid
    batch, _, channels = patches.shape
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = patches.clone()
    spatial = patches.reshape(batch, rows, cols, channels)
    flagged = replace.reshape(batch, rows, cols)
    for image, row, col in flagged.nonzero().tolist():
        neighbours = [(row + dr, col + dc) for dr, dc in offsets if 0 <= row + dr < rows and 0 <= col + dc < cols]
        clean = [(r, c) for r, c in neighbours if not flagged[image, r, c]] or neighbours
        stacked = torch.stack([spatial[image, r, c] for r, c in clean])  # (K, C)
        out[image, row * cols + col] = stacked.min(dim=0).values
    return out


class ArtifactRemoval:
    """The study's inference-time removal, as a token edit for `run_taps(token_edit=...)`.

    At each of `layers`, after the block: patch tokens that are in the top `norm_percent` by norm *and* in the
    top `attention_percent` by head-mean CLS attention (of that block) are replaced by the element-wise minimum
    of their neighbours. The forward then continues through every later block.
    """

    def __init__(
        self,
        layers: list[int],
        norm_percent: float = 5.0,
        attention_percent: float = 5.0,
        connectivity: int = 8,
    ) -> None:
        for name, value in (("norm_percent", norm_percent), ("attention_percent", attention_percent)):
            if not 0 < value <= 100:
                raise ValueError(f"{name}={value}: must be in (0, 100]")
        self.layers = list(layers)
        self.norm_percent = norm_percent
        self.attention_percent = attention_percent
        self.connectivity = connectivity
        self.removed: dict[int, torch.Tensor] = {}  # layer -> (B, N) mask of replaced patches

    def __call__(
        self,
        layer: int,
        tokens: torch.Tensor,
        cls_attention: torch.Tensor,
        prefix: int,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """Edit the (B, T, C) output of block `layer`; `cls_attention` is that block's (B, H, T) CLS row."""
        patches = tokens[:, prefix:]  # (B, N, C)
        by_norm = top_percent_mask(patches.float().norm(dim=-1), self.norm_percent)
        by_attention = top_percent_mask(cls_attention.float().mean(dim=1)[:, prefix:], self.attention_percent)
        replace = by_norm & by_attention
        self.removed[layer] = replace.cpu()
        if not replace.any():
            return tokens
        edited = neighbourhood_minimum(patches, grid, replace, self.connectivity)
        return torch.cat([tokens[:, :prefix], edited], dim=1)
