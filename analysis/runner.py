"""Run the probes as Ray tasks over models x (layer chunk | probe group), then write and log the report.

Fan-out: per model, one `final` task (last-layer probes and removal), one `segmentation` task, and the
per-layer probes split into layer chunks so that the tasks can occupy every worker (`chunks` per model,
default: enough that the layer tasks alone fill the cluster). Each task loads its model once and runs all
its probes from one pass. A failed probe or task becomes an error row; the other results are kept.

Outputs in `out_dir`: one CSV per probe, models.csv, errors.csv (if any), PNG figures, summary.md, config.json;
all logged to one MLflow run in the project's one store (`train.tracking.resolve_tracking_uri`: the config's
`tracking_uri`, else $MLFLOW_TRACKING_URI, else outputs/mlflow.db). A run that probes trained models carries their
training run ids (`train.tracking.training_run_tags`), so the MLflow UI links it to them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import ray
from tqdm import tqdm

from analysis.data import DataSpec
from analysis.report import Report, draw_figures, merge_results, slug, write_tables
from analysis.specs import ModelSpec, model_depth
from analysis.summary import key_metrics, summary_markdown
from analysis.tasks import (
    GROUPS,
    NEEDS_LABELS,
    NEEDS_MASKS,
    PROBE_GROUPS,
    PROBES,
    ProbeSettings,
    ProbeTask,
    TaskResult,
    run_task_in_worker,
)
from train.tracking import ensure_experiment, resolve_tracking_uri, tracking_client, training_run_tags


class AnalysisConfigError(ValueError):
    """An analysis request that cannot run (unknown probe, duplicate model, data lacking what a probe needs)."""


@dataclass(frozen=True)
class AnalysisConfig:
    """One analysis run. Validated on creation, before any model is loaded or Ray is touched.

    Args:
        models: the models to probe (labels must be unique).
        probes: names from `PROBES`.
        data: the dataset (its path is checked here).
        out_dir: where tables, figures and the summary go.
        settings: probe settings shared by all tasks.
        chunks: layer chunks per model (None: enough to use every worker).
        cpus_per_task, gpus_per_task: Ray resources of one task.
        experiment, run_name: MLflow experiment and run (default run name: derived from the request).
        tracking_uri: MLflow store (None: $MLFLOW_TRACKING_URI, else the project's default; see train.tracking).
    """

    models: tuple[ModelSpec, ...]
    probes: tuple[str, ...]
    data: DataSpec
    out_dir: str
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    chunks: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    experiment: str = "vitreg-analysis"
    run_name: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "probes", tuple(dict.fromkeys(self.probes)))
        if not self.models:
            raise AnalysisConfigError("models: give at least one model")
        labels = [spec.label for spec in self.models]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise AnalysisConfigError(f"models: duplicate labels {duplicates}; set `:label=NAME` to tell them apart")
        unknown = [probe for probe in self.probes if probe not in PROBES]
        if unknown or not self.probes:
            raise AnalysisConfigError(f"probes: unknown {unknown or '(none given)'}; allowed: {', '.join(PROBES)}")
        if self.chunks is not None and self.chunks < 1:
            raise AnalysisConfigError(f"chunks={self.chunks}: must be at least 1")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise AnalysisConfigError(
                f"cpus_per_task={self.cpus_per_task}, gpus_per_task={self.gpus_per_task}: need cpus > 0, gpus >= 0"
            )
        self.data.check()
        needs_labels = [probe for probe in self.probes if probe in NEEDS_LABELS]
        if needs_labels and not self.data.has_labels:
            raise AnalysisConfigError(
                f"probes {needs_labels} need image class labels; dataset {self.data.kind!r} at {self.data.root} has "
                "none (use cifar10, generated, or a folder with one sub-folder per class)"
            )
        needs_masks = [probe for probe in self.probes if probe in NEEDS_MASKS]
        if needs_masks and not self.data.has_masks:
            raise AnalysisConfigError(
                f"probes {needs_masks} need segmentation masks; dataset {self.data.kind!r} has none "
                "(use ade20k or generated)"
            )

    @property
    def name(self) -> str:
        """Deterministic run name (no timestamps), so reruns of one request are easy to find."""
        return self.run_name or f"probes-{self.data.kind}-{'+'.join(spec.label for spec in self.models)}"[:240]


@dataclass
class AnalysisOutcome:
    """Where a run's results went."""

    out_dir: Path
    run_id: str
    tables: list[Path]
    figures: list[Path]
    summary: Path
    report: Report


def plan_tasks(config: AnalysisConfig, workers: int) -> list[ProbeTask]:
    """Tasks per model: the layer group in chunks (enough to fill `workers`), then the final and segmentation groups."""
    chunks = config.chunks or max(1, math.ceil(workers / len(config.models)))
    tasks = []
    for spec in config.models:
        for group in GROUPS:
            probes = tuple(probe for probe in config.probes if group in PROBE_GROUPS[probe])
            if not probes:
                continue
            count = 1
            if group == "layers":
                depth = model_depth(spec)
                count = min(chunks, depth) if depth else chunks
            tasks += [ProbeTask(spec, group, probes, config.data, config.settings, c, count) for c in range(count)]
    return tasks


def execute(tasks: list[ProbeTask], cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> list[TaskResult]:
    """Run `tasks` as Ray tasks with a progress bar; a task that crashes becomes error rows for its probes."""
    remote = ray.remote(run_task_in_worker).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)
    threads = max(1, int(cpus_per_task))
    pending = {remote.remote(task, threads): task for task in tasks}
    results = []
    with tqdm(total=len(pending), desc="probe tasks", unit="task") as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                results.append(ray.get(done[0]))
            except Exception as error:  # worker died or result could not be returned
                failed = TaskResult(model=task.model.label, group=task.group, chunk=task.chunk)
                for probe in task.probes:
                    failed.add_error(probe, error)
                results.append(failed)
            progress.set_postfix_str(f"{task.model.label} {task.group} {task.chunk + 1}/{task.chunks}")
            progress.update(1)
    return results


def _workers(cpus_per_task: float, gpus_per_task: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_task > 0:
        return max(1, int(resources.get("GPU", 0) / gpus_per_task))
    return max(1, int(resources.get("CPU", 1) / cpus_per_task))


def tracking_uri(uri: str | None = None) -> str:
    """The store a probe run logs to: the project's one resolution (train.tracking), as train and sweeps use."""
    return resolve_tracking_uri(uri)


def training_runs(config: AnalysisConfig) -> dict[str, str]:
    """Model label -> MLflow training run id, for the models that come from a training run."""
    return {spec.label: spec.training_run_id for spec in config.models if spec.training_run_id}


def _params(config: AnalysisConfig, tasks: list[ProbeTask]) -> dict[str, str]:
    params = {
        "models": ",".join(spec.label for spec in config.models),
        "probes": ",".join(config.probes),
        "tasks": str(len(tasks)),
        "chunks": str(max((task.chunks for task in tasks if task.group == "layers"), default=0)),
        "cpus_per_task": str(config.cpus_per_task),
        "gpus_per_task": str(config.gpus_per_task),
    }
    params |= {f"data.{key}": str(value) for key, value in asdict(config.data).items()}
    params |= {f"settings.{key}": str(value)[:500] for key, value in asdict(config.settings).items()}
    return params


def run_analysis(config: AnalysisConfig, ray_address: str | None = None) -> AnalysisOutcome:
    """Run every probe of `config` on every model via Ray; write the report to `out_dir` and log it to MLflow.

    Args:
        ray_address: cluster to join when Ray is not initialised yet (None: Ray's default, e.g. RAY_ADDRESS).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=ray_address)
    tasks = plan_tasks(config, _workers(config.cpus_per_task, config.gpus_per_task))
    uri = tracking_uri(config.tracking_uri)
    client = tracking_client(uri)
    experiment_id = ensure_experiment(client, uri, config.experiment)
    tags = training_run_tags(client, training_runs(config))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name, tags=tags) as run:
        mlflow.log_params(_params(config, tasks))
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        results = execute(tasks, config.cpus_per_task, config.gpus_per_task)
        report = merge_results(results, list(config.models))
        figure_paths = draw_figures(report, out)
        table_paths = write_tables(report, out)  # after the figures, so figure errors are in errors.csv
        notes = [
            f"Dataset `{config.data.kind}`; probes: {', '.join(config.probes)}; artifacts detected with "
            f"`{config.settings.artifact_method}` (top-percent {config.settings.top_percent:g}%, threshold "
            f"{config.settings.norm_threshold:g}); seeds {list(config.settings.seeds)}; "
            f"MLflow run `{run.info.run_id}`.",
        ]
        summary = out / "summary.md"
        summary.write_text(summary_markdown(report, f"Probe summary: {config.name}", notes))
        mlflow.log_metrics(key_metrics(report))
        for row in report.tables.get("norms", []):  # the per-layer curve of claims 1 and 2
            mlflow.log_metric(f"{slug(row['model'])}.outlier_fraction", row["outlier_fraction"], step=row["layer"])
        mlflow.log_metric("errors", len(report.errors))
        mlflow.log_artifacts(str(out))
    return AnalysisOutcome(out, run.info.run_id, table_paths, figure_paths, summary, report)
