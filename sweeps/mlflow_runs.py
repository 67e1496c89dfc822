"""The sweep's MLflow parent run and the reading back of its children (one nested child run per trial, created
by the training driver with `mlflow_parent_run_id`).

The parent is found again, never duplicated: it is identified by its experiment plus the tags
`vitreg.role=sweep` and `vitreg.sweep=<sweep name>`, so rerunning (resuming) a sweep logs into the same parent.
The sweep's spec is kept on the parent (`vitreg.spec_hash` tag, `sweep_spec.json` artifact): resuming a sweep
under the same name with a different spec is refused instead of mixing two sweeps.

A finished sweep is found again by its name or its parent run id (`find_sweep`, used by the compare command), and
its trials read back as Table-8 rows (`trial_rows`) and per-epoch metric histories (`metric_histories`).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.report import ACC1_METRIC, ACC5_METRIC, ARTIFACT_METRICS
from train.tracking import PARENT_RUN_TAG, ensure_experiment, tracking_client

logger = logging.getLogger(__name__)

ROLE_TAG = "vitreg.role"
SWEEP_TAG = "vitreg.sweep"
SPEC_HASH_TAG = "vitreg.spec_hash"
PARENT_TAG = PARENT_RUN_TAG
TRIAL_TAG = "vitreg.trial"  # set on each child by the sweep: the Tune trial name (deterministic)


class SweepSpecMismatch(RuntimeError):
    """A sweep of this name already exists with another spec."""


class SweepNotFound(LookupError):
    """No sweep (or more than one) answers to a name or run id."""


@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment_id: str
    resumed: bool
    sweep: str = ""  # the sweep's name


def _client(tracking_uri: str) -> Any:
    return tracking_client(tracking_uri)


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
        return ParentRun(existing.info.run_id, existing.info.experiment_id, resumed=True, sweep=sweep)

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
    return ParentRun(run_id, exp_id, resumed=False, sweep=sweep)


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


def _parent_of(run: Any) -> ParentRun:
    return ParentRun(run.info.run_id, run.info.experiment_id, resumed=True, sweep=run.data.tags.get(SWEEP_TAG, ""))


def find_sweep(tracking_uri: str, ref: str) -> ParentRun:
    """The parent run of a sweep given its name (the `vitreg.sweep` tag) or its parent run id, in any experiment.

    Raises:
        SweepNotFound: nothing matches, the run is not a sweep's parent, or the name is taken by several sweeps
            (then pass one of the listed run ids).
    """
    client = _client(tracking_uri)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            run = client.get_run(ref)
        except Exception:  # not a run id after all; try it as a name
            run = None
        if run is not None:
            if run.data.tags.get(ROLE_TAG) != "sweep":
                raise SweepNotFound(
                    f"MLflow run {ref} ({run.info.run_name}) is not a sweep's parent run: its tag {ROLE_TAG} is "
                    f"{run.data.tags.get(ROLE_TAG)!r}, not 'sweep'"
                )
            return _parent_of(run)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", max_results=5000)
    matches = [run for run in parents if run.data.tags.get(SWEEP_TAG) == ref]
    if len(matches) == 1:
        return _parent_of(matches[0])
    if matches:
        listed = ", ".join(f"{run.info.run_id} (experiment {run.info.experiment_id})" for run in matches)
        raise SweepNotFound(f"sweep name {ref!r} is taken by {len(matches)} parent runs: {listed}; pass a run id")
    known = sorted({run.data.tags.get(SWEEP_TAG, "") for run in parents})
    raise SweepNotFound(
        f"no sweep named {ref!r} and no sweep parent run with that id in {tracking_uri}; "
        f"sweeps there: {', '.join(known) or '(none)'}"
    )


def _param(params: Mapping[str, str], key: str) -> Any:
    """A logged param back as a value: params are JSON (numbers, null) except plain strings."""
    text = params.get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def trial_rows(tracking_uri: str, parent: ParentRun) -> list[dict[str, Any]]:
    """One Table-8 row per child run of the sweep (what was trained, as MLflow recorded it).

    Keys: those of `sweeps.report.TABLE_COLUMNS`, the `ARTIFACT_METRICS` (last logged value), `status`, `sweep`,
    `trial` and `run_id`.
    """
    rows = []
    for run in child_runs(tracking_uri, parent):
        params, metrics = run.data.params, run.data.metrics
        row = {
            "frozen_blocks": _param(params, "frozen_blocks"),
            "registers": _param(params, "registers"),
            "trainable_parameters": _param(params, "model_info.trainable_parameters"),
            "lambda": _param(params, "penalty_lambda"),
            "schedule": _param(params, "lambda_schedule"),
            "epochs": _param(params, "epochs"),
            "acc1": metrics.get(ACC1_METRIC),
            "acc5": metrics.get(ACC5_METRIC),
            "status": run.info.status,
            "sweep": parent.sweep,
            "trial": (run.info.run_name or "").removeprefix("train-"),
            "run_id": run.info.run_id,
        }
        row.update({name: metrics.get(name) for name in ARTIFACT_METRICS})
        rows.append(row)
    return rows


def metric_histories(tracking_uri: str, run_id: str, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Every logged point of each metric in `keys` as (step, value), by step; the training loop's step is the
    (0-based) epoch. A metric the run never logged maps to an empty list."""
    client = _client(tracking_uri)
    histories = {}
    for key in keys:
        points = client.get_metric_history(run_id, key)
        latest: dict[int, Any] = {}
        for point in points:  # a step logged twice (a retried call): keep its latest value
            if point.step not in latest or point.timestamp >= latest[point.step].timestamp:
                latest[point.step] = point
        histories[key] = [(step, latest[step].value) for step in sorted(latest)]
    return histories
