"""One epoch on one rank: `train_epoch` (a pass over the rank's training shard, stopping at a non-finite loss) and
`evaluate` (the validation metrics over every rank's shard). Every rank of a Ray Train run calls both (train.loop);
the returned numbers are over all ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassStatScores

import vitreg
from train.augment import DeviceAugment, augment_seed
from train.config import TrainConfig, augment_config
from train.data import ShardLoader, normalize_on_device
from train.optim import LearningRate


class NonFiniteLossError(FloatingPointError):
    """A training step's loss is NaN or infinite: raised (on every rank at once) before the step's backward pass
    and optimiser step, so the weights stay as the last good step left them and no checkpoint of the epoch is
    written. Deterministic: a restart from the last checkpoint would compute the same value, so the workers end
    the run normally with the failure (`train_worker`) and the driver raises it: Ray Train never retries it."""


def check_finite_loss(ce: torch.Tensor, penalty: torch.Tensor, lam: float, epoch: int, step: int) -> None:
    """Raise `NonFiniteLossError` naming the epoch, step and term(s) when `ce + lam * penalty` is not finite on
    any rank (the flags are all-reduced, so every rank stops at the same step instead of waiting in the gradient
    all-reduce for one that stopped).

    One small all-reduce and one scalar read per step (a device sync on GPU): the price of never stepping the
    optimiser on a NaN.
    """
    values = torch.stack([ce.detach().float(), penalty.detach().float()])
    not_finite = (~torch.isfinite(values)).float() * torch.tensor([1.0, float(lam > 0)], device=values.device)
    all_reduce(not_finite, dist.ReduceOp.MAX)
    (ce_value, penalty_value), flags = torch.stack([values, not_finite]).tolist()  # one transfer
    bad = [name for name, flag in zip(("ce", "penalty"), flags, strict=True) if flag]
    if bad:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise NonFiniteLossError(
            f"epoch {epoch}, step {step}: the training loss is not finite ({' and '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not finite; on rank {rank} ce={ce_value}, penalty={penalty_value}, "
            f"lambda={lam}); stopped before the optimiser step, so the weights and the last checkpoint are those of "
            "the last good step (lower lr, set grad_clip_norm, or check the data)"
        )


def autocast(config: TrainConfig, device: torch.device) -> AbstractContextManager[Any]:
    """bf16/fp16 autocast on GPU; CPU runs fp32 (CPU autocast is slow and changes numerics)."""
    if device.type != "cuda" or config.precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)


def all_reduce(values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=op)
    return values


def train_epoch(
    net: nn.Module,
    model: VisionTransformer,
    capture: vitreg.BlockOutputCapture,
    loader: ShardLoader,
    optimizer: torch.optim.Optimizer,
    schedule: LearningRate,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
    config: TrainConfig,
    epoch: int,
    fault: Any,
    progress: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, float]:
    """One pass over this rank's training shard; the returned means are over all ranks.

    `progress(values, global_step)`, if given (rank 0), gets this rank's step, loss and images/s every
    `config.log_every_steps` steps.
    """
    device = next(model.parameters()).device
    lam = config.lambda_fn()(epoch)
    schedule.start_epoch(epoch)
    augment_settings = augment_config(config)
    augment = DeviceAugment(augment_settings) if augment_settings is not None else None
    rank = dist.get_rank() if dist.is_initialized() else 0
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce * n, penalty * n, n, lr * steps
    steps = 0
    model.train()
    started = last_report = time.perf_counter()
    images_since_report = 0
    for step, (images, labels) in enumerate(loader):
        fault(epoch, step)
        schedule.before_step(epoch * len(loader) + step)
        if augment is not None:  # a pure function of (seed, epoch, rank, step): resumes are bit-identical
            inputs = augment(images, augment_seed(config.seed, epoch, rank, step))
        else:
            inputs = normalize_on_device(images)
        with autocast(config, device):
            logits = net(inputs)  # (B, classes)
            ce = criterion(logits.float(), labels)
            penalty = vitreg.l2_norm_penalty(capture.pop(), model.num_prefix_tokens)
            loss = ce + lam * penalty if lam > 0 else ce
        check_finite_loss(ce, penalty, lam, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip_norm)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        count = labels.shape[0]
        sums[0] += ce.detach().double() * count
        sums[1] += penalty.detach().double() * count
        sums[2] += count
        sums[3] += lr
        steps += 1
        images_since_report += count
        if progress is not None and config.log_every_steps and steps % config.log_every_steps == 0:
            now = time.perf_counter()  # .item() waits for the device: only every log_every_steps steps
            values = {
                "progress/epoch": epoch + steps / len(loader),
                "progress/loss": loss.item(),
                "progress/ce": ce.item(),
                "progress/images_per_s_per_worker": images_since_report / (now - last_report),
            }
            progress(values, epoch * len(loader) + step)
            last_report, images_since_report = now, 0
    seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
    all_reduce(sums)
    all_reduce(seconds, dist.ReduceOp.MAX)  # the epoch lasts as long as its slowest rank
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    ce_mean, penalty_mean = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    images_per_s = sums[2].item() / seconds.item()
    return {
        "train/loss": ce_mean + lam * penalty_mean,
        "train/ce": ce_mean,
        "train/penalty": penalty_mean,
        "train/lambda": lam,
        "train/lr": sums[3].item() / (steps * world_size),
        "perf/images_per_s": images_per_s,
        "perf/images_per_s_per_worker": images_per_s / world_size,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: ShardLoader, config: TrainConfig) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over the whole validation set: each rank evaluates its disjoint shard and
    torchmetrics sums the states over ranks at `compute()` (a collective: every rank calls it)."""
    device = next(model.parameters()).device
    num_classes: int = getattr(model, "module", model).num_classes  # the head's width (DDP wraps the model)
    top_k = min(5, num_classes)  # tiny data has 3-4 classes; torchmetrics rejects top_k > num_classes
    # Micro-averaged stat scores count samples: tp = the label is the argmax (top_k=1) or among the top k, and the
    # support is the sample count. Integer counts keep the percentages exact; MulticlassAccuracy (the same counts)
    # divides in float32, which moves them in the 7th digit.
    hits = {k: MulticlassStatScores(num_classes, top_k=k, average="micro").to(device) for k in (1, top_k)}
    # set_dtype after .to(): .to() resets the dtype that update() casts inputs to (torchmetrics 1.9)
    loss = MeanMetric(nan_strategy="disable").to(device).set_dtype(torch.float64)  # a NaN loss stays NaN
    model.eval()
    for images, labels in loader:
        with autocast(config, device):
            logits = model(normalize_on_device(images)).float()  # (B, classes)
        loss.update(F.cross_entropy(logits, labels, reduction="none").double())
        for counter in hits.values():
            counter.update(logits, labels)
    model.train()
    top1, topk = (hits[k].compute().tolist() for k in (1, top_k))  # [tp, fp, tn, fn, support]
    return {
        "val/loss": loss.compute().item(),
        "val/top1": 100 * top1[0] / top1[4],
        "val/top5": 100 * topk[0] / topk[4],
    }
