"""Optimiser, learning-rate schedule and weight EMA of a training run, built from its `TrainConfig`.

Everything here is timm's (param groups, `CosineLRScheduler`, `ModelEmaV3`); what is ours is how it is driven:
the schedule is set from the absolute position (epoch, or step since the start of the run) before every use, so
a resumed run needs no scheduler state and computes exactly the learning rates of an uninterrupted one.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from train.config import TrainConfig


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters at the peak lr.

    No weight decay on 1-d parameters (biases, norms) and on `config.no_weight_decay` (None: the model's own
    `no_weight_decay()`, which in timm also spares the registers; the study's list spares only pos_embed and
    cls_token, so its registers decay).
    """
    skip = config.no_weight_decay if config.no_weight_decay is not None else model.no_weight_decay()
    groups = param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=tuple(skip))
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=config.betas, fused=device.type == "cuda")


class LearningRate:
    """timm's cosine schedule with linear warm-up from `warmup_lr`, set per step or per epoch.

    Call `start_epoch(epoch)` at the start of every epoch and `before_step(step)` before every optimiser step
    (`step` counts from the start of the run); whichever does not match `lr_schedule_unit` does nothing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> None:
        self.per_step = config.lr_schedule_unit == "step"
        if self.per_step:
            total = max(1, config.epochs * steps_per_epoch)
            warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
        else:
            total, warmup = max(1, config.epochs), int(config.warmup_epochs)
        self.scheduler = CosineLRScheduler(
            optimizer,
            t_initial=total,
            lr_min=config.min_lr,
            warmup_t=warmup,
            warmup_lr_init=config.warmup_lr,
            t_in_epochs=not self.per_step,
        )

    def start_epoch(self, epoch: int) -> None:
        if not self.per_step:
            self.scheduler.step(epoch)

    def before_step(self, step: int) -> None:
        if self.per_step:
            self.scheduler.step_update(step)


def make_ema(model: nn.Module, config: TrainConfig) -> ModelEmaV3 | None:
    """An exponential moving average of the weights (on the model's device), or None when `ema_decay` is None."""
    if config.ema_decay is None:
        return None
    return ModelEmaV3(model, decay=config.ema_decay)
