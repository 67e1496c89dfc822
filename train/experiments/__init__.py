"""Experiments as data, one module each, as big_vision's config files: a base (training-config values), its sweep
(grid cells or a search space) and a local switch that shrinks it to the tiny ViT on generated data.

Modules (each has `get_config(local=False) -> Experiment`; those that are also a single training run have `BASE`):
- `study_finetune`: the study's fine-tune (`BASE`, training preset `finetune`) and its 32-cell grid + baseline
  (`paper`); local: the 4-cell sweep `local` from the planted-artifact model;
- `schedules`: the 50-epoch comparison of lambda schedules;
- `register_entry`: registers at the input (the study's) vs after the frozen prefix, at the study's frozen blocks;
- `search`: TPE + ASHA around the study's fine-tune;
- `scratch`: DeiT-III Small from random init (`BASE`, training preset `scratch`), 0 vs 4 registers;
- `tiny`: the tiny ViT (`BASE`, training preset `tiny`), the base every local version starts from;
- `recipe`: `STUDY_RECIPE`, the study's fine-tuning recipe, with the source of every value;
- `sweep`: the data types (`Experiment`, `Choice`, `IntRange`, `LogUniform`, `Asha`, `cell_id`).

`TrainConfig`'s class defaults are not an experiment: every base names what it relies on.
Nothing here imports Ray, Optuna or MLflow.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from train.experiments import register_entry, schedules, scratch, search, study_finetune, tiny
from train.experiments.recipe import STUDY_RECIPE
from train.experiments.sweep import Asha, Choice, Domain, Experiment, IntRange, LogUniform, cell_id

# Training presets (train/finetune.py, train/scratch.py `--preset`): one run's base values.
TRAINING_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"finetune": study_finetune.BASE, "scratch": scratch.BASE, "tiny": tiny.BASE}
)

MakeExperiment = Callable[..., Experiment]
# Sweeps of sweeps/finetune_grid.py and sweeps/scratch.py `--preset`; the first one's local version is also named
# `local` (LOCAL).
FINETUNE_SWEEPS: Mapping[str, MakeExperiment] = MappingProxyType(
    {
        "paper": study_finetune.get_config,
        "schedules": schedules.get_config,
        "search": search.get_config,
        "entry": register_entry.get_config,
    }
)
SCRATCH_SWEEPS: Mapping[str, MakeExperiment] = MappingProxyType({"scratch": scratch.get_config})
LOCAL = "local"


def training_values(preset: str) -> dict[str, Any]:
    """The training preset's values (a deep copy), or a ValueError naming the presets there are."""
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"preset={preset!r}: allowed: {', '.join(TRAINING_PRESETS)}")
    return copy.deepcopy(dict(TRAINING_PRESETS[preset]))


def sweep_names(registry: Mapping[str, MakeExperiment]) -> list[str]:
    """The names `get_experiment` accepts for `registry`: `local` and the registry's own."""
    return [LOCAL, *registry]


def get_experiment(name: str, registry: Mapping[str, MakeExperiment], *, local: bool = False) -> Experiment:
    """The experiment `name` of `registry` (its local version with `local`); `local` alone is the first one's local
    version. A ValueError names the ones there are."""
    if name == LOCAL:
        name, local = next(iter(registry)), True
    if name not in registry:
        raise ValueError(f"unknown sweep preset {name!r}; allowed: {', '.join(sweep_names(registry))}")
    return registry[name](local=local)


__all__ = [
    "FINETUNE_SWEEPS",
    "LOCAL",
    "SCRATCH_SWEEPS",
    "STUDY_RECIPE",
    "TRAINING_PRESETS",
    "Asha",
    "Choice",
    "Domain",
    "Experiment",
    "IntRange",
    "LogUniform",
    "cell_id",
    "get_experiment",
    "register_entry",
    "schedules",
    "scratch",
    "search",
    "study_finetune",
    "sweep_names",
    "tiny",
    "training_values",
]
