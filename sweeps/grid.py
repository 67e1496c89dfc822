"""Run an `Experiment` (`train.experiments`) on Ray Tune with Optuna, resumably, with one MLflow parent run and a
Table-8 report.

The shape (see DESIGN.md, "Facts and pitfalls"): Tune runs a *function trainable* per trial; it builds the
trial's `TrainConfig` and calls `train.driver.run_training`, which builds and fits a Ray Train V2
`TorchTrainer` (its metrics reach Tune through `TuneReportCallback`). The trainable asks for one unit of the
custom resource `TRAIN_DRIVER` and no CPU, so it lives on the head node (or the embedded local node), while its
training workers take the CPUs/GPUs.

Resuming: everything is named deterministically (the Tune experiment, the trial directories, the Train runs
`train-<trial name>`, the MLflow parent run). Train runs are named after the trial's name (its cell id, or its
index in a search), not `train-trial_id=<id>`: Tune's trial ids are random, and a trial created after Tune's last
experiment checkpoint is handed out again by the restored searcher with a new id but the same name, so it finds
its Train run and its MLflow run again instead of starting a duplicate.

Rerunning the same command restores the Tune experiment (`Tuner.restore(..., resume_errored=True)`): finished
trials are kept, unfinished ones continue from their last Train checkpoint in the same MLflow child run, and a
Train run that already finished is not trained again (the driver returns its saved result).

A trial whose loss turns NaN or infinite (`NonFiniteLossError`) is not retried by Tune within the same sweep
command (Tune's `max_failures` retry would resume from the last checkpoint and compute the same loss again, an
epoch of compute for nothing): its Train run directory keeps a marker naming this driver's session, and the retry
ends at once with the same error. Rerunning the command is a new session and does retry it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sweeps import mlflow_runs, report
from train import storage
from train.config import TrainConfig, merge
from train.experiments import Choice, Experiment, IntRange, LogUniform, cell_id
from train.tracking import resolve_tracking_uri, tracking_client

logger = logging.getLogger(__name__)

DRIVER_RESOURCE = "TRAIN_DRIVER"
# Trials at a time on a machine without GPUs: more only slows each of them down.
MAX_CPU_CONCURRENCY = 2


@dataclass(frozen=True)
class SweepSettings:
    """Where and how one sweep runs (everything that is not the experiment itself).

    Args:
        preset: the experiment (with the command line's overrides merged into its base).
        name: the sweep's name: Tune experiment directory and MLflow parent run name.
        storage: root for the Tune experiment and the Train runs (local path or URI shared by all nodes).
        tracking_uri: MLflow tracking URI (sqlite:///... or http://...).
        mlflow_experiment: MLflow experiment of the parent run (the children follow their parent).
        data: data directory (`data.path` of every trial); None keeps the experiment base's.
        max_concurrent: trials at a time; None derives it from the cluster's resources.
        report_dir: where the table (text, CSV) and figure are written locally.
    """

    preset: Experiment
    name: str
    storage: str
    tracking_uri: str
    mlflow_experiment: str
    data: str | None = None
    max_concurrent: int | None = None
    report_dir: Path | None = None

    @property
    def experiment_path(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def train_storage(self) -> str:
        return storage.join(self.storage, self.name, "train_runs")


@dataclass
class SweepOutcome:
    """What a finished (or resumed-and-finished) sweep leaves behind."""

    name: str
    parent_run_id: str
    experiment_path: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    table: report.SweepTable | None = None
    table_text: str = ""
    files: list[Path] = field(default_factory=list)
    resumed: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Plain-data helpers (no Ray): names, spec, configs
# ---------------------------------------------------------------------------------------------------------------


def spec_dict(preset: Experiment) -> dict[str, Any]:
    """Everything that defines what the sweep computes, as JSON-ready data (for the hash and the parent run)."""
    return {
        "preset": preset.name,
        "base": preset.base_values(),
        "cells": [dict(cell) for cell in preset.grid],
        "space": {key: {"type": type(d).__name__, **asdict(d)} for key, d in preset.space.items()},
        "num_samples": preset.trials,
        "asha": asdict(preset.asha) if preset.asha else None,
        "metric": preset.metric,
        "mode": preset.mode,
        "seed": preset.seed,
    }


def spec_hash(preset: Experiment) -> str:
    return hashlib.sha256(json.dumps(spec_dict(preset), sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_name(prefix: str, base: Experiment, preset: Experiment) -> str:
    """`<prefix>-<preset>`, plus a short hash when overrides changed what it computes: reruns of one command
    resume the same sweep, and a smoke run never resumes (or pollutes) the full one."""
    name = f"{prefix}-{base.name}"
    if spec_hash(preset) != spec_hash(base):
        name += f"-{spec_hash(preset)[:8]}"
    return name


def make_settings(
    base: Experiment,
    *,
    prefix: str,
    name: str | None = None,
    storage_path: str | None = None,
    data: str | None = None,
    tracking_uri: str | None = None,
    mlflow_experiment: str | None = None,
    num_samples: int | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    max_concurrent: int | None = None,
    report_dir: Path | None = None,
) -> SweepSettings:
    """Settings from the entry scripts' options, with the defaults filled in.

    Defaults: storage $VITREG_STORAGE or ./outputs/ray_results; MLflow: `train.tracking.resolve_tracking_uri`
    (flag, $MLFLOW_TRACKING_URI, sqlite:///<cwd>/outputs/mlflow.db); experiment `vitreg-<prefix>`; name from
    `default_name`; report in <storage>/<name>/report when the storage is local, else ./outputs/sweeps/<name>.
    """
    preset = base.with_overrides(num_samples=num_samples, train_overrides=train_overrides)
    root = storage.normalise(storage_path or os.environ.get("VITREG_STORAGE") or "outputs/ray_results")
    uri = resolve_tracking_uri(tracking_uri)
    sweep = name or default_name(prefix, base, preset)
    if report_dir is None:
        report_dir = Path(root, sweep, "report") if "://" not in root else Path("outputs", "sweeps", sweep)
    return SweepSettings(
        preset=preset,
        name=sweep,
        storage=root,
        tracking_uri=uri,
        mlflow_experiment=mlflow_experiment or f"vitreg-{prefix}",
        data=str(Path(data).expanduser().resolve()) if data and "://" not in data else data,
        max_concurrent=max_concurrent,
        report_dir=report_dir,
    )


def train_values(settings: SweepSettings, trial_values: Mapping[str, Any]) -> dict[str, Any]:
    """The training-config values of one trial: the experiment's base, the trial's values, data, MLflow target."""
    values = merge(settings.preset.base, trial_values)
    if settings.data is not None:
        values = merge(values, {"data": {"path": settings.data}})
    return merge(
        values, {"tracking": {"tracking_uri": settings.tracking_uri, "experiment": settings.mlflow_experiment}}
    )


def train_config(settings: SweepSettings, trial_values: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig.from_dict(train_values(settings, trial_values))


def validate(settings: SweepSettings) -> TrainConfig:
    """Build every grid cell's config (or the search space's corners) before any compute; returns the base.

    A bad value fails here, naming the field, instead of inside trial 17 an hour later.
    """
    preset = settings.preset
    base = train_config(settings, {})
    if preset.is_grid:
        for cell in preset.grid:
            try:
                train_config(settings, cell)
            except ValueError as error:
                raise ValueError(f"sweep {preset.name!r}, cell {cell_id(cell)}: {error}") from error
    else:
        for key, domain in preset.space.items():
            corners = domain.values if isinstance(domain, Choice) else (domain.low, domain.high)
            for value in corners:
                try:
                    train_config(settings, {key: value})
                except ValueError as error:
                    raise ValueError(f"sweep {preset.name!r}, search axis {key}={value!r}: {error}") from error
    return base


def trial_name(preset: Experiment, tune_config: Mapping[str, Any], counter: int) -> str:
    """Deterministic: the cell id for a grid (order-free), the trial's index for a search."""
    if preset.is_grid:
        return str(tune_config["cell"])
    return f"trial{counter:03d}"


def max_concurrent_trials(config: TrainConfig, resources: Mapping[str, float], trials: int) -> int:
    """How many trials may run at once on a cluster with `resources` (`ray.cluster_resources()`).

    GPU runs: the cluster's GPUs over the GPUs one trial takes; on an autoscaling cluster whose GPU workers are
    not up yet, the head's `TRAIN_DRIVER` slots (cluster.yaml sizes them to the GPUs at max_workers). CPU runs:
    the CPUs over one trial's CPUs, at most `MAX_CPU_CONCURRENCY`.
    """
    drivers = int(resources.get(DRIVER_RESOURCE, 0))
    if config.use_gpu:
        gpus = int(resources.get("GPU", 0))
        limit = gpus // config.num_workers if gpus else drivers
    else:
        cpus = float(resources.get("CPU", 1))
        limit = min(MAX_CPU_CONCURRENCY, int(cpus // (config.num_workers * config.cpus_per_worker)))
    if drivers:
        limit = min(limit, drivers)
    return max(1, min(limit, trials))


# ---------------------------------------------------------------------------------------------------------------
# Tune wiring
# ---------------------------------------------------------------------------------------------------------------


def param_space(preset: Experiment) -> dict[str, Any]:
    """Tune domains: one categorical `cell` axis for a grid, one domain per axis for a search."""
    from ray import tune

    if preset.is_grid:
        return {"cell": tune.choice([cell_id(cell) for cell in preset.grid])}
    space: dict[str, Any] = {}
    for key, domain in preset.space.items():
        if isinstance(domain, Choice):
            space[key] = tune.choice(list(domain.values))
        elif isinstance(domain, IntRange):
            space[key] = tune.randint(domain.low, domain.high + 1)  # Tune's upper bound is exclusive
        elif isinstance(domain, LogUniform):
            space[key] = tune.loguniform(domain.low, domain.high)
    return space


def search_algorithm(preset: Experiment) -> Any:
    """Optuna: GridSampler over the cell ids (each exactly once) or TPE over the axes."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if preset.is_grid:
        sampler = optuna.samplers.GridSampler({"cell": [cell_id(cell) for cell in preset.grid]}, seed=preset.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=preset.seed)
    return OptunaSearch(sampler=sampler)


def scheduler(preset: Experiment, epochs: int) -> Any:
    if preset.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=min(preset.asha.grace_period, epochs),
        reduction_factor=preset.asha.reduction_factor,
    )


def _counter(trial: Any) -> int:
    tag = str(getattr(trial, "experiment_tag", "") or "0")
    head = tag.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


NONFINITE_MARKER = "nonfinite_failure.json"  # in a Train run directory: which sweep session saw the loss diverge


def make_trainable(settings: SweepSettings, parent_run_id: str) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of this sweep, wrapped to take one `TRAIN_DRIVER` unit and no CPU."""
    from ray import tune

    session = uuid.uuid4().hex  # this sweep command; a rerun of the command is another session

    def run_trial(tune_config: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from train.driver import run_training
        from train.epoch import NonFiniteLossError

        name = tune.get_context().get_trial_name()
        values = settings.preset.trial_values(tune_config)
        config = train_config(settings, values)
        marker = storage.join(settings.train_storage, f"train-{name}", NONFINITE_MARKER)
        seen = json.loads(storage.read_text(marker) or "{}")
        if seen.get("session") == session:  # Tune's retry of a diverged trial: the same loss again, so stop now
            raise NonFiniteLossError(f"{seen['error']} (not retried in this sweep; rerun the command to retry)")
        try:
            result = run_training(
                config,
                name=f"train-{name}",
                storage_path=settings.train_storage,
                mlflow_parent_run_id=parent_run_id,
                callbacks=[TuneReportCallback()],
            )
        except NonFiniteLossError as error:
            storage.write_text(marker, json.dumps({"session": session, "error": str(error)}) + "\n")
            raise
        if result.get("already_finished") or result.get("resumed_from_epoch", 0) >= config.epochs:
            # The Train run had finished before the sweep driver was killed, but Tune had not recorded it: nothing
            # was trained (or reported) now, so report its final metrics.
            tune.report(dict(result.get("metrics") or {}))

    return tune.with_resources(run_trial, {DRIVER_RESOURCE: 1})


def build_tuner(settings: SweepSettings, parent_run_id: str, base: TrainConfig, concurrency: int) -> tuple[Any, bool]:
    """A new Tuner, or the restored one when the experiment exists (same name and storage)."""
    from ray import tune

    trainable = make_trainable(settings, parent_run_id)
    path = settings.experiment_path
    if tune.Tuner.can_restore(path):
        logger.info("resuming sweep %s from %s", settings.name, path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True), True

    preset = settings.preset

    def name_of(trial: Any) -> str:
        return trial_name(preset, trial.config, _counter(trial))

    tuner = tune.Tuner(
        trainable,
        param_space=param_space(preset),
        tune_config=tune.TuneConfig(
            metric=preset.metric,
            mode=preset.mode,
            search_alg=search_algorithm(preset),
            scheduler=scheduler(preset, base.epochs),
            num_samples=preset.trials,
            max_concurrent_trials=concurrency,
            trial_name_creator=name_of,
            trial_dirname_creator=name_of,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=settings.storage,
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )
    return tuner, False


# ---------------------------------------------------------------------------------------------------------------
# Ray connection
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connect(local: bool, address: str | None, drivers: int) -> Callable[[], None]:
    """Join the cluster (`address`, $RAY_ADDRESS as set by `ray job submit`), or start an embedded one.

    The embedded instance (local presets) keeps the dashboard (bound to 127.0.0.1; Ray Train's placement-group
    cleaner needs the state API) and offers `drivers` TRAIN_DRIVER slots. Its GCS port is chosen here and
    exported as RAY_ADDRESS to every process of the instance: Ray's state API, called inside workers, otherwise
    guesses the cluster from the running GCS processes and fails when a machine runs several Ray instances
    (CI, tests, a second sweep), which leaks the placement groups of early-stopped trials.

    Returns a function that disconnects (and stops the embedded instance, restoring the environment).
    """
    import ray

    if ray.is_initialized():
        return lambda: None
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}

    def restore() -> None:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    elif local:
        from ray._private.services import get_node_ip_address

        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
        ray.init(
            address="local", resources={DRIVER_RESOURCE: drivers}, include_dashboard=True, dashboard_host="127.0.0.1"
        )
    else:
        ray.init(address="auto")
    available = ray.cluster_resources()
    if DRIVER_RESOURCE not in available:
        restore()
        raise RuntimeError(
            f"the Ray cluster offers no {DRIVER_RESOURCE!r} resource (it has {sorted(available)}): trials run on "
            f"the node that has it. Start the head with --resources '{{\"{DRIVER_RESOURCE}\": 8}}' (cluster.yaml "
            "does this)."
        )
    return restore


# ---------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------


def run_sweep(settings: SweepSettings, *, address: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep to the end, then write and log its table and figure."""
    import ray

    preset = settings.preset
    base = validate(settings)
    spec = {**spec_dict(preset), "name": settings.name, "storage": settings.storage}
    parent = mlflow_runs.open_parent(
        settings.tracking_uri,
        settings.mlflow_experiment,
        settings.name,
        spec,
        spec_hash(preset),
        tags={
            "vitreg.preset": preset.name,
            "vitreg.experiment_path": settings.experiment_path,
            "mlflow.note.content": preset.description,  # the run's description in the MLflow UI
        },
    )
    local_drivers = max_concurrent_trials(base, {"CPU": float(os.cpu_count() or 1)}, preset.trials)
    disconnect = connect(preset.local, address, local_drivers)
    try:
        concurrency = settings.max_concurrent or max_concurrent_trials(base, ray.cluster_resources(), preset.trials)
        logger.info("sweep %s: %d trials, %d at a time", settings.name, preset.trials, concurrency)
        tuner, resumed = build_tuner(settings, parent.run_id, base, concurrency)
        trials = summarise_trials(tuner.fit())
    except BaseException:
        mlflow_runs.close_parent(settings.tracking_uri, parent, "FAILED")
        raise
    finally:
        disconnect()

    # FAILED while a trial failed: rerunning the command retries it (resume_errored) and closes the run again.
    status = "FINISHED" if all(t["status"] == "TERMINATED" for t in trials) else "FAILED"
    outcome = SweepOutcome(settings.name, parent.run_id, settings.experiment_path, trials, resumed=resumed)
    tag_children(settings, parent, trials)
    write_report(settings, parent, outcome)
    mlflow_runs.close_parent(settings.tracking_uri, parent, status)
    return outcome


def summarise_trials(results: Any) -> list[dict[str, Any]]:
    """Name, status and last metrics of every trial in a Tune `ResultGrid`."""
    trials = []
    for result in results:
        path = Path(result.path) if result.path else None
        metrics = dict(result.metrics or {})
        config = metrics.get("config") or result.config or {}
        trials.append(
            {
                "trial": path.name if path else "",
                "status": "ERROR" if result.error else "TERMINATED",
                "config": dict(config),
                "metrics": {k: v for k, v in metrics.items() if "/" in k},
                "iterations": metrics.get("training_iteration"),
                "error": str(result.error) if result.error else None,
            }
        )
    return trials


def tag_children(settings: SweepSettings, parent: mlflow_runs.ParentRun, trials: list[dict[str, Any]]) -> None:
    """Tag each trial's MLflow child run with the sweep axes (for grouping in the UI); close the runs of trials
    that Tune stopped early (ASHA), which their killed workers could not close."""
    client = tracking_client(settings.tracking_uri)
    by_name = {run.info.run_name: run for run in mlflow_runs.child_runs(settings.tracking_uri, parent)}
    epochs_total = train_config(settings, {}).epochs
    for trial in trials:
        run = by_name.get(f"train-{trial['trial']}")
        if run is None:
            continue
        values = settings.preset.trial_values(trial["config"]) if trial["config"] else {}
        params = run.data.params
        tags = {
            mlflow_runs.SWEEP_TAG: settings.name,
            mlflow_runs.TRIAL_TAG: trial["trial"],
            "frozen_blocks": str(values.get("frozen_blocks", params.get("frozen_blocks", ""))),
            "registers": str(values.get("registers", params.get("registers", ""))),
            "lambda": str(values.get("penalty_lambda", params.get("penalty_lambda", ""))),
            "schedule": str(values.get("lambda_schedule", params.get("lambda_schedule", "")).strip('"')),
        }
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        iterations = trial.get("iterations") or 0
        epochs = int(json.loads(params.get("epochs", str(epochs_total))))
        if run.info.status == "RUNNING" and trial["status"] == "TERMINATED" and iterations < epochs:
            client.set_tag(run.info.run_id, "vitreg.stopped_early", f"after {iterations} of {epochs} epochs")
            client.set_terminated(run.info.run_id, "KILLED")


def report_rows(settings: SweepSettings, parent: mlflow_runs.ParentRun) -> list[dict[str, Any]]:
    """One row per MLflow child run of the sweep (the record of what was trained), Table-8 keys."""
    return mlflow_runs.trial_rows(settings.tracking_uri, parent)


def failed_trials_text(trials: list[dict[str, Any]]) -> str:
    """The trials Tune ended with ERROR (a NaN loss, a crash), each with the last line of its error: the
    reason, where the table's status column only says FAILED. Empty when every trial finished."""
    lines = []
    for trial in trials:
        if trial["status"] == "ERROR":
            reason = [line.strip() for line in (trial["error"] or "").splitlines() if line.strip()] or ["unknown"]
            lines.append(f"  {trial['trial']}: {reason[-1][:500]}")
    return "\n\nfailed trials (rerun the command to retry them):\n" + "\n".join(lines) if lines else ""


def write_report(settings: SweepSettings, parent: mlflow_runs.ParentRun, outcome: SweepOutcome) -> None:
    """Print the Table-8 table, write it (text + CSV) and the figure, and attach them to the parent run."""
    directory = settings.report_dir or Path("outputs") / "sweeps" / settings.name
    directory.mkdir(parents=True, exist_ok=True)
    table = report.build_table(report_rows(settings, parent), report.ARTIFACT_METRICS)
    text = report.format_table(table) + failed_trials_text(outcome.trials)
    (directory / "table.txt").write_text(text + "\n")
    csv_path = report.write_csv(table, directory / "table.csv")
    figure = report.plot_accuracy_vs_artifacts(
        table, directory / "accuracy_vs_artifacts.png", f"{settings.name}: accuracy vs artifact metrics"
    )
    files = [directory / "table.txt", csv_path, figure]
    accuracies = [r["acc1"] for r in table.rows if isinstance(r.get("acc1"), int | float) and math.isfinite(r["acc1"])]
    summary = {"trials": float(len(table.rows))}
    if accuracies:
        summary["best_acc1"] = max(accuracies)
    mlflow_runs.log_report(settings.tracking_uri, parent, files, summary)
    outcome.table, outcome.table_text, outcome.files = table, text, files
    print(f"\n{settings.name} ({len(table.rows)} trials; MLflow parent run {parent.run_id})\n{text}\n", flush=True)
    print("report: " + ", ".join(str(f) for f in files), flush=True)
