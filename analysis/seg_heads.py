"""Every segmentation head trained together: one pass over device-resident features per epoch, mIoU on the device.

The segmentation probe trains, per model, a linear head on the frozen patch features and, for register-free models,
last-block variants (the last block, final norm, R new registers and a head; `LastBlockSegmenter`), each for every
seed and every head learning rate of a small grid. Trained one by one, each head rereads the host-cached features
minibatch by minibatch. Here, as DINOv2's linear evaluation trains a grid of heads at once:

- the cached features go to the device once (float16, upcast per minibatch);
- the linear heads of every (lr, seed) are one stacked weight (H, C, K), applied with one einsum (`LinearHeads`);
- the last-block variants of every (registers, lr, seed) are stepped on the same minibatch in the same loop
  (`BlockHeads`); each one's backward runs right after its forward, so only one block's activations are alive;
- one AdamW holds every head's parameters, one param group per (head set, lr). No parameter is shared between
  heads, so the summed loss gives each head the gradient it would get alone, and AdamW (elementwise) makes the step
  it would make alone: each head ends as if trained alone on the same minibatch order (tests/test_seg_heads.py).
- one minibatch order per epoch, shared by every head: `minibatch_order` of the first seed, the order today's
  `train_segmenter` draws for that seed. Seeds then vary only the heads' initialisation (and the new registers'),
  not the order; with so few epochs that still spreads the mIoU (tested), but a head trained to convergence on
  this convex problem would show little spread: the std measures optimisation noise, not data noise.
- a head whose loss turns non-finite is reported as nan (dropped from the mean and from `seeds`); today's loop
  skipped such steps instead. A minibatch of only ignored ("other") pixels is skipped by every head, as today.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.segmentation import (
    IGNORE_INDEX,
    HeadSettings,
    LastBlockSegmenter,
    check_order,
    confusion_matrix,
    has_last_block_variants,
    iou_from_confusion,
    logits_map,
    minibatch_order,
    to_targets,
)
from analysis.uncertainty import seed_stats

LINEAR_TRAINS = "head"
BLOCK_TRAINS = "head + last block + norm + registers"
MAP_BUDGET = 2**28  # elements of the upsampled training logits of the linear heads computed at once (1 GiB fp32)


@dataclass(frozen=True)
class HeadKey:
    """Which head: its variant, head learning rate and seed."""

    variant: str
    lr: float
    seed: int


class LinearHeads(nn.Module):
    """Linear heads C -> K, one per (lr, seed) in that order, as one (S, C, K) weight and (S, K) bias per lr.

    Each head starts as `nn.Linear(C, K)` built right after `torch.manual_seed(seed)`, the initialisation today's
    `LinearSegmenter` gets for that seed.
    """

    def __init__(self, channels: int, classes: int, lrs: Sequence[float], seeds: Sequence[int]) -> None:
        super().__init__()
        self.lr_grid = tuple(lrs)
        weights, biases = [], []
        for _ in self.lr_grid:
            initial = [_seeded_linear(channels, classes, seed) for seed in seeds]
            weights.append(nn.Parameter(torch.stack([linear.weight.detach().T for linear in initial])))
            biases.append(nn.Parameter(torch.stack([linear.bias.detach() for linear in initial])))
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases)

    @property
    def heads(self) -> int:
        return sum(len(weight) for weight in self.weights)

    @property
    def classes(self) -> int:
        return self.weights[0].shape[-1]

    def forward(self, patches: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """(B, N, C) -> (B, N, H, K) logits of the heads in `heads` (all by default)."""
        weight = torch.cat(list(self.weights))[heads]
        bias = torch.cat(list(self.biases))[heads]
        return torch.einsum("bnc,hck->bnhk", patches.float(), weight) + bias

    def parameter_groups(self, settings: HeadSettings) -> list[dict]:
        return [
            {"params": [weight, bias], "lr": lr, "weight_decay": settings.weight_decay}
            for lr, weight, bias in zip(self.lr_grid, self.weights, self.biases, strict=True)
        ]


class BlockHeads(nn.Module):
    """One `LastBlockSegmenter` per (registers, lr, seed) in that order; each built after `torch.manual_seed(seed)`
    (its head and new registers), as today's loop builds it."""

    def __init__(
        self,
        block: nn.Module,
        norm: nn.Module,
        prefix: int,
        classes: int,
        registers: Sequence[int],
        lrs: Sequence[float],
        seeds: Sequence[int],
    ) -> None:
        super().__init__()
        self.lr_grid = tuple(lrs)
        self.lrs = [lr for _ in registers for lr in lrs for _ in seeds]  # each head's
        segmenters = []
        for count in registers:
            for _ in lrs:
                for seed in seeds:
                    torch.manual_seed(seed)
                    segmenters.append(LastBlockSegmenter(block, norm, prefix, count, classes))
        self.segmenters = nn.ModuleList(segmenters)

    @property
    def heads(self) -> int:
        return len(self.segmenters)

    @property
    def classes(self) -> int:
        return self.segmenters[0].head.out_features

    def forward(self, tokens: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """(B, T, C) second-to-last block outputs -> (B, N, H, K) logits of the heads in `heads`."""
        return torch.stack([segmenter(tokens) for segmenter in self.segmenters[heads]], dim=2)

    def parameter_groups(self, settings: HeadSettings) -> list[dict]:
        return [
            {"lr": lr, "weight_decay": settings.weight_decay} | group  # the head's group names no lr: the grid's
            for segmenter, lr in zip(self.segmenters, self.lrs, strict=True)
            for group in segmenter.parameter_groups(replace(settings, lr=lr))
        ]


@dataclass
class HeadSet:
    """Heads that read the same cached input (`patches` or `block_inputs`) with the same training settings."""

    heads: LinearHeads | BlockHeads
    inputs: str
    settings: HeadSettings

    def passes(self, batch: int, pixels: int) -> list[slice]:
        """Head slices computed together in one forward and backward: as many linear heads as fit their upsampled
        logits (batch x K x pixels each) in `MAP_BUDGET`, and one last-block variant at a time (its block's
        activations dominate)."""
        count = self.heads.heads
        per_head = batch * self.heads.classes * pixels
        size = max(1, MAP_BUDGET // per_head) if isinstance(self.heads, LinearHeads) else 1
        return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def train_heads(
    head_sets: Sequence[HeadSet],
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    grid: tuple[int, int],
    order: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Train every head of `head_sets` on the same minibatches; returns, per head set, which heads stayed finite (H,).

    `inputs` maps each input name to (B, ..., C) features and `labels` is (B, H, W) ADE-style, all on the heads'
    device. The head sets must share `batch_size` and `label_stride`; each trains for its own `epochs` of `order`.
    """
    settings = head_sets[0].settings
    if any(
        (s.settings.batch_size, s.settings.label_stride) != (settings.batch_size, settings.label_stride)
        for s in head_sets
    ):
        raise ValueError("heads trained together need one batch_size and label_stride")
    epochs = max(head_set.settings.epochs for head_set in head_sets)
    check_order(order, len(labels), epochs)
    stride = settings.label_stride
    labels = labels[:, stride // 2 :: stride, stride // 2 :: stride]  # as `training_targets`; converted per minibatch
    groups = [group for head_set in head_sets for group in head_set.heads.parameter_groups(head_set.settings)]
    optimizer = torch.optim.AdamW(groups)
    device = labels.device
    finite = [torch.ones(head_set.heads.heads, dtype=torch.bool, device=device) for head_set in head_sets]
    for head_set in head_sets:
        head_set.heads.train()
    for epoch, permutation in enumerate(order[:epochs]):
        for index in permutation.to(device).split(settings.batch_size):
            targets = to_targets(labels[index])  # (b, h, w)
            valid = targets != IGNORE_INDEX
            if not bool(valid.any()):  # a minibatch of only "other" pixels has nothing to learn from
                continue
            optimizer.zero_grad(set_to_none=True)  # heads past their epochs keep grad None: AdamW skips them
            for head_set, ok in zip(head_sets, finite, strict=True):
                if epoch >= head_set.settings.epochs:
                    continue
                features = inputs[head_set.inputs][index].float()
                for heads in head_set.passes(len(index), targets[0].numel()):
                    losses = _head_losses(head_set.heads(features, heads), targets, valid, grid)  # (h,)
                    ok[heads] &= losses.detach().isfinite()
                    losses.sum().backward()  # each head's gradient is its own: no parameter is shared
            optimizer.step()
    for head_set in head_sets:
        head_set.heads.eval()
    return finite


def _head_losses(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """(B, N, H, K) patch logits, (B, h, w) targets -> (H,) each head's cross-entropy, mean over valid pixels."""
    batch, patches, heads, classes = logits.shape
    maps = logits_map(logits.reshape(batch, patches, heads * classes), grid, targets.shape[-2:])  # (B, H * K, h, w)
    per_image_head = targets.unsqueeze(1).expand(-1, heads, -1, -1).flatten(0, 1)  # (B * H, h, w)
    pixel_losses = F.cross_entropy(
        maps.unflatten(1, (heads, classes)).flatten(0, 1), per_image_head, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B * H, h, w), 0 at ignored pixels; the class dimension stays contiguous
    return pixel_losses.unflatten(0, (batch, heads)).sum((0, 2, 3)) / valid.sum()


@torch.no_grad()
def evaluate_heads(
    head_set: HeadSet,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    grid: tuple[int, int],
    classes: int,
    batch_size: int = 4,
) -> torch.Tensor:
    """(H, K, K) confusion matrices of every head on full-resolution (B, H, W) ADE-style labels, on the device."""
    confusion = torch.zeros(head_set.heads.heads, classes, classes, dtype=torch.long, device=labels.device)
    for start in range(0, len(inputs), batch_size):
        chunk = slice(start, start + batch_size)
        targets = to_targets(labels[chunk])
        logits = head_set.heads(inputs[chunk].float())  # (b, N, H, K)
        predicted = torch.stack(
            [logits_map(logits[:, :, head], grid, targets.shape[-2:]).argmax(1) for head in range(logits.shape[2])]
        )  # (H, b, h, w): one head's full-resolution map at a time
        confusion += confusion_matrix(predicted, targets, classes)
    return confusion


def segmentation_rows(
    cached: dict[str, tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    prefix: int,
    grid: tuple[int, int],
    classes: int,
    settings,
    device: torch.device | str,
    order: Sequence[torch.Tensor] | None = None,
) -> list[dict]:
    """One row per (variant, head lr): mIoU mean and std over `settings.seeds`, every head trained together.

    Args:
        cached: `patches` (train, test) (B, N, C) normalised patch features, `masks` (train, test) (B, H, W)
            ADE-style labels and, for the last-block variants, `block_inputs` (train, test) (B, T, C).
        model: the frozen model; its last block and final norm seed the last-block variants.
        prefix: CLS + the model's own registers. Last-block variants (`settings.seg_registers`) run for models
            without registers of their own (prefix 1) and at least 2 blocks, as before.
        settings: a `ProbeSettings` (seg_head, seg_block, seg_registers, seeds and, when it has it, seg_lrs: the
            head learning rates tried for every variant; empty or absent: each variant's own `HeadSettings.lr`).
        order: the minibatch order, one permutation of the training images per epoch (default: `minibatch_order`
            of the first seed).
    """
    seeds, lrs_grid = tuple(settings.seeds), tuple(settings.seg_lrs)
    _check_grid(seeds, lrs_grid)
    depth = len(model.blocks)
    registers = tuple(settings.seg_registers) if has_last_block_variants(depth, prefix) else ()
    names = ("patches", "masks", "block_inputs") if registers else ("patches", "masks")
    _check_cached(cached, names, prefix, grid)
    on_device = {name: tuple(split.to(device) for split in cached[name]) for name in names}
    head_lrs = lrs_grid or (settings.seg_head.lr,)
    block_lrs = lrs_grid or (settings.seg_block.lr,)
    head_sets = [
        HeadSet(LinearHeads(cached["patches"][0].shape[-1], classes, head_lrs, seeds), "patches", settings.seg_head)
    ]
    if registers:
        blocks = BlockHeads(model.blocks[depth - 1], model.norm, prefix, classes, registers, block_lrs, seeds)
        head_sets.append(HeadSet(blocks, "block_inputs", settings.seg_block))
    for head_set in head_sets:
        head_set.heads.to(device)
    labels_train, labels_test = on_device["masks"]
    order = (
        order
        if order is not None
        else minibatch_order(len(labels_train), max(s.settings.epochs for s in head_sets), seeds[0])
    )
    finite = []
    for together in _by_minibatch(head_sets):
        trained = train_heads(together, {name: on_device[name][0] for name in names}, labels_train, grid, order)
        finite += [(head_set, ok) for head_set, ok in zip(together, trained, strict=True)]
    rows = []
    for head_set, ok in finite:
        miou = iou_from_confusion(evaluate_heads(head_set, on_device[head_set.inputs][1], labels_test, grid, classes))[
            0
        ]
        scores = torch.where(ok, miou, torch.full_like(miou, math.nan)).cpu().numpy()
        rows += _rows(head_set, scores, registers, prefix, classes, seeds)
    return rows


def _rows(
    head_set: HeadSet, scores: np.ndarray, registers: Sequence[int], prefix: int, classes: int, seeds: tuple[int, ...]
) -> list[dict]:
    """The table rows of one head set from its per-head mIoU (heads ordered [registers,] lr, seed)."""
    linear = isinstance(head_set.heads, LinearHeads)
    variants = [("linear", prefix - 1)] if linear else [(f"last_block+reg{count}", count) for count in registers]
    lrs = head_set.heads.lr_grid
    per_seed = scores.reshape(len(variants), len(lrs), len(seeds))
    return [
        {
            "variant": name,
            "registers": count,
            "trains": LINEAR_TRAINS if linear else BLOCK_TRAINS,
            "epochs": head_set.settings.epochs,
            "lr": lr,
            "classes": classes,
            **seed_stats(list(per_seed[v, i]), "miou"),  # mean and sample std over seeds, as the other probes
            "seeds": int(np.isfinite(per_seed[v, i]).sum()),
        }
        for v, (name, count) in enumerate(variants)
        for i, lr in enumerate(lrs)
    ]


def _by_minibatch(head_sets: list[HeadSet]) -> list[list[HeadSet]]:
    """Head sets grouped by (batch_size, label_stride): a group shares its minibatches."""
    groups: dict[tuple[int, int], list[HeadSet]] = {}
    for head_set in head_sets:
        groups.setdefault((head_set.settings.batch_size, head_set.settings.label_stride), []).append(head_set)
    return list(groups.values())


def _seeded_linear(channels: int, classes: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(channels, classes)


def _check_grid(seeds: tuple[int, ...], lrs: tuple[float, ...]) -> None:
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: give each seed once (a repeated seed would repeat a head and shrink the std)")
    if len(set(lrs)) != len(lrs) or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"seg_lrs={lrs}: head learning rates must be distinct, finite and positive")


def _check_cached(
    cached: dict[str, tuple[torch.Tensor, torch.Tensor]], names: Sequence[str], prefix: int, grid: tuple[int, int]
) -> None:
    """Raise unless `cached` holds (train, test) pairs of `names` with matching image counts and token counts."""
    missing = [name for name in names if name not in cached]
    if missing:
        raise ValueError(f"cached features lack {missing} (have {sorted(cached)})")
    patches = grid[0] * grid[1]
    for split, label in ((0, "train"), (1, "test")):
        count = len(cached["masks"][split])
        if count == 0:
            raise ValueError(f"no {label} images in the cached segmentation features")
        if cached["masks"][split].ndim != 3:
            raise ValueError(f"masks ({label}) have shape {tuple(cached['masks'][split].shape)}; expected (B, H, W)")
        for name, tokens in (("patches", patches), ("block_inputs", prefix + patches)):
            if name in names:
                features = cached[name][split]
                if features.ndim != 3 or features.shape[:2] != (count, tokens):
                    raise ValueError(
                        f"{name} ({label}) have shape {tuple(features.shape)}; expected ({count}, {tokens}, C) "
                        f"for {count} masks, grid {grid} and prefix {prefix}"
                    )
