"""Artifact detection on norm maps, and artifact removal at inference.

Detection methods:
- `threshold`: norms above an absolute value (the study used 100 on DINOv2).
- `top_percent`: the top p percent of tokens of each image (the study used 5%).
- `auto`: no threshold in norm units and no cap on how common artifacts are: the tokens above the lowest
  *clear gap* of the batch's log-norms, each image taken relative to its own median (see `detect_artifacts`).
  A batch without such a gap yields an empty mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DETECTION_METHODS = ("threshold", "top_percent", "auto")
NORMAL_QUARTILE = 0.6744897501960817  # the upper quartile of a standard normal: (median - lower quartile) / sigma


@dataclass
class ArtifactReport:
    """Outliers found in a (B, N) or (B, rows, cols) norm map.

    `threshold` is one norm value: the given one (`threshold`), the lowest selected norm (`top_percent`), or for
    `auto` the split of an image whose median norm is the batch's median image median (nan when no gap was
    found). `image_thresholds` (B,) holds each image's own value: outliers of image b are its norms above it.
    For `auto`, `gap_spreads` and `median_ratio` describe the chosen split, or when none is clear the candidate
    whose weaker condition came closest to passing: how close the batch came.
    """

    mask: torch.Tensor  # bool, same shape as the norms
    method: str
    threshold: float
    outlier_fraction: float
    max_median_ratio: float
    positions: list[tuple[int, ...]]  # (image, index) or (image, row, col) of each outlier
    image_thresholds: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (B,) norm per image
    gap_spreads: float = math.nan  # auto: gap between bulk and group / the bulk's robust spread
    median_ratio: float = math.nan  # auto: group median / bulk median (each image relative to its median)

    @property
    def count(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class ClearGap:
    """The outcome of `find_clear_gap` on (B, N) log-norms, each image centred on its median."""

    split: float  # centred log value in the middle of the chosen gap (nan: no clear gap)
    gap_spreads: float
    median_ratio: float

    @property
    def found(self) -> bool:
        return math.isfinite(self.split)


def prefix_quantile(sorted_values: np.ndarray, sizes: np.ndarray, q: float) -> np.ndarray:
    """numpy's default (linear) `q` quantile of `sorted_values[:size]` for every size (each at least 1)."""
    position = q * (sizes - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, sizes - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def suffix_median(sorted_values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Median of `sorted_values[start:]` for every start."""
    count = sorted_values.size - starts
    return (sorted_values[starts + (count - 1) // 2] + sorted_values[starts + count // 2]) / 2


def find_clear_gap(log_norms: np.ndarray, min_gap: float, min_ratio: float, max_fraction: float) -> ClearGap:
    """The lowest clear gap in (B, N) log-norms; see `detect_artifacts` for the definition."""
    centred = log_norms - np.median(log_norms, axis=1, keepdims=True)
    values = np.sort(centred.ravel())
    n = values.size
    largest_group = min(math.floor(max_fraction * n), (n - 1) // 2)  # the group is a minority of the tokens
    if largest_group < 1:
        return ClearGap(math.nan, math.nan, math.nan)
    starts = np.arange(n - largest_group, n)  # group = values[start:], bulk = values[:start]
    gaps = values[starts] - values[starts - 1]
    bulk_median = prefix_quantile(values, starts, 0.5)
    spreads = (bulk_median - prefix_quantile(values, starts, 0.25)) / NORMAL_QUARTILE
    log_ratios = suffix_median(values, starts) - bulk_median
    with np.errstate(divide="ignore", invalid="ignore"):
        gap_spreads = np.where(gaps > 0, gaps / spreads, 0.0)  # inf when the bulk has no spread
    high_enough = log_ratios >= math.log(min_ratio)
    clear = high_enough & (gaps > min_gap * spreads)
    if clear.any():
        chosen = int(np.argmax(clear))  # the lowest clear gap: every token above it is clear of the bulk
        split = float((values[starts[chosen] - 1] + values[starts[chosen]]) / 2)
        return ClearGap(split, float(gap_spreads[chosen]), math.exp(float(log_ratios[chosen])))
    # No clear gap: describe the candidate whose weaker condition came closest to passing.
    ratio_score = log_ratios / math.log(min_ratio) if min_ratio > 1 else np.where(high_enough, np.inf, -np.inf)
    closest = int(np.argmax(np.minimum(gap_spreads / min_gap, ratio_score)))
    return ClearGap(math.nan, float(gap_spreads[closest]), math.exp(float(log_ratios[closest])))


def detect_artifacts(
    norms: torch.Tensor,
    method: str = "auto",
    threshold: float = 100.0,
    top_percent: float = 5.0,
    min_gap: float = 4.0,
    min_ratio: float = 3.0,
    max_fraction: float = 0.5,
) -> ArtifactReport:
    """Find high-norm outlier tokens in a norm map.

    `auto` flags a *clearly separated high-norm group*, defined on log-norms with each image shifted by its own
    median log-norm (so multiplying all norms, or one image's norms, by a constant changes nothing). The
    shifted values of all images are pooled and sorted; every split into a *bulk* below and a *group* above,
    with the group a minority (at most `max_fraction` of the tokens and fewer than half), is a candidate. A
    candidate is clear when both hold:

    1. gap: lowest group value - highest bulk value > `min_gap` x s, with s = (median - lower quartile) / 0.6745
       of the bulk (numpy's linear quantiles): its robust spread, the standard deviation for a normal bulk, taken
       on its lower half so that a textured upper shoulder of the bulk does not widen it;
    2. ratio: the group's median is at least `min_ratio` times the bulk's median.

    The outliers are the tokens above the lowest clear split (a group with sub-groups is flagged whole), none
    when no split is clear; image b's threshold is its median norm x exp(split). A group of any share up to
    `max_fraction`, one token included, is found on any grid.

    Per image or pooled: the split is common to the batch, so an image without artifacts keeps an empty row
    next to images with them, and the bulk's spread is estimated from all images (a lone 4x4 map has 16 tokens:
    pass a batch of a few hundred tokens or more). Each image's artifacts must be fewer than half its tokens,
    so that its median is a normal token.

    The defaults find no group in batches (256 tokens or more) of normal (CV up to 0.3), log-normal (sigma up
    to 0.5), gamma, Student-t (10 dof), two-mode (second mode up to 2x), gradient (up to 2x across the grid) or
    per-image-level (up to 3x) norms (tests/test_artifacts.py); the 3x ratio keeps a textured object on a flat
    background (about 2.3x it) out. Limits: the gap must be empty in the pooled values, so tokens strewn between
    bulk and artifacts hide them (the report's `gap_spreads` and `median_ratio` say how close the batch came);
    power-law tails of the norms can leave one token alone above a wide gap, which no rule of this kind can tell
    from a one-token artifact.

    Args:
        norms: (B, N) or (B, rows, cols) pre-norm L2 norms of patch tokens (positive and finite).
        method: one of `threshold`, `top_percent`, `auto`.
        threshold: absolute norm for `threshold`.
        top_percent: percent of tokens per image for `top_percent` (at least one token).
        min_gap: for `auto`, the gap between group and bulk in bulk spreads (condition 1).
        min_ratio: for `auto`, group median over bulk median (condition 2).
        max_fraction: for `auto`, the largest share of the tokens the group may have, in (0, 0.5].
    """
    if method not in DETECTION_METHODS:
        raise ValueError(f"unknown detection method {method!r}; allowed: {', '.join(DETECTION_METHODS)}")
    if norms.dim() not in (2, 3):
        raise ValueError(f"norms must be (B, N) or (B, rows, cols); got shape {tuple(norms.shape)}")
    values = norms.detach().cpu().double()
    flat = values.reshape(values.shape[0], -1)  # (B, N)
    if not torch.isfinite(flat).all() or (flat < 0).any():
        raise ValueError("norms must be finite and non-negative (L2 norms); got nan, inf or negative values")
    gap = ClearGap(math.nan, math.nan, math.nan)

    if method == "threshold":
        image_thresholds = torch.full((flat.shape[0],), float(threshold), dtype=torch.float64)
        flat_mask = flat > threshold
        used = float(threshold)
    elif method == "top_percent":
        if not 0 < top_percent <= 100:
            raise ValueError(f"top_percent={top_percent}: must be in (0, 100]")
        flat_mask = top_percent_mask(flat, top_percent)
        image_thresholds = flat.masked_fill(~flat_mask, math.inf).min(dim=1).values
        used = float(image_thresholds.min())
    else:
        for name, value, low, high in (("min_gap", min_gap, 0, math.inf), ("max_fraction", max_fraction, 0, 0.5)):
            if not low < value <= high:
                raise ValueError(f"{name}={value}: must be in ({low}, {high}]")
        if not min_ratio >= 1:
            raise ValueError(f"min_ratio={min_ratio}: must be at least 1")
        log_norms = flat.clamp_min(1e-30).log().numpy()
        gap = find_clear_gap(log_norms, min_gap, min_ratio, max_fraction)
        image_medians = np.median(log_norms, axis=1)
        flat_mask = torch.from_numpy(log_norms - image_medians[:, None] > gap.split)  # all False for a nan split
        image_thresholds = torch.from_numpy(np.exp(image_medians + gap.split))  # nan when no gap was found
        used = math.exp(float(np.median(image_medians)) + gap.split)

    mask = flat_mask.reshape(values.shape)
    median = float(flat.median())
    return ArtifactReport(
        mask=mask,
        method=method,
        threshold=used,
        outlier_fraction=float(mask.float().mean()),
        max_median_ratio=float(flat.max()) / median if median > 0 else math.inf,
        positions=[tuple(int(i) for i in index) for index in mask.nonzero()],
        image_thresholds=image_thresholds,
        gap_spreads=gap.gap_spreads,
        median_ratio=gap.median_ratio,
    )


def top_percent_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean (B, N) mask of the top `percent` scores of each row (at least one)."""
    k = max(1, math.ceil(scores.shape[1] * percent / 100))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


def _neighbour_offsets(connectivity: int) -> list[tuple[int, int]]:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}: must be 4 or 8")
    edges = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    return edges + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])


def neighbourhood_minimum(
    patches: torch.Tensor, grid: tuple[int, int], replace: torch.Tensor, connectivity: int = 8
) -> torch.Tensor:
    """Replace the flagged patch tokens by the element-wise minimum of their immediate neighbours.

    Neighbours that are flagged themselves are skipped (unless all are); borders do not wrap. Vectorised: one
    shifted copy of the grid per neighbour offset, no loop over tokens.

    Args:
        patches: (B, N, C) patch tokens, row-major over `grid`.
        grid: (rows, cols).
        replace: (B, N) bool mask of tokens to replace.
        connectivity: 4 (edge neighbours) or 8 (edges and corners).
    """
    offsets = _neighbour_offsets(connectivity)
    rows, cols = grid
    batch, tokens, channels = patches.shape
    if rows * cols != tokens:
        raise ValueError(f"grid {grid} has {rows * cols} cells but patches have {tokens} tokens")
    if rows * cols == 1 and replace.any():
        raise ValueError("a 1x1 patch grid has no neighbours to replace a token with")
    inf = torch.tensor(math.inf, dtype=patches.dtype, device=patches.device)
    # Pad by one cell: the border cells are outside the grid (never neighbours), the flags there are False.
    spatial = F.pad(patches.reshape(batch, rows, cols, channels).permute(0, 3, 1, 2), (1, 1, 1, 1), value=math.inf)
    flagged = F.pad(replace.reshape(batch, 1, rows, cols), (1, 1, 1, 1), value=False)
    inside = F.pad(torch.ones(1, 1, rows, cols, dtype=torch.bool, device=patches.device), (1, 1, 1, 1))
    clean_minimum = torch.full((batch, channels, rows, cols), math.inf, dtype=patches.dtype, device=patches.device)
    any_minimum = clean_minimum.clone()
    has_clean = torch.zeros(batch, 1, rows, cols, dtype=torch.bool, device=patches.device)
    for dr, dc in offsets:
        window = (slice(None), slice(None), slice(1 + dr, 1 + dr + rows), slice(1 + dc, 1 + dc + cols))
        neighbour = spatial[window]  # (B, C, rows, cols); inf outside the grid
        clean = inside[window] & ~flagged[window]  # (B or 1, 1, rows, cols)
        any_minimum = torch.minimum(any_minimum, neighbour)
        clean_minimum = torch.minimum(clean_minimum, torch.where(clean, neighbour, inf))
        has_clean |= clean
    minimum = torch.where(has_clean, clean_minimum, any_minimum)  # (B, C, rows, cols)
    minimum = minimum.permute(0, 2, 3, 1).reshape(batch, tokens, channels)
    return torch.where(replace[..., None], minimum, patches)


class ArtifactRemoval:
    """The study's inference-time removal, as a token edit for `run_taps(token_edit=...)`.

    At each of `layers` (any number, in forward order), after the block: patch tokens that are in the top
    `norm_percent` by norm *and* in the top `attention_percent` by head-mean CLS attention (of that block) are
    replaced by the element-wise minimum of their neighbours. The forward then continues through every later
    block, so a later layer of `layers` sees (and edits) the tokens as the earlier edits left them.
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
        if not layers:
            raise ValueError("layers: give at least one layer to remove artifacts at")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers={list(layers)}: each layer at most once")
        _neighbour_offsets(connectivity)
        self.layers = list(layers)
        self.norm_percent = norm_percent
        self.attention_percent = attention_percent
        self.connectivity = connectivity
        self.removed: dict[int, torch.Tensor] = {}  # layer -> (B, N) mask of replaced patches

    def replace_mask(self, patches: torch.Tensor, cls_attention: torch.Tensor, prefix: int) -> torch.Tensor:
        """(B, N) tokens to replace: top by norm of `patches` (B, N, C) and top by `cls_attention` (B, H, T)."""
        by_norm = top_percent_mask(patches.float().norm(dim=-1), self.norm_percent)
        by_attention = top_percent_mask(cls_attention.float().mean(dim=1)[:, prefix:], self.attention_percent)
        return by_norm & by_attention

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
        replace = self.replace_mask(patches, cls_attention, prefix)
        self.removed[layer] = replace.cpu()
        if not replace.any():
            return tokens
        edited = neighbourhood_minimum(patches, grid, replace, self.connectivity)
        return torch.cat([tokens[:, :prefix], edited], dim=1)
