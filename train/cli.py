"""Command-line pieces shared by the entry scripts (train/finetune.py, train/scratch.py, sweeps/finetune_grid.py,
sweeps/scratch.py): the same flags everywhere (`--set`, `--data`, `--dry-run`; `--mlflow-uri` is
`train.tracking.add_mlflow_uri_argument`), the list of config fields for `--help`, and what `--dry-run` prints.

The field list is generated from the dataclasses (`TrainConfig`, `DataConfig`, `TrackingConfig`): their fields,
defaults and docstrings, and the validation's own constants for the fields that take one of a fixed set of values
(`ALLOWED_VALUES`), so it cannot drift from what `TrainConfig` accepts.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, fields
from typing import Any

import torch

import vitreg
from train.config import (
    DERIVED_DATA_FIELDS,
    EVAL_PREPROCESSING,
    LR_SCHEDULE_UNITS,
    PRECISIONS,
    REGISTER_ENTRIES,
    TrackingConfig,
    TrainConfig,
)
from train.data import DataConfig
from train.data.config import BACKENDS
from train.data.eval_transform import EVAL_INTERPOLATIONS
from train.experiments import Choice, Experiment, cell_id
from vitreg.schedules import SCHEDULES

# Fields whose value must be one of a fixed set: the very constants `__post_init__` checks against.
ALLOWED_VALUES: Mapping[str, tuple[str, ...]] = {
    "register_entry": REGISTER_ENTRIES,
    "lambda_schedule": SCHEDULES,
    "lr_schedule_unit": LR_SCHEDULE_UNITS,
    "precision": PRECISIONS,
    "eval_preprocessing": EVAL_PREPROCESSING,
    "data.backend": BACKENDS,
    "data.eval_interpolation": EVAL_INTERPOLATIONS,
}

# GPU-hours of one epoch over ImageNet-1k (1.28 M images, 224 px) with DeiT-III Small, from the study's timings
# (quoted in the train/experiments docstrings). A fine-tune back-propagates only through its unfrozen blocks.
FINETUNE_GPU_HOURS_PER_EPOCH = 2.0 / 10  # ~2 h per 10-epoch fine-tune on one A100 (study, section 3.4)
SCRATCH_GPU_HOURS_PER_EPOCH = 25.0 * 2 / 150  # ~25 h per 150-epoch run on 2 x H100 (study, Table 9)


# -- the flags ---------------------------------------------------------------------------------------------------


def add_set_argument(parser: argparse.ArgumentParser, what: str = "the run") -> None:
    """`--set KEY=VALUE` (repeatable): a config field of `what`; the keys are listed in the help's epilog."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"set a config field of {what} (JSON values; nested with dots: data.path=..., tracking.experiment=...); "
        "every field, its default and allowed values are listed below",
    )


def add_data_argument(parser: argparse.ArgumentParser, help: str = "data directory (= --set data.path=DIR)") -> None:
    parser.add_argument("--data", metavar="DIR", help=help)


def add_dry_run_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help=f"validate and print {what}, then exit: no Ray, no MLflow, no training"
    )


# -- the field list ----------------------------------------------------------------------------------------------


def _default(spec: Field) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return MISSING


def default_text(value: Any) -> str:
    """A default as `--set` takes it: JSON (null, true, "bf16", [0.9, 0.999])."""
    if value is MISSING:
        return "(required)"
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field's text in the class docstring: `name: text` or `name, other: text`, at a line start or after
    `; `, up to the next such entry or section header (a capitalised line ending in `:`)."""
    names = [spec.name for spec in fields(cls)]
    chunks, current = [], []
    for line in (cls.__doc__ or "").splitlines()[1:]:
        text = line.strip()
        if re.fullmatch(r"[A-Z].*:", text):  # a section header ("Model:", "Attributes:")
            chunks.append(" ".join(current))
            current = []
        elif text:
            current.append(text)
    chunks.append(" ".join(current))
    name = "|".join(sorted(names, key=len, reverse=True))
    entry = re.compile(rf"(?:^|(?<=\s))((?:(?:{name}), )*(?:{name})): ")
    # Prose that goes on to name another field without a colon ("...; cpus_per_worker; seed") ends the entry too.
    next_name = re.compile(rf"(?<=[;.]) (?:{name})\b")
    found: dict[str, str] = {}
    for chunk in chunks:
        matches = list(entry.finditer(chunk))
        for match, following in zip(matches, [*matches[1:], None], strict=False):
            text = chunk[match.end() : following.start() if following else len(chunk)]
            text = next_name.split(text, maxsplit=1)[0].strip().rstrip(";").strip()
            for key in match.group(1).split(", "):
                found.setdefault(key, text)
    return found


def config_fields() -> list[tuple[str, Any, tuple[str, ...] | None, str]]:
    """(key, default, allowed values or None, description) of every field `--set` takes, nested ones dotted."""
    rows = []
    descriptions = field_descriptions(TrainConfig)
    for spec in fields(TrainConfig):
        if spec.name in ("data", "tracking"):
            nested = DataConfig if spec.name == "data" else TrackingConfig
            nested_descriptions = field_descriptions(nested)
            for inner in fields(nested):
                key = f"{spec.name}.{inner.name}"
                text = nested_descriptions.get(inner.name, "")
                if spec.name == "data" and inner.name in DERIVED_DATA_FIELDS:
                    text = (
                        f"derived from the run's {'batch_size (global)' if inner.name == 'batch_size' else inner.name}"
                    )
                rows.append((key, _default(inner), ALLOWED_VALUES.get(key), text))
            continue
        rows.append((spec.name, _default(spec), ALLOWED_VALUES.get(spec.name), descriptions.get(spec.name, "")))
    return rows


def config_fields_help() -> str:
    """The `--help` epilog: every config field with its class default, allowed values and description."""
    lines = [
        "config fields (--set KEY=VALUE; the default is the class default, which --preset values replace;",
        "--dry-run prints the resolved config):",
    ]
    for key, default, allowed, text in config_fields():
        line = f"  {key} = {default_text(default)}"
        if allowed:
            line += f"  {{{', '.join(allowed)}}}"
        lines.append(line)
        if text:
            lines.extend(textwrap.wrap(text, width=116, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


# -- dry runs ----------------------------------------------------------------------------------------------------


def trainable_parameters(config: TrainConfig) -> int:
    """Trainable parameters of the run's model, built on the meta device (no weights allocated or loaded)."""
    with torch.device("meta"):
        model = vitreg.build_model(
            config.model,
            pretrained=False,
            img_size=config.img_size,
            registers=config.registers,
            frozen_blocks=config.frozen_blocks,
            register_entry=config.register_entry,
            num_classes=config.num_classes,
            **{**config.architecture_kwargs, "weight_init": "skip"},  # no random init of weights nobody reads
        )
    return vitreg.trainable_parameters(model)


