"""Training runs and sweeps as models to probe: from a run directory, an MLflow run id or a sweep to the model file
of one checkpoint, with what the run's config says about the model.

A training run (`train.driver.run_training`, Ray Train) lives in `<storage>/<name>/`:

    config.json         the resolved TrainConfig (model name, architecture overrides, img_size, registers, classes)
    result.json         written when the run finished: checkpoint_path (the last checkpoint), mlflow_run_id, metrics
    mlflow_run_id       the run's MLflow id (written when the run starts)
    epoch_NNNN/         a checkpoint after NNNN epochs (Ray Train keeps the newest `keep_checkpoints`): state.pt
                        (the "model" state_dict with registers and head, optimiser, ...) and, from the training
                        that writes it, model.safetensors (the self-describing model file; preferred when present)

Its MLflow run carries the tag `vitreg.storage` = the run directory, which is how `mlflow:<run id>` finds it.
A sweep (sweeps/grid.py) puts its trials' runs in `<storage>/<sweep name>/train_runs/train-<trial name>/`; its
MLflow parent run (tags `vitreg.role=sweep`, `vitreg.sweep=<name>`) has one child run per trial.

Only JSON is read from a run directory (no TrainConfig is rebuilt): the run's data need not be on this machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.config import architecture
from train.data import IMAGENET_MEAN, IMAGENET_STD
from train.tracking import PARENT_RUN_TAG, resolve_tracking_uri, tracking_client
from vitreg import ModelBuildError, read_model_file_info

# File names as train.driver (CONFIG_FILE, RESULT_FILE) and train.loop (STATE_FILE, MLFLOW_RUN_ID_FILE) write them;
# kept as plain names here so that reading a run does not import Ray Train (tests/test_probe_runs.py checks them).
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
STORAGE_TAG = "vitreg.storage"  # set by train.loop.open_tracker on every training run
# The sweep's MLflow parent run (sweeps/mlflow_runs.py; analysis does not import sweeps).
SWEEP_ROLE_TAG, SWEEP_NAME_TAG = "vitreg.role", "vitreg.sweep"
SWEEP_TRAIN_RUNS = "train_runs"  # sweeps.grid.SweepSettings.train_storage: <storage>/<sweep>/train_runs
SWEEP_RUN_PREFIX = "train-"  # sweeps.grid names each trial's run `train-<trial name>`
STORAGE_ENV, DEFAULT_STORAGE = "VITREG_STORAGE", "outputs/ray_results"  # the sweeps' storage default
CHECKPOINT_PATTERN = re.compile(r"epoch_(\d+)")
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


class RunError(ValueError):
    """A training run, checkpoint or sweep that cannot be resolved to model files."""


@dataclass(frozen=True)
class RunModel:
    """One checkpoint of one training run, as a model to probe.

    Args:
        run_dir: the training run's directory.
        checkpoint: the checkpoint's directory name (`epoch_0003`).
        model_file: the file the model loads from: `model.safetensors` if the checkpoint has it, else `state.pt`.
        name: the timm model name the run trained (this and the next four: from the model file, else the config).
        model_kwargs: timm architecture overrides of the run (tiny test models).
        img_size: the training resolution.
        registers: registers the trained model has.
        num_classes: size of its trained head.
        mean, std: the input normalisation training used (train.data normalises with ImageNet's).
        training_run_id: the run's MLflow id (None if it was not tracked).
        config: the run's config.json.
    """

    run_dir: Path
    checkpoint: str
    model_file: Path
    name: str
    model_kwargs: dict[str, Any]
    img_size: int
    registers: int
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    training_run_id: str | None
    config: dict[str, Any] = field(repr=False)

    @property
    def epoch(self) -> int:
        """Epochs trained when the checkpoint was written."""
        return checkpoint_epoch(self.checkpoint)


def checkpoint_epoch(name: str) -> int:
    match = CHECKPOINT_PATTERN.fullmatch(name)
    if match is None:
        raise RunError(f"checkpoint {name!r}: expected a directory name epoch_NNNN")
    return int(match.group(1))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON: {error}") from error


def _local_dir(text: str | Path, what: str) -> Path:
    if "://" in str(text):
        raise RunError(f"{what} {text} is remote storage; copy the run directory to this machine and give that path")
    return Path(text).expanduser().resolve()


def is_run_dir(path: Path) -> bool:
    """A training run's directory: it holds the resolved config."""
    return (path / CONFIG_FILE).is_file()


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT_FILE).is_file()


def checkpoints(run_dir: Path) -> list[str]:
    """The run's checkpoint directories that hold a model, oldest first."""
    found = [
        path.name
        for path in run_dir.iterdir()
        if path.is_dir() and CHECKPOINT_PATTERN.fullmatch(path.name) and _model_file(path) is not None
    ]
    return sorted(found, key=checkpoint_epoch)


