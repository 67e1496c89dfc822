"""Run the probes as Ray tasks in two phases, then write and log the report.

1. The bank: per model, Ray tasks over image shards run the backbone once per image and write what every probe
   reads into the model's feature bank (`<bank_dir>/<model slug>/`, default `<out_dir>/bank`; analysis/bank.py).
   A bank whose pass settings and contents cover the run is reused (nothing is forwarded); otherwise it is
   rebuilt. `shards` per model default to enough that the bank tasks fill the cluster.
2. The probes: as soon as a model's bank is sealed, one Ray task per layer (norms, local information), one for the
   last layer's probes, and, needing the model again, removal (its edited pass), the attention-progression figure
   (a pass over the figure images) and segmentation (heads on the bank's features). A failed probe or task becomes
   an error row; the other results are kept.

Outputs in `out_dir`: one CSV per probe, models.csv, bank.csv (per model: bank built or reused and why, images
forwarded per kind of pass), errors.csv (if any), PNG figures, summary.md, config.json; all logged to one MLflow run
in the project's one store (`train.tracking.resolve_tracking_uri`: the config's `tracking_uri`, else
$MLFLOW_TRACKING_URI, else outputs/mlflow.db). A run that probes trained models carries their training run ids
(`train.tracking.training_run_tags`), so the MLflow UI links it to them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import ray
from tqdm import tqdm

from analysis.bank import Bank, clear_bank, write_manifest
from analysis.data import DataSpec
from analysis.report import Report, draw_figures, merge_results, slug, write_csv, write_tables
from analysis.specs import ModelSpec
from analysis.summary import key_metrics, summary_markdown
from analysis.tasks import (
    NEEDS_LABELS,
    NEEDS_MASKS,
    PROBES,
    BankPlan,
    ProbeSettings,
    TaskResult,
    plan_bank,
    probe_jobs,
    run_job_in_worker,
    run_shard_in_worker,
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
        shards: bank tasks (image shards) per model (None: enough to use every worker).
        cpus_per_task, gpus_per_task: Ray resources of one task (the per-layer and last-layer probe tasks, which
            never run the model, take no GPU).
        experiment, run_name: MLflow experiment and run (default run name: derived from the request).
        tracking_uri: MLflow store (None: $MLFLOW_TRACKING_URI, else the project's default; see train.tracking).
        bank_dir: where the models' feature banks live (None: `<out_dir>/bank`); on a multi-node cluster, a
            folder every node can read and write.
        rebuild_bank: rebuild every model's bank even when it could be reused.
    """

    models: tuple[ModelSpec, ...]
    probes: tuple[str, ...]
    data: DataSpec
    out_dir: str
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    shards: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    experiment: str = "vitreg-analysis"
    run_name: str | None = None
    tracking_uri: str | None = None
    bank_dir: str | None = None
    rebuild_bank: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "probes", tuple(dict.fromkeys(self.probes)))
        if not self.models:
            raise AnalysisConfigError("models: give at least one model")
        labels = [spec.label for spec in self.models]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise AnalysisConfigError(f"models: duplicate labels {duplicates}; set `:label=NAME` to tell them apart")
        slugs = [slug(label) for label in labels]
        clashes = sorted({label for label, name in zip(labels, slugs, strict=True) if slugs.count(name) > 1})
        if clashes:
            raise AnalysisConfigError(f"models: labels {clashes} share a bank folder name; set distinct `:label=NAME`")
        unknown = [probe for probe in self.probes if probe not in PROBES]
        if unknown or not self.probes:
            raise AnalysisConfigError(f"probes: unknown {unknown or '(none given)'}; allowed: {', '.join(PROBES)}")
        if self.shards is not None and self.shards < 1:
            raise AnalysisConfigError(f"shards={self.shards}: must be at least 1")
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

    @property
    def banks(self) -> Path:
        return Path(self.bank_dir) if self.bank_dir else Path(self.out_dir, "bank")

    @property
    def precision(self) -> str:
        """How the bank tasks compute: on a GPU when they get one (see analysis.bank.precision_of)."""
        return "bfloat16-autocast" if self.gpus_per_task > 0 else "float32"


@dataclass
class AnalysisOutcome:
    """Where a run's results went."""

    out_dir: Path
    run_id: str
    tables: list[Path]
    figures: list[Path]
    summary: Path
    report: Report
    banks: list[dict] = field(default_factory=list)  # per model: the bank and the images forwarded (bank.csv)