def gpu_hours(config: TrainConfig) -> float:
    """Expected GPU-hours of one run: epochs x the per-epoch estimate (0 for a CPU run); see the constants."""
    if not config.use_gpu:
        return 0.0
    per_epoch = FINETUNE_GPU_HOURS_PER_EPOCH if config.frozen_blocks else SCRATCH_GPU_HOURS_PER_EPOCH
    return config.epochs * per_epoch


def docstring_estimate(make_experiment: Callable[..., Experiment], local: bool) -> str:
    """The "Expected run time" paragraph of the experiment's docstring (its local one for a local version)."""
    paragraphs = [" ".join(p.split()) for p in (make_experiment.__doc__ or "").split("\n\n")]
    chosen = [p for p in paragraphs if "time" in p or "minutes" in p]
    chosen = [p for p in chosen if p.startswith("local=True") == local]
    if not chosen:
        return ""
    text = chosen[0]
    return text[text.index("Expected run time") :] if "Expected run time" in text else text


def grid_lines(
    experiment: Experiment, config_of: Callable[[Mapping[str, Any]], TrainConfig], estimate: str = ""
) -> list[str]:
    """What a sweep dry run prints: one line per cell (id, epochs, trainable parameters, GPU-hours), or one per
    search axis, and the sweep's expected GPU-hours. `config_of(values)` is a trial's validated TrainConfig."""
    lines = [f"sweep {experiment.name}: {experiment.trials} trial(s), metric {experiment.metric} ({experiment.mode})"]
    if experiment.is_grid:
        configs = [(cell_id(cell), config_of(cell)) for cell in experiment.grid]
    else:
        for key, domain in experiment.space.items():
            shown = ", ".join(map(str, domain.values)) if isinstance(domain, Choice) else f"{domain}"
            lines.append(f"  axis {key}: {shown}")
        configs = [("base", config_of({}))]
    lines.append(f"  {'cell':36s} {'epochs':>6s} {'trainable':>12s} {'GPU-h':>7s}")
    for name, config in configs:
        lines.append(f"  {name:36s} {config.epochs:6d} {trainable_parameters(config):12,d} {gpu_hours(config):7.1f}")
    per_trial = [gpu_hours(config) for _, config in configs]
    total = sum(per_trial) if experiment.is_grid else experiment.trials * per_trial[0]
    lines.append(
        f"expected GPU-hours: {total:.1f}"
        + (
            " (if every trial ran all its epochs at the base's cost per epoch; ASHA stops most trials early)"
            * (not experiment.is_grid)
        )
    )
    lines.append(
        f"  = sum over trials of epochs x {FINETUNE_GPU_HOURS_PER_EPOCH:.2f} GPU-h per epoch for a fine-tune "
        f"(frozen_blocks > 0), {SCRATCH_GPU_HOURS_PER_EPOCH:.2f} from scratch; 0 for CPU runs (use_gpu=false)."
    )
    lines.append(
        "  These are the study's DeiT-III Small timings on ImageNet-1k at 224 px (A100 / H100): an estimate of"
        " training compute only, for that model and data; evaluation and start-up are not counted."
    )
    if estimate:
        lines.append(f"the experiment's own estimate: {estimate}")
    return lines
