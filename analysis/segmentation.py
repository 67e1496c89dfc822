"""Segmentation probe: linear heads on frozen patch features, mIoU with an ignore index. Pure torch, no I/O.

Labels follow ADE20K: 0 is "other" (ignored), 1..K are the classes. mIoU averages IoU over the classes that occur
in the ground truth or the prediction (the standard protocol); the study's own code averaged 151 classes,
"other" and absent classes included, which we do not copy.

Two heads:
- `train_linear_head`: a linear layer on frozen, normalised patch features.
- `train_last_block_head`: the study's DeiT-III variant: the last block (and the final norm) trained together
  with `registers` new register tokens inserted right before it, and the linear head. Its inputs are the cached
  outputs of the second-to-last block, so every variant trains from the same single forward pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex

IGNORE_INDEX = 255


def has_last_block_variants(depth: int, prefix: int) -> bool:
    """Whether a model gets the last block + norm + new registers heads besides the linear one: models without
    registers of their own (prefix = CLS only) and with a block before the last (whose output is their input)."""
    return depth >= 2 and prefix == 1


def to_targets(labels: torch.Tensor) -> torch.Tensor:
    """ADE20K-style labels (0 = other, 1..K) -> training targets (0..K-1, IGNORE_INDEX for other)."""
    targets = labels.long() - 1
    return torch.where(targets < 0, torch.full_like(targets, IGNORE_INDEX), targets)


def iou_metrics(num_classes: int) -> MetricCollection:
    """`miou` (float) and per-class `iou` (K,) of the standard protocol, accumulated over `update(predicted, targets)`.

    torchmetrics 1.9's `MulticlassJaccardIndex` drops `IGNORE_INDEX` pixels before counting and, with
    `average="macro"`, gives weight 0 to classes whose union is 0 (absent from target and prediction), so `miou` is
    the mean IoU over the classes present; the per-class `iou` is nan for those classes. Both share one confusion
    matrix (a compute group); the IoU division runs in float32 (about 1e-7 relative).
    """
    shared = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX}
    return MetricCollection(
        {
            "miou": MulticlassJaccardIndex(average="macro", **shared),
            "iou": MulticlassJaccardIndex(average="none", zero_division=math.nan, **shared),
        }
    )


def mean_iou(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU) of predicted class ids against targets (0..K-1, `IGNORE_INDEX` skipped)."""
    metrics = iou_metrics(num_classes)
    metrics.update(predicted, targets)
    scores = metrics.compute()
    return scores["miou"].item(), scores["iou"].numpy()


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., K, K) int64 pixel counts, rows = target class, columns = predicted class, on the inputs' device.

    `predicted` is (..., *S) class ids of one or more heads (leading dimensions) for the same (*S) `targets`
    (0..K-1, `IGNORE_INDEX` pixels skipped): one `bincount` over head-offset indices, no Python loop over heads.
    """
    shape = predicted.shape[: predicted.ndim - targets.ndim]
    if predicted.shape[len(shape) :] != targets.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} does not end with the targets' shape {tuple(targets.shape)}"
        )
    valid = targets != IGNORE_INDEX
    if bool(((targets < 0) | (targets >= num_classes))[valid].any()):
        raise ValueError(f"targets outside 0..{num_classes - 1} (and not IGNORE_INDEX={IGNORE_INDEX})")
    heads = math.prod(shape)
    cells = (targets[valid] * num_classes).unsqueeze(0) + predicted.reshape(heads, *targets.shape)[:, valid].long()
    cells = cells + torch.arange(heads, device=cells.device).unsqueeze(1) * num_classes**2
    counts = torch.bincount(cells.flatten(), minlength=heads * num_classes**2)
    return counts.reshape(*shape, num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mIoU (...), per-class IoU (..., K)) of (..., K, K) confusion matrices, as `iou_metrics` computes them.

    IoU = TP / (TP + FP + FN) per class, nan where the class is in neither target nor prediction; mIoU averages the
    classes that are (nan when none is). Computed in float64 on the confusion matrix's device.
    """
    counts = confusion.double()
    hits = counts.diagonal(dim1=-2, dim2=-1)
    union = counts.sum(-1) + counts.sum(-2) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, math.nan))
    return iou.nanmean(-1), iou


