"""The data types of an experiment: a base (training-config values), its sweep (an exact grid of cells or a search
space), and how it runs. Plain data: nothing here imports Ray, Optuna or MLflow; `sweeps/grid.py` turns an
`Experiment` into a Ray Tune + Optuna run.

Every sweep, grid or search, runs under Optuna (`OptunaSearch`):
- A grid lists its configurations (`cells`) explicitly, one dict of training-config values each, and is searched
  with Optuna's `GridSampler` over a single categorical axis `cell` whose values are the cell ids, with
  `num_samples = len(cells)`. GridSampler hands out every grid point exactly once (trial k gets point k of a
  seeded permutation), and a list of cells can leave out a cell that a product of axes cannot: the study's
  32 fine-tunes are the 4 x 3 x 3 product minus the 4 cells with no registers and no penalty, which are plain
  DeiT-III fine-tuning.
- A search declares axes (`Choice`, `IntRange`, `LogUniform`) searched by Optuna's TPE sampler, with ASHA
  (`Asha`) stopping the weak trials early.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from train.config import merge

# Short names of the axes in cell ids and trial names.
_SHORT = {
    "frozen_blocks": "frozen",
    "registers": "reg",
    "penalty_lambda": "lam",
    "lambda_schedule": "",
    "register_entry": "",
    "lr": "lr",
    "epochs": "ep",
}


@dataclass(frozen=True)
class Choice:
    """One of `values` (categorical)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("Choice needs at least one value")


@dataclass(frozen=True)
class IntRange:
    """An integer in `low..high`, both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"IntRange({self.low}, {self.high}): high must be >= low")


@dataclass(frozen=True)
class LogUniform:
    """A float log-uniformly distributed in `[low, high]` (both > 0)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform({self.low}, {self.high}): need 0 < low < high")


Domain = Choice | IntRange | LogUniform


@dataclass(frozen=True)
class Asha:
    """ASHA early stopping on the sweep metric, in epochs (Tune's `training_iteration`: one report per epoch)."""

    grace_period: int = 1
    reduction_factor: int = 3


def cell_id(cell: Mapping[str, Any]) -> str:
    """A short, filesystem-safe, deterministic name of a configuration, e.g. `frozen8-reg4-lam0.01`.

    Known axes use their short names (`_SHORT`), in a fixed order; others follow sorted by key.
    """
    known = [key for key in _SHORT if key in cell]
    others = sorted(key for key in cell if key not in _SHORT)
    parts = []
    for key in known + others:
        value = cell[key]
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{_SHORT.get(key, key)}{text}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(copy.deepcopy(dict(mapping)))


@dataclass(frozen=True)
class Experiment:
    """One experiment, as data: what every trial starts from, what varies between trials, and how it runs.

    Args:
        name: the experiment's name (the default sweep name derives from it).
        base: training-config values (`train.config.TrainConfig` fields) every trial starts from; what it leaves
            out keeps the class default.
        cells: an exact grid: one mapping of training-config values per trial, applied over `base`. Exclusive
            with `space`.
        space: a search space: training-config field -> domain. Exclusive with `cells`.
        num_samples: trials to run; for a grid, None means every cell (a smaller number takes the first cells).
        asha: early stopping, or None to run every trial to the end.
        metric: the reported metric the search optimises and the report ranks by.
        mode: "max" or "min".
        seed: seed of the Optuna sampler (and so of the trial order).
        local: run on an embedded Ray instance with the generated data set (no cluster, no ImageNet).
        planted_base: start every trial from the planted-artifact model in the tiny experiment's shape
            (`train.planted_base`), written beside the generated data: a model with known artifacts.
        description: one line for `--help` and the MLflow parent run.
    """

    name: str
    base: Mapping[str, Any]
    cells: tuple[Mapping[str, Any], ...] = ()
    space: Mapping[str, Domain] = field(default_factory=dict)
    num_samples: int | None = None
    asha: Asha | None = None
    metric: str = "val/top1"
    mode: str = "max"
    seed: int = 0
    local: bool = False
    planted_base: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", _frozen(self.base))
        object.__setattr__(self, "cells", tuple(_frozen(cell) for cell in self.cells))
        object.__setattr__(self, "space", MappingProxyType(dict(self.space)))
        if bool(self.cells) == bool(self.space):
            raise ValueError(f"experiment {self.name!r}: give exactly one of cells (a grid) or space (a search)")
        if self.mode not in ("max", "min"):
            raise ValueError(f"experiment {self.name!r}: mode={self.mode!r}; allowed: max, min")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"experiment {self.name!r}: num_samples={self.num_samples}; must be >= 1")
        if self.cells:
            ids = [cell_id(cell) for cell in self.cells]
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ValueError(f"experiment {self.name!r}: duplicate cells {duplicates}")
            if self.num_samples is not None and self.num_samples > len(self.cells):
                raise ValueError(
                    f"experiment {self.name!r}: num_samples={self.num_samples} but the grid has only "
                    f"{len(self.cells)} cells; a grid runs each cell once"
                )
            if self.asha is not None:
                raise ValueError(f"experiment {self.name!r}: a grid runs every cell to the end; asha must be None")
        for key, domain in self.space.items():
            if not isinstance(domain, Choice | IntRange | LogUniform):
                raise ValueError(
                    f"experiment {self.name!r}: space[{key!r}]={domain!r} is not a Choice/IntRange/LogUniform"
                )

    @property
    def is_grid(self) -> bool:
        return bool(self.cells)

    @property
    def grid(self) -> tuple[Mapping[str, Any], ...]:
        """The cells this sweep runs (the first `num_samples` of `cells`)."""
        return self.cells[: self.num_samples] if self.num_samples else self.cells

    @property
    def trials(self) -> int:
        """How many trials the sweep runs."""
        if self.is_grid:
            return len(self.grid)
        return self.num_samples or 1

    def cells_by_id(self) -> dict[str, Mapping[str, Any]]:
        return {cell_id(cell): cell for cell in self.grid}

    def trial_values(self, tune_config: Mapping[str, Any]) -> dict[str, Any]:
        """The training-config values of one trial, from the config Tune gave it (a cell id or sampled axes)."""
        if self.is_grid:
            cells = self.cells_by_id()
            key = tune_config.get("cell")
            if key not in cells:
                raise KeyError(f"experiment {self.name!r}: trial config has cell={key!r}; known cells: {sorted(cells)}")
            return dict(cells[key])
        return {key: tune_config[key] for key in self.space}

    def with_overrides(
        self, *, num_samples: int | None = None, train_overrides: Mapping[str, Any] | None = None
    ) -> Experiment:
        """A copy with fewer/more trials and training-config values merged over `base` (e.g. epochs=1 for a smoke
        run); nested sections (data, tracking) merge key by key, as `train.config.merge`."""
        changes: dict[str, Any] = {}
        if num_samples is not None:
            changes["num_samples"] = num_samples
        if train_overrides:
            changes["base"] = merge(self.base, train_overrides)
        return replace(self, **changes) if changes else self

    def base_values(self) -> dict[str, Any]:
        """`base` as plain, mutable data (a deep copy)."""
        return copy.deepcopy(dict(self.base))