def _model_file(checkpoint_dir: Path) -> Path | None:
    for name in (MODEL_FILE, STATE_FILE):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    return None


def _choose_checkpoint(run_dir: Path, wanted: str | None) -> str:
    """`wanted` (`epoch_0003` or `3`), else the last checkpoint of a finished run."""
    available = checkpoints(run_dir)
    listing = ", ".join(available) or "none"
    if wanted is None:
        result = _read_json(run_dir / RESULT_FILE)
        if result is None:
            raise RunError(
                f"training run {run_dir} has not finished (no {RESULT_FILE}); name a checkpoint to probe it anyway, "
                f"e.g. run:{run_dir}@{available[-1] if available else 'epoch_0001'} (checkpoints: {listing})"
            )
        last = result.get("checkpoint_path")
        if not last:
            raise RunError(f"training run {run_dir}: {RESULT_FILE} names no checkpoint_path (checkpoints: {listing})")
        wanted = Path(str(last).rstrip("/")).name
    elif wanted.isdigit():
        wanted = f"epoch_{int(wanted):04d}"
    if wanted not in available:
        raise RunError(f"training run {run_dir} has no checkpoint {wanted!r} holding a model; checkpoints: {listing}")
    return wanted


def _model_facts(model_file: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Name, architecture overrides, img_size, registers and classes of the trained model: from the model file's
    metadata when the checkpoint has one (it also knows what a base model file held), else from the run's config;
    where the config states a value, the two must agree."""
    registers = config.get("registers")
    if model_file.name != MODEL_FILE:
        if registers is None:  # the architecture's own registers (e.g. *_reg4)
            registers = architecture(config["model"], config.get("model_kwargs") or {}).registers
        return {
            "name": config["model"],
            "model_kwargs": dict(config.get("model_kwargs") or {}),
            "img_size": int(config["img_size"]),
            "registers": int(registers),
            "num_classes": int(config["num_classes"]),
        }
    try:
        info = read_model_file_info(model_file)
    except ModelBuildError as error:
        raise RunError(str(error)) from error
    facts = {
        "name": info.timm_name,
        "model_kwargs": dict(info.model_kwargs),
        "img_size": info.img_size,
        "registers": info.registers,
        "num_classes": info.num_classes,
    }
    stated = {"name": config["model"], "img_size": config["img_size"], "num_classes": config["num_classes"]}
    if registers is not None:
        stated["registers"] = registers
    differ = {key: (value, facts[key]) for key, value in stated.items() if value != facts[key]}
    if differ:
        details = ", ".join(f"{key}: config {a!r}, model file {b!r}" for key, (a, b) in differ.items())
        raise RunError(f"{model_file} is not the model its run's {CONFIG_FILE} describes ({details})")
    return facts


def run_model(run: str | Path, checkpoint: str | None = None) -> RunModel:
    """The model of training run `run` at `checkpoint` (None: the last checkpoint of a finished run).

    Args:
        run: the run directory, or one of its checkpoint directories (then that checkpoint, unless `checkpoint`).
        checkpoint: `epoch_NNNN` or the epoch number.

    Raises:
        RunError: not a run directory, an unfinished run without a named checkpoint, an unknown checkpoint.
    """
    run_dir = _local_dir(run, "training run")
    # A checkpoint directory has a config.json too: recognise it by its name and its run directory above.
    if CHECKPOINT_PATTERN.fullmatch(run_dir.name) and is_run_dir(run_dir.parent):
        checkpoint = checkpoint or run_dir.name
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise RunError(f"training run directory {run_dir} does not exist")
    config = _read_json(run_dir / CONFIG_FILE)
    if config is None:
        raise RunError(f"{run_dir} is not a training run directory: it has no {CONFIG_FILE}")
    for key in ("model", "img_size", "num_classes"):
        if config.get(key) is None:
            raise RunError(f"{run_dir / CONFIG_FILE}: {key} is missing; was it written by train.driver?")
    chosen = _choose_checkpoint(run_dir, checkpoint)
    model_file = _model_file(run_dir / chosen)
    assert model_file is not None  # `checkpoints` lists only directories that hold one
    return RunModel(
        run_dir=run_dir,
        checkpoint=chosen,
        model_file=model_file,
        **_model_facts(model_file, config),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        training_run_id=recorded_run_id(run_dir),
        config=config,
    )


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id the training recorded in its directory (None if it was not tracked)."""
    result = _read_json(run_dir / RESULT_FILE) or {}
    if result.get("mlflow_run_id"):
        return str(result["mlflow_run_id"])
    id_file = run_dir / MLFLOW_RUN_ID_FILE
    if not id_file.is_file():
        return None
    return id_file.read_text().strip() or None


# ---------------------------------------------------------------- MLflow


def run_dir_of(run_id: str, tracking_uri: str | None = None) -> Path:
    """The directory of the training run tracked as MLflow run `run_id` (its `vitreg.storage` tag).

    Args:
        tracking_uri: the store holding the run (None: `train.tracking.resolve_tracking_uri`).

    Raises:
        RunError: no such run in the store, no storage tag, or the directory is missing or belongs to another run.
    """
    uri = resolve_tracking_uri(tracking_uri)
    try:
        run = tracking_client(uri).get_run(run_id)
    except Exception as error:  # unknown id, unreachable server: both mean we cannot resolve it
        raise RunError(f"MLflow run {run_id!r} not found in {uri}: {error}") from error
    storage = run.data.tags.get(STORAGE_TAG)
    if not storage:
        raise RunError(
            f"MLflow run {run_id} ({run.info.run_name}) has no {STORAGE_TAG} tag: it is not a training run of "
            "train.driver"
        )
    run_dir = _local_dir(storage, f"MLflow run {run_id}'s directory ({STORAGE_TAG})")
    if not is_run_dir(run_dir):
        raise RunError(f"MLflow run {run_id}: its directory {run_dir} ({STORAGE_TAG}) is missing or has no config")
    recorded = recorded_run_id(run_dir)
    if recorded is not None and recorded != run_id:
        raise RunError(f"MLflow run {run_id}: its directory {run_dir} records another MLflow run, {recorded}")
    return run_dir


# ---------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep: its name (the sweep's cell id or index) and its training run directory."""

    name: str
    run_dir: Path

    @property
    def finished(self) -> bool:
        return is_finished(self.run_dir)


def _trials_in(directory: Path) -> list[Trial]:
    runs = directory / SWEEP_TRAIN_RUNS if (directory / SWEEP_TRAIN_RUNS).is_dir() else directory
    return [
        Trial(path.name.removeprefix(SWEEP_RUN_PREFIX), path)
        for path in sorted(runs.iterdir())
        if path.is_dir() and is_run_dir(path)
    ]


def _sweep_parent(client: Any, ref: str, uri: str) -> Any:
    """The sweep's MLflow parent run, by run id or by sweep name (as sweeps.mlflow_runs.find_sweep)."""
    if RUN_ID_PATTERN.fullmatch(ref):
        try:
            run = client.get_run(ref)
        except Exception:  # not a run id of this store after all: try it as a name
            run = None
        if run is not None:
            if run.data.tags.get(SWEEP_ROLE_TAG) != "sweep":
                raise RunError(f"MLflow run {ref} ({run.info.run_name}) is not a sweep's parent run")
            return run
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    found = client.search_runs(
        experiments,
        filter_string=f"tags.`{SWEEP_ROLE_TAG}` = 'sweep' and tags.`{SWEEP_NAME_TAG}` = '{ref}'",
        max_results=100,
    )
    if len(found) > 1:
        ids = ", ".join(run.info.run_id for run in found)
        raise RunError(f"sweep name {ref!r} is taken by {len(found)} parent runs in {uri}: {ids}; pass a run id")
    if not found:
        raise RunError(f"no sweep directory, sweep name or sweep parent run id {ref!r} (MLflow store {uri})")
    return found[0]


def find_trials(
    ref: str, storage: str | Path | None = None, tracking_uri: str | None = None
) -> tuple[str, list[Trial]]:
    """The sweep `ref` and all its trials (finished or not), in name order.

    `ref` is tried as: a sweep directory (`<storage>/<sweep>`, or its `train_runs` folder); a sweep name under
    `storage` (None: $VITREG_STORAGE, else outputs/ray_results, as the sweeps); an MLflow sweep parent run id or
    sweep name in `tracking_uri`, whose child runs lead to the trial directories through their `vitreg.storage` tag.

    Returns:
        The sweep's name and its trials.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path.resolve()
        name = path.parent.name if path.name == SWEEP_TRAIN_RUNS else path.name
        return name, _trials_in(path)
    root = _local_dir(storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE, "sweep storage")
    if (root / ref).is_dir():
        return ref, _trials_in(root / ref)
    uri = resolve_tracking_uri(tracking_uri)
    client = tracking_client(uri)
    parent = _sweep_parent(client, ref, uri)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'",
        max_results=5000,
    )
    trials = []
    for child in children:
        storage_tag = child.data.tags.get(STORAGE_TAG)
        if not storage_tag:
            continue  # not a training run (e.g. a run someone attached by hand)
        run_dir = _local_dir(storage_tag, f"trial {child.info.run_name}'s directory")
        if not is_run_dir(run_dir):
            raise RunError(
                f"trial {child.info.run_name} (MLflow run {child.info.run_id}): its directory {run_dir} "
                f"({STORAGE_TAG}) is not on this machine; pass the sweep directory instead"
            )
        trials.append(Trial(run_dir.name.removeprefix(SWEEP_RUN_PREFIX), run_dir))
    name = parent.data.tags.get(SWEEP_NAME_TAG) or parent.info.run_name
    return name, sorted(trials, key=lambda trial: trial.name)