def plan_banks(config: AnalysisConfig, workers: int) -> tuple[list[BankPlan], list[TaskResult]]:
    """Each model's bank (reuse or build, in enough shards to fill `workers`); a model whose bank cannot even be
    planned (its data or checkpoint unreadable) gets error rows instead."""
    shards = config.shards or max(1, math.ceil(workers / len(config.models)))
    plans, failed = [], []
    for spec in config.models:
        directory = config.banks / slug(spec.label)
        try:
            plans.append(
                plan_bank(
                    spec,
                    config.data,
                    config.settings,
                    config.probes,
                    directory,
                    config.precision,
                    shards,
                    config.rebuild_bank,
                )
            )
        except Exception as error:
            failed.append(_failed(spec.label, config.probes, f"{type(error).__name__}: {error}"))
    return plans, failed


def _failed(model: str, probe_names: tuple[str, ...], error: str) -> TaskResult:
    result = TaskResult(model=model, group="bank", chunk=0)
    for probe in probe_names:
        result.add_error(probe, error)
    return result


class _Execution:
    """Phase 1 and 2 as one loop over Ray's finished tasks: a model's probe jobs start when its bank is sealed."""

    def __init__(self, config: AnalysisConfig) -> None:
        self.config = config
        threads = max(1, int(config.cpus_per_task))
        options = {"num_cpus": config.cpus_per_task, "max_retries": 0}
        self.shard_task = ray.remote(run_shard_in_worker).options(num_gpus=config.gpus_per_task, **options)
        self.model_job = ray.remote(run_job_in_worker).options(num_gpus=config.gpus_per_task, **options)
        self.array_job = ray.remote(run_job_in_worker).options(num_gpus=0, **options)
        self.threads = threads
        self.pending: dict = {}
        self.reports: dict[str, list[dict]] = {}
        self.results: list[TaskResult] = []
        self.banks: dict[str, dict] = {}
        self.progress = tqdm(total=0, desc="probe tasks", unit="task")

    def _submit(self, ref, what: tuple) -> None:
        self.pending[ref] = what
        self.progress.total += 1
        self.progress.refresh()

    def start(self, plan: BankPlan) -> None:
        label = plan.model.label
        self.banks[label] = {"model": label, "bank": plan.directory, "status": "built" if plan.build else "reused"}
        self.banks[label]["reason"] = plan.build or "same pass settings, contents cover the run"
        if plan.build:
            clear_bank(plan.directory)
            self.reports[label] = []
            for job in plan.shard_jobs(self.config.data, self.config.settings):
                self._submit(self.shard_task.remote(job, self.threads), ("shard", plan))
        else:
            self._start_jobs(plan)

    def _fail_model(self, label: str, error: str) -> None:
        """The model's bank could not be built or read: an error row for each of its probes."""
        self.banks[label] |= {"status": "failed", "reason": error}
        self.results.append(_failed(label, self.config.probes, error))

    def _start_jobs(self, plan: BankPlan) -> None:
        try:
            bank = Bank(plan.directory)
        except Exception as error:
            self._fail_model(plan.model.label, f"{type(error).__name__}: {error}")
            return
        self.banks[plan.model.label] |= {"images": sum(bank.manifest["backbone_passes"].values())}
        for job in probe_jobs(plan, bank.depth, self.config.probes, self.config.data, self.config.settings):
            remote = self.model_job if job.needs_model else self.array_job
            self._submit(remote.remote(job, self.threads), ("job", job))

    def _shard_done(self, plan: BankPlan, report: dict) -> None:
        label = plan.model.label
        if label not in self.reports:  # an earlier shard failed: the model already has its error rows
            return
        if "error" in report:
            del self.reports[label]
            self._fail_model(label, report["error"])
            return
        self.reports[label].append(report)
        if len(self.reports[label]) == plan.shards:
            try:
                manifest = write_manifest(plan.directory, plan.key, plan.contents, self.reports.pop(label))
            except Exception as error:  # e.g. shards that ran in another precision than asked
                self._fail_model(label, f"{type(error).__name__}: {error}")
                return
            self.banks[label]["backbone_passes"] = sum(manifest["backbone_passes"].values())
            self._start_jobs(plan)

    def run(self) -> list[TaskResult]:
        with self.progress:
            while self.pending:
                (ref,), _ = ray.wait(list(self.pending), num_returns=1)
                kind, item = self.pending.pop(ref)
                try:
                    value = ray.get(ref)
                except Exception as error:  # the worker died or its result could not be returned
                    value = {"shard": -1, "error": f"{type(error).__name__}: {error}"}
                    if kind == "job":
                        value = _failed(item.model.label, item.own_probes, value["error"])
                if kind == "shard":
                    self._shard_done(item, value)
                else:
                    self.results.append(value)
                    for pass_kind, count in value.passes.items():
                        counts = self.banks[item.model.label]
                        counts[f"{pass_kind}_passes"] = counts.get(f"{pass_kind}_passes", 0) + count
                self.progress.set_postfix_str(f"{item.model.label} {kind}")
                self.progress.update(1)
        return self.results


