"""The sweep's MLflow parent run and the reading back of its children (one nested child run per trial, created
by the training driver with `mlflow_parent_run_id`).

The parent is found again, never duplicated: it is identified by its experiment plus the tags
`vitreg.role=sweep` and `vitreg.sweep=<sweep name>`, so rerunning (resuming) a sweep logs into the same parent.
The sweep's spec is kept on the parent (`vitreg.spec_hash` tag, `sweep_spec.json` artifact): resuming a sweep
under the same name with a different spec is refused instead of mixing two sweeps.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.tracking import ensure_experiment

logger = logging.getLogger(__name__)

ROLE_TAG = "vitreg.role"
SWEEP_TAG = "vitreg.sweep"
SPEC_HASH_TAG = "vitreg.spec_hash"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "vitreg.trial"  # set on each child by the sweep: the Tune trial name (deterministic)


class SweepSpecMismatch(RuntimeError):
    """A sweep of this name already exists with another spec."""


@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment_id: str
    resumed: bool


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing (artifacts next to a sqlite database)."""
    return ensure_experiment(_client(tracking_uri), tracking_uri, name)


def find_parent(tracking_uri: str, experiment: str, sweep: str) -> Any | None:
    """The live parent run of sweep `sweep` in `experiment`, or None (the oldest if several)."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep}'",
        order_by=["attributes.start_time ASC"],
    )
    if len(runs) > 1:
        logger.warning("%d parent runs for sweep %r; using the oldest, %s", len(runs), sweep, runs[0].info.run_id)
    return runs[0] if runs else None


def open_parent(
    tracking_uri: str,
    experiment: str,
    sweep: str,
    spec: Mapping[str, Any],
    spec_hash: str,
    tags: Mapping[str, str] = (),
) -> ParentRun:
    """Find the sweep's parent run (and mark it running again) or create it with its spec and tags.

    Raises:
        SweepSpecMismatch: the parent exists with another spec hash.
    """
    client = _client(tracking_uri)
    existing = find_parent(tracking_uri, experiment, sweep)
    if existing is not None:
        found_hash = existing.data.tags.get(SPEC_HASH_TAG)
        if found_hash != spec_hash:
            raise SweepSpecMismatch(
                f"sweep {sweep!r} already exists in MLflow experiment {experiment!r} (parent run "
                f"{existing.info.run_id}) with spec {found_hash}, not {spec_hash}: it was started with other "
                "settings. Rerun with the same settings to resume it, or pass another --name."
            )
        client.update_run(existing.info.run_id, status="RUNNING")
        return ParentRun(existing.info.run_id, existing.info.experiment_id, resumed=True)

    exp_id = experiment_id(tracking_uri, experiment)
    run = client.create_run(
        exp_id,
        run_name=sweep,
        tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep, SPEC_HASH_TAG: spec_hash, **dict(tags)},
    )
    run_id = run.info.run_id
    params = {key: value for key, value in spec.items() if isinstance(value, str | int | float | bool)}
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:6000])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep_spec.json"
        path.write_text(json.dumps(spec, indent=2, sort_keys=True, default=str) + "\n")
        client.log_artifact(run_id, str(path))
    return ParentRun(run_id, exp_id, resumed=False)


def child_runs(tracking_uri: str, parent: ParentRun) -> list[Any]:
    """Every (not deleted) child run of `parent`, oldest first."""
    client = _client(tracking_uri)
    return list(
        client.search_runs(
            [parent.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=5000,
        )
    )


def log_report(tracking_uri: str, parent: ParentRun, files: list[Path], metrics: Mapping[str, float]) -> None:
    """Attach the report files (table CSV/text, figure) and summary metrics to the parent run."""
    client = _client(tracking_uri)
    for path in files:
        client.log_artifact(parent.run_id, str(path), "report")
    for key, value in metrics.items():
        client.log_metric(parent.run_id, key, float(value))


def close_parent(tracking_uri: str, parent: ParentRun, status: str) -> None:
    _client(tracking_uri).set_terminated(parent.run_id, status)
