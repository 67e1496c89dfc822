"""Sweeps as plain data: which training preset, which configurations (an exact grid or a search space), how many
trials, which early stopping. `sweeps/grid.py` turns a `SweepPreset` into a Ray Tune + Optuna run; nothing here
imports Ray.

Every sweep, grid or search, runs under Optuna (`OptunaSearch`):
- A grid preset lists its configurations (`cells`) explicitly, one dict of training-config values each, and is
  searched with Optuna's `GridSampler` over a single categorical axis `cell` whose values are the cell ids, with
  `num_samples = len(cells)`. GridSampler hands out every grid point exactly once (trial k gets point k of a
  seeded permutation), and a list of cells can leave out a cell that a product of axes cannot: the study's
  32 fine-tunes are the 4 x 3 x 3 product minus the 4 cells with no registers and no penalty, which are plain
  DeiT-III fine-tuning.
- A search preset declares axes (`Choice`, `IntRange`, `LogUniform`) searched by Optuna's TPE sampler, with ASHA
  stopping the weak trials early.

Each preset is built by a function whose docstring gives its expected run time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from vitreg.schedules import SCHEDULES

# Short names of the axes in cell ids and trial names.
_SHORT = {
    "frozen_blocks": "frozen",
    "registers": "reg",
    "penalty_lambda": "lam",
    "lambda_schedule": "",
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
    return MappingProxyType(dict(mapping))


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested mappings (e.g. `data`) merge key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class SweepPreset:
    """One sweep, as data.

    Args:
        name: the preset's name (the default experiment name derives from it).
        train_preset: name of the training preset (`train.config`) every trial starts from.
        train_overrides: training-config values applied to that preset for every trial.
        cells: an exact grid: one mapping of training-config values per trial. Exclusive with `space`.
        space: a search space: training-config field -> domain. Exclusive with `cells`.
        num_samples: trials to run; for a grid, None means every cell (a smaller number takes the first cells).
        asha: early stopping, or None to run every trial to the end.
        metric: the reported metric the search optimises and the report ranks by.
        mode: "max" or "min".
        seed: seed of the Optuna sampler (and so of the trial order).
        local: run on an embedded Ray instance with the generated data set (no cluster, no ImageNet).
        planted_base: start every trial from the planted-artifact model in the tiny preset's shape
            (`train.planted_base`), written beside the generated data: a model with known artifacts.
        description: one line for `--help` and the MLflow parent run.
    """

    name: str
    train_preset: str
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
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
        object.__setattr__(self, "train_overrides", _frozen(self.train_overrides))
        object.__setattr__(self, "cells", tuple(_frozen(cell) for cell in self.cells))
        object.__setattr__(self, "space", _frozen(self.space))
        if bool(self.cells) == bool(self.space):
            raise ValueError(f"preset {self.name!r}: give exactly one of cells (a grid) or space (a search)")
        if self.mode not in ("max", "min"):
            raise ValueError(f"preset {self.name!r}: mode={self.mode!r}; allowed: max, min")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"preset {self.name!r}: num_samples={self.num_samples}; must be >= 1")
        if self.cells:
            ids = [cell_id(cell) for cell in self.cells]
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ValueError(f"preset {self.name!r}: duplicate cells {duplicates}")
            if self.num_samples is not None and self.num_samples > len(self.cells):
                raise ValueError(
                    f"preset {self.name!r}: num_samples={self.num_samples} but the grid has only "
                    f"{len(self.cells)} cells; a grid runs each cell once"
                )
            if self.asha is not None:
                raise ValueError(f"preset {self.name!r}: a grid runs every cell to the end; asha must be None")
        for key, domain in self.space.items():
            if not isinstance(domain, Choice | IntRange | LogUniform):
                raise ValueError(f"preset {self.name!r}: space[{key!r}]={domain!r} is not a Choice/IntRange/LogUniform")

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
                raise KeyError(f"preset {self.name!r}: trial config has cell={key!r}; known cells: {sorted(cells)}")
            return dict(cells[key])
        return {key: tune_config[key] for key in self.space}

    def with_overrides(
        self, *, num_samples: int | None = None, train_overrides: Mapping[str, Any] | None = None
    ) -> SweepPreset:
        """A copy with fewer/more trials and extra training-config values (e.g. epochs=1 for a smoke run)."""
        changes: dict[str, Any] = {}
        if num_samples is not None:
            changes["num_samples"] = num_samples
        if train_overrides:
            changes["train_overrides"] = _merge(self.train_overrides, train_overrides)
        return replace(self, **changes) if changes else self


# ---------------------------------------------------------------------------------------------------------------
# The presets
# ---------------------------------------------------------------------------------------------------------------

PAPER_FROZEN = (8, 9, 10, 11)
PAPER_REGISTERS = (0, 1, 4)
PAPER_LAMBDAS = (0.0, 0.01, 0.1)


# Table 8's "no fine-tuning" row: the pretrained model evaluated through the same pipeline (epochs=0).
BASELINE_CELL = {"frozen_blocks": 12, "registers": 0, "penalty_lambda": 0.0, "epochs": 0}


def paper() -> SweepPreset:
    """The study's 32 fine-tunes (section 3.4, Table 8), each exactly once, and its "no fine-tuning" row.

    DeiT-III Small pretrained on ImageNet-21k and fine-tuned on 1k (`deit3_small_patch16_224.fb_in22k_ft_in1k`),
    fine-tuned for 10 epochs on ImageNet-1k (FFCV) with the study's recipe (`train.config.STUDY_RECIPE`) and
    frozen blocks {8, 9, 10, 11} x registers {0, 1, 4} x constant lambda {0, 0.01, 0.1}, minus the 4 cells with no
    registers and lambda 0 (plain fine-tuning). One more cell (`BASELINE_CELL`, epochs 0) evaluates the pretrained
    model as it is, through the same data pipeline: the study measured 82.81% top-1 for it.

    Expected run time: about 2 GPU-hours per trial (the study: ~2 h each on one A100, 64 h in all); on
    `cluster.yaml` at full size (4 x p5.48xlarge, 32 H100) all 32 run side by side, about 1.5-2 h wall clock.
    """
    fine_tunes = [
        {"frozen_blocks": frozen, "registers": registers, "penalty_lambda": lam}
        for frozen in PAPER_FROZEN
        for registers in PAPER_REGISTERS
        for lam in PAPER_LAMBDAS
        if not (registers == 0 and lam == 0.0)
    ]
    cells = (*fine_tunes, BASELINE_CELL)
    return SweepPreset(
        name="paper",
        train_preset="finetune",
        train_overrides={"epochs": 10, "lambda_schedule": "constant"},
        cells=cells,
        description="the study's 32 DeiT-III Small fine-tunes (frozen x registers x lambda), 10 epochs, + baseline",
    )


SCHEDULE_CELLS = (
    ("harmonic", 0.1),
    ("exp_hard", 0.1),
    ("exp_soft", 0.01),
    ("step", 0.01),
    ("constant", 0.01),
    ("constant", 0.0),
)


def schedules() -> SweepPreset:
    """The study's 50-epoch comparison of lambda schedules (section 4.2.1, Figure 10).

    10 frozen blocks, 4 registers; harmonic 0.1, exp_hard 0.1, exp_soft 0.01, step 0.01, constant 0.01,
    constant 0.

    Expected run time: 6 trials x 50 epochs, about 10 GPU-hours each (5x the study's 10-epoch fine-tunes); in
    parallel on one p5.48xlarge, about 8-10 h wall clock.
    """
    cells = tuple(
        {"frozen_blocks": 10, "registers": 4, "lambda_schedule": schedule, "penalty_lambda": lam}
        for schedule, lam in SCHEDULE_CELLS
    )
    return SweepPreset(
        name="schedules",
        train_preset="finetune",
        train_overrides={"epochs": 50},
        cells=cells,
        description="lambda schedules at 10 frozen blocks and 4 registers, 50 epochs",
    )


def search() -> SweepPreset:
    """Optuna TPE over frozen blocks 0..11, registers 0..8, lambda (log-uniform), schedule and learning rate,
    with ASHA stopping weak trials after 2, 6, ... epochs (10 at most).

    Expected run time: 64 trials; with ASHA most stop after 2 epochs, so about 64 x 0.5 + 10 x 2 = ~50
    GPU-hours; on 32 H100 about 3-4 h wall clock (TPE learns less when many trials run at once).
    """
    return SweepPreset(
        name="search",
        train_preset="finetune",
        train_overrides={"epochs": 10},
        space={
            "frozen_blocks": IntRange(0, 11),
            "registers": IntRange(0, 8),
            "penalty_lambda": LogUniform(1e-4, 0.3),
            "lambda_schedule": Choice(SCHEDULES),
            "lr": LogUniform(1e-5, 1e-3),
        },
        num_samples=64,
        asha=Asha(grace_period=2, reduction_factor=3),
        description="TPE over frozen blocks, registers, lambda, schedule, lr with ASHA",
    )


def local() -> SweepPreset:
    """The default: the same axes on a laptop. Embedded Ray, a tiny ViT, the generated data set (written as JPEGs
    and a .beton under the data directory on first use), 4 grid cells over frozen blocks x registers x lambda x
    schedule, 3 epochs each. Every trial starts from the planted-artifact model (`train.planted_base`: two
    patch positions at ~50x the median norm in the last block), so the table shows the artifacts falling in the
    cells with the penalty and staying in the cell without it.

    Expected run time: 3-6 minutes on a 2-core CPU machine (about 1 minute per trial, trials one or two at a
    time), plus ~20 s to generate the data on the first run.
    """
    cells = (
        {"frozen_blocks": 2, "registers": 0, "penalty_lambda": 0.01, "lambda_schedule": "constant"},
        {"frozen_blocks": 2, "registers": 4, "penalty_lambda": 0.0, "lambda_schedule": "constant"},
        {"frozen_blocks": 2, "registers": 4, "penalty_lambda": 0.1, "lambda_schedule": "harmonic"},
        {"frozen_blocks": 3, "registers": 1, "penalty_lambda": 0.01, "lambda_schedule": "constant"},
    )
    return SweepPreset(
        name="local",
        train_preset="tiny",
        train_overrides={"epochs": 3},
        cells=cells,
        local=True,
        planted_base=True,
        description="tiny ViT with planted artifacts on generated data, embedded Ray: the whole sweep on a laptop",
    )


def scratch() -> SweepPreset:
    """DeiT-III Small trained from scratch on ImageNet-1k with 0 and with 4 registers (section 4.2.2, Table 9).

    Expected run time: the study's 150 epochs took ~25 h per run on 2 x H100; two runs side by side on one
    p5.48xlarge (4 GPUs each when `scratch` uses 4 workers) take about 13-25 h wall clock.
    """
    return SweepPreset(
        name="scratch",
        train_preset="scratch",
        cells=({"registers": 0}, {"registers": 4}),
        description="DeiT-III Small from scratch, 0 vs 4 registers",
    )


def scratch_local() -> SweepPreset:
    """`scratch` on a laptop: the tiny ViT from random weights on the generated data, 0 vs 4 registers.

    Expected run time: 1-3 minutes on a 2-core CPU machine.
    """
    return SweepPreset(
        name="local",
        train_preset="tiny",
        train_overrides={"frozen_blocks": 0, "penalty_lambda": 0.0},
        cells=({"registers": 0}, {"registers": 4}),
        local=True,
        description="tiny ViT from scratch on generated data, 0 vs 4 registers",
    )


FINETUNE_PRESETS: dict[str, Callable[[], SweepPreset]] = {
    "local": local,
    "paper": paper,
    "schedules": schedules,
    "search": search,
}
SCRATCH_PRESETS: dict[str, Callable[[], SweepPreset]] = {"scratch": scratch, "local": scratch_local}


def get_preset(name: str, registry: Mapping[str, Callable[[], SweepPreset]] = FINETUNE_PRESETS) -> SweepPreset:
    """The preset called `name`, or a ValueError naming the ones there are."""
    if name not in registry:
        raise ValueError(f"unknown sweep preset {name!r}; allowed: {', '.join(registry)}")
    return registry[name]()
