"""MLflow for the whole project: where the store is, our experiments, and one training run's tracker.

One store: train, sweeps and analysis all resolve their tracking URI here (`resolve_tracking_uri`): the
`--mlflow-uri` flag of every entry script, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/outputs/mlflow.db`,
next to the other outputs (`outputs/runs`, `outputs/ray_results`), made absolute in the driver so that Ray workers
with another working directory write to the same database. Artifacts of a sqlite store go next to the database,
`<db dir>/mlartifacts/<experiment>` (MLflow's own default, `./mlruns`, is relative to whichever process first
creates the experiment). `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`, started from the same
directory, shows everything.

Every experiment we create or reuse is tagged `mlflow.experimentKind=custom_model_development`: without that tag
MLflow 3.17's UI opens an experiment as a GenAI one (traces, "Evaluations"); with it, the model-training view.

Only Ray Train rank 0 creates a `RunTracker`; the others never touch MLflow. A tracking server that is slow or
down never stops training: every call is tried `retries` times with a growing pause, then given up with one
warning, and the tracker goes offline for the rest of this attempt (so a dead server costs seconds once, not every
epoch). `finish` tries once more and back-fills every epoch of the run's history that MLflow does not have yet, so
a server that comes back (or a resumed run) ends complete, and a resumed run logs into the same MLflow run (its id
is kept in the run directory) without duplicate points.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # train.config pulls in torch and timm; the compare command and the sweeps' driver need neither
    from train.config import TrackingConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_STORE = Path("outputs") / "mlflow.db"  # under the driver's working directory
ARTIFACTS_DIR = "mlartifacts"  # next to a sqlite database
# The UI's experiment type (mlflow/server/js/src/experiment-tracking/constants.ts, `ExperimentKind`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Kinds the UI guessed or left open, which we replace; any other value was chosen by a person and is kept.
GUESSED_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NOTE_TAG = "mlflow.note.content"  # the run's description (markdown) in the UI
TRAINING_RUN_TAG = "vitreg.training_run_id"  # on a run derived from trained models: their training run ids
STEP_KEY = "train/loss"  # a metric every epoch logs: its steps say which epochs MLflow already has
MLFLOW_URI_HELP = (
    f"MLflow tracking URI (default: ${TRACKING_URI_ENV}, else sqlite:///<cwd>/{DEFAULT_STORE.as_posix()}; "
    "a relative sqlite path is made absolute)"
)


def default_tracking_uri() -> str:
    """`sqlite:///<cwd>/outputs/mlflow.db`, absolute."""
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri` (the `--mlflow-uri` flag), else $MLFLOW_TRACKING_URI, else `default_tracking_uri()`.

    A relative sqlite path (`sqlite:///outputs/mlflow.db`) is made absolute against the current directory, so the
    driver can hand the URI to Ray workers that run elsewhere.

    Raises:
        ValueError: a `file:` URI or a plain path: MLflow 3 has no file store.
    """
    uri = uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri()
    if uri.startswith("file:") or ("://" not in uri and uri != "databricks"):
        raise ValueError(f"MLflow tracking URI {uri!r}: MLflow 3 has no file store; use sqlite:///PATH or http://...")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            uri = f"sqlite:///{Path(path).absolute()}"
    return uri


def add_mlflow_uri_argument(parser: argparse.ArgumentParser) -> None:
    """The `--mlflow-uri` option, spelled and explained the same in every entry script."""
    parser.add_argument("--mlflow-uri", metavar="URI", help=MLFLOW_URI_HELP)


def tracking_client(tracking_uri: str) -> Any:
    """An `MlflowClient` for `tracking_uri` (the folder of a sqlite database is created)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: `<db dir>/mlartifacts/<experiment>` for a sqlite store, else
    None (the server decides)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR / folder).resolve().as_uri()


def ensure_experiment(client: Any, tracking_uri: str, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing (artifacts at `artifact_location`), tagged as a
    model-training experiment (`EXPERIMENT_KIND_TAG`) unless a person chose another kind for it in the UI."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location(tracking_uri, name),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except Exception:  # created meanwhile by a parallel trial or process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG, "") in GUESSED_KINDS:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def training_run_tags(client: Any, training_runs: Mapping[str, str]) -> dict[str, str]:
    """Tags that tie a run (probes, a comparison) to the training runs of the models it used.

    Args:
        client: an `MlflowClient` of the store that should hold the training runs.
        training_runs: model label -> its MLflow training run id.

    Returns:
        `TRAINING_RUN_TAG`: the ids, comma-separated; a description (`RUN_NOTE_TAG`) linking each model to its
        training run in the UI; and, when all models come from one training run, `PARENT_RUN_TAG`: the run then
        shows as a child of that training run, with a "Parent run" link on its page. A run id that this store
        does not hold is tagged but not linked (with a warning): the link would lead nowhere.
    """
    if not training_runs:
        return {}
    ids = list(dict.fromkeys(training_runs.values()))
    experiments: dict[str, str] = {}
    for run_id in ids:
        try:
            experiments[run_id] = client.get_run(run_id).info.experiment_id
        except Exception as error:  # not in this store (another server, a deleted database)
            logger.warning("training run %s is not in this MLflow store (%s); tagged, not linked", run_id, error)
    lines = ["Probed models and their training runs:", ""]
    for label, run_id in training_runs.items():
        where = f"[{run_id}](#/experiments/{experiments[run_id]}/runs/{run_id})" if run_id in experiments else run_id
        lines.append(f"- `{label}`: {where}")
    tags = {TRAINING_RUN_TAG: ",".join(ids), RUN_NOTE_TAG: "\n".join(lines)}
    if len(ids) == 1 and ids[0] in experiments:
        tags[PARENT_RUN_TAG] = ids[0]
    return tags


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
            self._client = tracking_client(self.uri)
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

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        """Progress metrics inside an epoch, at the global training step (a failing server only warns)."""
        if self.run_id is None:
            return

        def log() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
            self._client_or_new().log_batch(self.run_id, metrics=batch)

        self._call("log progress", log)

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
