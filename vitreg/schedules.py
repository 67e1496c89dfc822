"""Schedules of the penalty weight lambda, as pure functions of the (0-based) epoch.

The study's formulas, with `period` 10 by default:
- constant:     lambda
- harmonic:     lambda / (epoch + 1)
- exp_hard:     lambda ** ((epoch // period) + 1)   (the paper's formula; its code restarted with `%`)
- exp_soft:     lambda ** ((epoch / period) + 1)
- step:         lambda if epoch < period else 0
- cosine:       lambda * (1 + cos(pi * epoch / total_epochs)) / 2   (ours; needs total_epochs)
- cos_decay:    lambda * cos(pi * (epoch mod period) / (2 * period))  (the study's code, `--cos_decay`: with period
                10 it falls from lambda to lambda * cos(0.45 pi) ~ 0.16 lambda over 10 epochs, then restarts)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "harmonic", "exp_hard", "exp_soft", "step", "cosine", "cos_decay")


@dataclass(frozen=True)
class LambdaSchedule:
    """A validated lambda schedule; call it with the epoch."""

    name: str = "constant"
    initial: float = 0.0
    period: int = 10
    total_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown lambda schedule {self.name!r}; allowed: {', '.join(SCHEDULES)}")
        if not math.isfinite(self.initial) or self.initial < 0:
            raise ValueError(f"lambda={self.initial}: must be a finite number >= 0")
        if self.period <= 0:
            raise ValueError(f"lambda schedule period={self.period}: must be a positive number of epochs")
        if self.name in ("exp_hard", "exp_soft") and self.initial > 1:
            raise ValueError(f"schedule {self.name!r} with lambda={self.initial} > 1 would grow, not decay")
        if self.name == "cosine" and (self.total_epochs is None or self.total_epochs <= 0):
            raise ValueError("schedule 'cosine' needs total_epochs > 0")

    def __call__(self, epoch: float) -> float:
        return lambda_at(self.name, self.initial, epoch, self.period, self.total_epochs)


def lambda_at(name: str, initial: float, epoch: float, period: int = 10, total_epochs: int | None = None) -> float:
    """Lambda at `epoch` for the schedule `name` starting from `initial`."""
    if epoch < 0:
        raise ValueError(f"epoch={epoch}: must be >= 0")
    if name == "constant":
        return initial
    if name == "harmonic":
        return initial / (epoch + 1)
    if name == "exp_hard":
        return initial ** ((epoch // period) + 1)
    if name == "exp_soft":
        return initial ** ((epoch / period) + 1)
    if name == "step":
        return initial if epoch < period else 0.0
    if name == "cosine":
        if not total_epochs:
            raise ValueError("schedule 'cosine' needs total_epochs > 0")
        return initial * (1 + math.cos(math.pi * min(epoch, total_epochs) / total_epochs)) / 2
    if name == "cos_decay":
        return initial * math.cos(math.pi * (epoch % period) / (2 * period))
    raise ValueError(f"unknown lambda schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
