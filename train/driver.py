"""Run one training configuration on Ray Train: the single entry point for scripts and sweeps.

`run_training(config, name=..., storage_path=...)` fits a `TorchTrainer` (Ray Train V2) whose run directory is
`<storage_path>/<name>`:

- the resolved config is written there as `config.json` before any worker starts;
- rerunning with the same name and storage path resumes from the last checkpoint (Ray Train finds it in the
  directory; the worker loop restores weights, optimiser, scheduler, history and its MLflow run id);
- a finished run (`result.json` present) is not started again: its result is returned as it was;
- resuming with a config that computes something else (any field but `OPERATIONAL_FIELDS`) is refused.

It needs no Ray Tune; a Tune function trainable calls it with `callbacks=[TuneReportCallback()]` and
`mlflow_parent_run_id=<the sweep's run>`. It connects to a running Ray cluster when there is one (ray job submit,
a Tune trial), else starts a local one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from train import storage
from train.config import TrainConfig
from train.epoch import NonFiniteLossError
from train.loop import RESULT_FILE, train_worker
from train.tracking import resolve_tracking_uri

CONFIG_FILE = "config.json"


def resolve(config: TrainConfig) -> TrainConfig:
    """The config as the workers will see it: the MLflow tracking URI fixed by the driver's environment."""
    tracking = replace(config.tracking, tracking_uri=resolve_tracking_uri(config.tracking.tracking_uri))
    return replace(config, tracking=tracking)


def _check_same_computation(saved: str, config: TrainConfig, run_dir: str) -> None:
    previous = TrainConfig.from_dict(json.loads(saved)).compute_fields()
    current = config.compute_fields()
    changed = sorted(k for k in current if current[k] != previous.get(k))
    if changed:
        details = "; ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"run directory {run_dir} holds a run of another config ({details}); resume it with its own config "
            "or choose a new name"
        )


def default_run_name(config: TrainConfig, prefix: str = "run") -> str:
    """A deterministic, readable run name: the main settings and a hash of everything that is computed."""
    digest = hashlib.sha1(json.dumps(config.compute_fields(), sort_keys=True).encode()).hexdigest()[:8]
    model = config.model.split(".")[0]
    return (
        f"{prefix}-{model}-reg{config.registers}-frozen{config.frozen_blocks}"
        f"-lam{config.penalty_lambda:g}-{config.lambda_schedule}-{digest}"
    )


def scaling_config(config: TrainConfig) -> ScalingConfig:
    resources = {"CPU": config.cpus_per_worker, **config.resources_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources)


def run_training(
    config: TrainConfig,
    *,
    name: str,
    storage_path: str | Path,
    mlflow_parent_run_id: str | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train `config` as Ray Train run `name` under `storage_path`; resume it if it exists, return it if done.

    Args:
        config: a validated `TrainConfig` (its validation already ran when it was built).
        name: run name: the run directory's name and the MLflow run name. Deterministic names make runs
            resumable; no timestamps.
        storage_path: local directory or URI shared by all nodes (Ray Train's `RunConfig.storage_path`).
        mlflow_parent_run_id: log as a nested child of this MLflow run (in the parent's experiment).
        callbacks: Ray Train `UserCallback`s (e.g. Tune's `TuneReportCallback`).

    Returns:
        A JSON-ready dict: name, path (run directory), config (resolved), metrics (last epoch, with time/*),
        history (one metrics dict per epoch), checkpoint_path, mlflow_run_id, resumed_from_epoch (0 for a
        fresh run), fit_s (seconds this call spent fitting) and already_finished (True when nothing ran).

    Raises:
        NonFiniteLossError: a training step's loss was NaN or infinite. The workers stop before that step's
            update and end without a Ray Train retry (it would compute the same value); the run keeps its last
            good checkpoint, its MLflow run is FAILED with the reason in the `vitreg.failure` tag, and no
            result.json is written.
        ray.train.TrainingFailedError: any other worker error, once `max_failures` restarts are used up.
    """
    if not name or "/" in name:
        raise ValueError(f"name={name!r}: must be a non-empty directory name without '/'")
    config = resolve(config)
    storage_path = storage.normalise(storage_path)
    run_dir = storage.join(storage_path, name)

    saved = storage.read_text(storage.join(run_dir, CONFIG_FILE))
    if saved is not None:
        _check_same_computation(saved, config, run_dir)
    finished = storage.read_text(storage.join(run_dir, RESULT_FILE))
    if finished is not None:
        return {**json.loads(finished), "already_finished": True, "fit_s": 0.0}
    storage.write_text(storage.join(run_dir, CONFIG_FILE), config.to_json())

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS / a running cluster (ray job submit), else starts a local one
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "name": name,
            "run_dir": run_dir,
            "mlflow_parent_run_id": mlflow_parent_run_id,
        },
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    started = time.time()
    result = trainer.fit()  # raises ray.train.TrainingFailedError once max_failures restarts are used up
    # Rank 0's result, which it also wrote as result.json (before MLflow shows the run FINISHED, so a driver killed
    # after the workers finished finds the run finished when rerun).
    summary = dict(result.return_value or {})
    failure = summary.pop("failure", None)
    if failure:
        raise NonFiniteLossError(
            f"run {name} ({run_dir}) stopped: {failure}. Last good checkpoint: {summary['checkpoint_path'] or 'none'}"
        )
    return {**summary, "fit_s": time.time() - started}