def execute(config: AnalysisConfig, plans: list[BankPlan]) -> tuple[list[TaskResult], list[dict]]:
    """Build or reuse every bank, run every probe job; returns the results and one row per model's bank."""
    execution = _Execution(config)
    for plan in plans:
        execution.start(plan)
    results = execution.run()
    return results, list(execution.banks.values())


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


def _params(config: AnalysisConfig, plans: list[BankPlan]) -> dict[str, str]:
    params = {
        "models": ",".join(spec.label for spec in config.models),
        "probes": ",".join(config.probes),
        "shards": str(max((plan.shards for plan in plans), default=0)),
        "bank_dir": str(config.banks),
        "rebuild_bank": str(config.rebuild_bank),
        "cpus_per_task": str(config.cpus_per_task),
        "gpus_per_task": str(config.gpus_per_task),
    }
    params |= {f"data.{key}": str(value) for key, value in asdict(config.data).items()}
    params |= {f"settings.{key}": str(value)[:500] for key, value in asdict(config.settings).items()}
    return params


def _log_outputs(out: Path, banks: Path) -> None:
    """Log everything in `out` to the run but the feature banks (large, and kept on disk for reruns)."""
    for path in sorted(out.iterdir()):
        if path.resolve() == banks.resolve():
            continue
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        else:
            mlflow.log_artifact(str(path))


def run_analysis(config: AnalysisConfig, ray_address: str | None = None) -> AnalysisOutcome:
    """Run every probe of `config` on every model via Ray; write the report to `out_dir` and log it to MLflow.

    Args:
        ray_address: cluster to join when Ray is not initialised yet (None: Ray's default, e.g. RAY_ADDRESS).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=ray_address)
    plans, failed = plan_banks(config, _workers(config.cpus_per_task, config.gpus_per_task))
    uri = tracking_uri(config.tracking_uri)
    client = tracking_client(uri)
    experiment_id = ensure_experiment(client, uri, config.experiment)
    tags = training_run_tags(client, training_runs(config))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name, tags=tags) as run:
        mlflow.log_params(_params(config, plans))
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
        results, banks = execute(config, plans)
        report = merge_results(failed + results, list(config.models))
        figure_paths = draw_figures(report, out)
        table_paths = write_tables(report, out)  # after the figures, so figure errors are in errors.csv
        if banks:
            table_paths.append(write_csv(banks, out / "bank.csv"))
        notes = [
            f"Dataset `{config.data.kind}`; probes: {', '.join(config.probes)}; artifacts detected with "
            f"`{config.settings.artifact_method}` (top-percent {config.settings.top_percent:g}%, threshold "
            f"{config.settings.norm_threshold:g}); seeds {list(config.settings.seeds)}; "
            f"MLflow run `{run.info.run_id}`.",
            "Feature banks: "
            + "; ".join(f"`{row['model']}` {row['status']} ({row['reason']})" for row in banks)
            + f", in `{config.banks}`.",
        ]
        summary = out / "summary.md"
        summary.write_text(summary_markdown(report, f"Probe summary: {config.name}", notes))
        mlflow.log_metrics(key_metrics(report))
        for row in report.tables.get("norms", []):  # the per-layer curve of claims 1 and 2
            mlflow.log_metric(f"{slug(row['model'])}.outlier_fraction", row["outlier_fraction"], step=row["layer"])
        for row in banks:
            for name in ("backbone_passes", "removal_passes", "figure_passes"):
                if name in row:
                    mlflow.log_metric(f"{slug(row['model'])}.{name}", row[name])
        mlflow.log_metric("errors", len(report.errors))
        _log_outputs(out, config.banks)
    return AnalysisOutcome(out, run.info.run_id, table_paths, figure_paths, summary, report, banks)