def logits_map(logits: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, N, K) patch logits -> (B, K, H, W) logits bilinearly upsampled to the label size."""
    batch, _, classes = logits.shape
    spatial = logits.transpose(1, 2).reshape(batch, classes, *grid)  # (B, K, rows, cols)
    return F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)


def training_targets(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, W) ADE-style labels -> (B, H/s, W/s) targets at the centre pixel of each stride x stride cell."""
    return to_targets(labels[:, stride // 2 :: stride, stride // 2 :: stride])


def minibatch_order(count: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """One random permutation of range(count) per epoch, drawn in sequence from a CPU generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(count, generator=generator) for _ in range(epochs)]


def check_order(order: Sequence[torch.Tensor], count: int, epochs: int) -> None:
    """Raise unless `order` holds `epochs` permutations of range(count)."""
    if len(order) < epochs:
        raise ValueError(f"order has {len(order)} epochs; training runs {epochs}")
    expected = torch.arange(count)
    for epoch, permutation in enumerate(order[:epochs]):
        if permutation.shape != (count,) or not torch.equal(permutation.cpu().sort().values, expected):
            raise ValueError(f"order[{epoch}] is not a permutation of range({count})")


@dataclass(frozen=True)
class HeadSettings:
    """Training settings of a segmentation head (the study: 20 epochs DINOv2, 50 DeiT-III, batch 32)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr: float = 1e-4  # last block, final norm and registers
    weight_decay: float = 1e-4
    label_stride: int = 4  # train on labels subsampled by this stride (memory); evaluation uses full labels


class LinearSegmenter(nn.Module):
    """A linear classifier over frozen patch features (B, N, C) -> (B, N, K)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(channels, classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(patches.float())


class LastBlockSegmenter(nn.Module):
    """The last block, final norm and `registers` new registers, trained with a linear head.

    Input: the second-to-last block's output (B, T, C) with `prefix` prefix tokens; the new registers go right
    after them, the block runs on `[prefix, REG..., PATCH...]`, and the head reads the normalised patches.
    """

    def __init__(self, block: nn.Module, norm: nn.Module, prefix: int, registers: int, classes: int) -> None:
        super().__init__()
        self.block = copy.deepcopy(block)
        self.norm = copy.deepcopy(norm)
        self.prefix = prefix
        channels = self.norm.weight.shape[0]
        # Near-zero init, like timm's registers: training starts from the pretrained block's function.
        self.registers = nn.Parameter(torch.randn(1, registers, channels) * 1e-6)
        self.head = nn.Linear(channels, classes)
        for parameter in self.parameters():
            parameter.requires_grad_(True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.float()
        registers = self.registers.expand(tokens.shape[0], -1, -1)
        x = torch.cat([tokens[:, : self.prefix], registers, tokens[:, self.prefix :]], dim=1)  # (B, T + R, C)
        x = self.norm(self.block(x))
        return self.head(x[:, self.prefix + self.registers.shape[1] :])  # (B, N, K)

    def parameter_groups(self, settings: HeadSettings) -> list[dict]:
        backbone = [*self.block.parameters(), *self.norm.parameters(), self.registers]
        return [{"params": backbone, "lr": settings.backbone_lr}, {"params": self.head.parameters()}]


def train_segmenter(
    segmenter: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    grid: tuple[int, int],
    settings: HeadSettings,
    seed: int,
    order: Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """Fit `segmenter` (maps inputs (B, ..., C) -> patch logits (B, N, K)) to (B, H, W) ADE-style labels.

    `order`: the minibatch order, one permutation of the inputs per epoch (default: `minibatch_order` of `seed`).
    """
    torch.manual_seed(seed)
    if order is None:
        order = minibatch_order(len(inputs), settings.epochs, seed)
    check_order(order, len(inputs), settings.epochs)
    groups = segmenter.parameter_groups(settings) if hasattr(segmenter, "parameter_groups") else None
    optimizer = torch.optim.AdamW(groups or segmenter.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    targets = training_targets(labels, settings.label_stride)  # (B, H/s, W/s)
    device = next(segmenter.parameters()).device  # inputs stay on the host; minibatches move
    segmenter.train()
    for permutation in order[: settings.epochs]:
        for index in permutation.split(settings.batch_size):
            logits = logits_map(segmenter(inputs[index].to(device)), grid, targets.shape[-2:])
            loss = F.cross_entropy(logits, targets[index].to(device), ignore_index=IGNORE_INDEX)
            if not loss.isfinite():  # a minibatch of only "other" pixels has nothing to learn from
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return segmenter.eval()


@torch.no_grad()
def evaluate_segmenter(
    segmenter: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    grid: tuple[int, int],
    num_classes: int,
    batch_size: int = 4,
) -> tuple[float, np.ndarray]:
    """mIoU (and per-class IoU) of `segmenter` on full-resolution (B, H, W) ADE-style labels."""
    device = next(segmenter.parameters()).device
    metrics = iou_metrics(num_classes)
    for start in range(0, len(inputs), batch_size):
        chunk = slice(start, start + batch_size)
        logits = logits_map(segmenter(inputs[chunk].to(device)), grid, labels.shape[-2:])
        metrics.update(logits.argmax(1).cpu(), to_targets(labels[chunk]))
    scores = metrics.compute()
    return scores["miou"].item(), scores["iou"].numpy()
