"""MLflow for one training run. Only Ray Train rank 0 creates a `RunTracker`; the others never touch MLflow.

A tracking server that is slow or down never stops training: every call is tried `retries` times with a growing
pause, then given up with one warning, and the tracker goes offline for the rest of this attempt (so a dead
server costs seconds once, not every epoch). `finish` tries once more and back-fills every epoch of the run's
history that MLflow does not have yet, so a server that comes back (or a resumed run) ends complete, and a
resumed run logs into the same MLflow run (its id is kept in the run directory) without duplicate points.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from train.config import TrackingConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
PARENT_RUN_TAG = "mlflow.parentRunId"
STEP_KEY = "train/loss"  # a metric every epoch logs: its steps say which epochs MLflow already has


def ensure_experiment(client: Any, tracking_uri: str, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing, with its artifacts next to a sqlite database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # Explicit: MLflow's default (./mlruns) is relative to whichever process creates the experiment, e.g. a
        # Ray worker's temporary working directory.
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a parallel trial or process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db` (absolute, so workers agree)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config data -> `{"data.path": "...", "betas": "[0.9, 0.999]"}`, MLflow param strings."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict (MLflow metrics are floats)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class RunTracker:
    """Rank 0's MLflow run: create or resume it, log params, per-epoch metrics, figures and tags.

    Args:
        settings: the run's `TrackingConfig` (its tracking_uri already resolved by the driver).
    """

    def __init__(self, settings: TrackingConfig) -> None:
        self.settings = settings
        self.uri = resolve_tracking_uri(settings.tracking_uri)
        self.run_id: str | None = None
        self.online = settings.enabled
        self._client: Any = None
        self._monitor: Any = None
        self._logged_steps: set[int] = set()
        self._start_args: dict[str, Any] = {}

    # -- plumbing -----------------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        """`fn()` with retries; None (and offline from now on) if every try fails."""
        if not self.online:
            return None
        delay = self.settings.retry_backoff_s
        for attempt in range(1, self.settings.retries + 1):
            try:
                return fn()
            except Exception as error:  # any client, network or store error: tracking must not stop training
                if attempt == self.settings.retries:
                    logger.warning(
                        "MLflow %s failed %d time(s) at %s (%s: %s); training goes on, MLflow is skipped until "
                        "the end of this attempt",
                        what,
                        attempt,
                        self.uri,
                        type(error).__name__,
                        error,
                    )
                    self.online = False
                    return None
                time.sleep(delay)
                delay *= 2
        return None

    def _client_or_new(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.uri)
        return self._client

    def _experiment_id(self, parent_run_id: str | None) -> str:
        client = self._client_or_new()
        if parent_run_id:
            return client.get_run(parent_run_id).info.experiment_id  # children live with their parent
        return ensure_experiment(client, self.uri, self.settings.experiment)

    # -- the run ------------------------------------------------------------------------------------------------

    def start(
        self,
        *,
        run_id: str | None,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str] = (),
        parent_run_id: str | None = None,
    ) -> str | None:
        """Resume MLflow run `run_id`, or create one (a child of `parent_run_id` if given) and log `params`.

        Returns the run id, or None when MLflow is disabled or unreachable.
        """
        if not self.settings.enabled:
            return None
        # MLflow's own HTTP timeout and retries (REST servers); a user's environment wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.settings.http_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.settings.http_max_retries))
        self._start_args = {"run_name": run_name, "params": dict(params), "tags": dict(tags), "parent": parent_run_id}
        self.run_id = self._call("start", lambda: self._open(run_id, run_name, params, tags, parent_run_id))
        if self.run_id and self.settings.system_metrics:
            self._call("system metrics", lambda: self._start_monitor(resumed=run_id is not None))
        return self.run_id

    def _open(
        self,
        run_id: str | None,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent_run_id: str | None,
    ) -> str:
        from mlflow.entities import Param, RunTag

        client = self._client_or_new()
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            self._logged_steps = {m.step for m in client.get_metric_history(run_id, STEP_KEY)}
            return run_id
        run_tags = dict(tags)
        if parent_run_id:
            run_tags[PARENT_RUN_TAG] = parent_run_id
        run = client.create_run(self._experiment_id(parent_run_id), tags=run_tags, run_name=run_name)
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            client.log_batch(run.info.run_id, params=items[start : start + 100])
        client.log_batch(run.info.run_id, tags=[RunTag("vitreg.run_name", run_name)])
        self._logged_steps = set()
        return run.info.run_id

    def _start_monitor(self, resumed: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.settings.system_metrics_interval_s,
            resume_logging=resumed,
            tracking_uri=self.uri,
        )
        self._monitor.start()

    def log_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Log every epoch of `history` (dicts with an `epoch` key, the step) that MLflow does not have yet."""
        missing = [entry for entry in history if int(entry["epoch"]) not in self._logged_steps]
        if not missing or self.run_id is None:
            return

        def log() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            for entry in missing:
                step = int(entry["epoch"])
                metrics = [Metric(k, v, now, step) for k, v in numeric(entry).items() if k != "epoch"]
                for start in range(0, len(metrics), 1000):
                    self._client_or_new().log_batch(self.run_id, metrics=metrics[start : start + 1000])
                self._logged_steps.add(step)

        self._call("log metrics", log)

    def log_artifacts(self, paths: Sequence[Path], artifact_path: str = "figures") -> None:
        """Upload files (figures, the resolved config) to the run's artifacts."""
        if self.run_id is None:
            return
        for path in paths:
            self._call(
                f"log artifact {path.name}",
                lambda p=path: self._client.log_artifact(self.run_id, str(p), artifact_path),
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is None:
            return
        for key, value in tags.items():
            self._call(f"set tag {key}", lambda k=key, v=value: self._client.set_tag(self.run_id, k, v))

    def finish(self, history: Sequence[Mapping[str, Any]] = (), status: str = "FINISHED") -> None:
        """Back-fill `history` (one more try if MLflow went offline), stop system metrics, close the run."""
        if not self.settings.enabled:
            return
        if not self.online:
            self.online = True  # one more chance: the server may be back
            if self.run_id is None and self._start_args:
                args = self._start_args
                self.run_id = self._call(
                    "start", lambda: self._open(None, args["run_name"], args["params"], args["tags"], args["parent"])
                )
        self.log_history(history)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as error:  # the monitor's own flush; never fatal
                logger.warning("MLflow system metrics did not stop cleanly: %s", error)
            self._monitor = None
        if self.run_id is not None:
            self._call("end run", lambda: self._client.set_terminated(self.run_id, status))
