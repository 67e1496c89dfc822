"""Units of work on one model: the bank's shards (one backbone pass per image) and the probe jobs that read it.

- `plan_bank`: is the model's bank in its directory reusable for this run, and if not, what to build;
- `ShardJob` (analysis/bank.py): one shard of the pass, written to disk;
- `ProbeJob`: one probe computation on a sealed bank: `layer` (norms, local information of one layer), `final`
  (the last layer's probes), `removal` (its edited pass), `progression` (the attention-progression figure, a
  pass over the figure images), `segmentation` (the heads on the bank's features).
`run_task` runs a whole `ProbeTask` in this process from a bank of its own (a temporary one unless given).
A probe that fails becomes an error row and the others still report. Nothing here knows Ray.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.bank import (
    Bank,
    BankContents,
    BankError,
    ShardJob,
    bank_status,
    clear_bank,
    precision_of,
    write_manifest,
    write_shard,
)
from analysis.bank_key import bank_key, key_hash
from analysis.data import DataSpec, open_splits
from analysis.model_passes import open_context, run_progression, run_removal, run_segmentation
from analysis.probe_settings import (
    GROUPS,
    NEEDS_LABELS,
    NEEDS_MASKS,
    PROBE_GROUPS,
    PROBES,
    REMOVAL_FIRST_OUTLIER,
    ProbeSettings,
    ProbeTask,
    TaskResult,
)
from analysis.probe_tasks import FINAL_PROBES, LAYER_PROBES, run_final, run_layer
from analysis.specs import ModelSpec

__all__ = [
    "GROUPS",
    "JOB_PROBES",
    "NEEDS_LABELS",
    "NEEDS_MASKS",
    "PROBES",
    "PROBE_GROUPS",
    "REMOVAL_FIRST_OUTLIER",
    "BankPlan",
    "ProbeJob",
    "ProbeSettings",
    "ProbeTask",
    "TaskResult",
    "plan_bank",
    "probe_jobs",
    "run_job",
    "run_task",
]

# The run's probes each kind of job computes.
JOB_PROBES: dict[str, tuple[str, ...]] = {
    "layer": LAYER_PROBES,
    "final": FINAL_PROBES,
    "removal": ("removal",),
    "progression": ("attention",),
    "segmentation": ("segmentation",),
}


@dataclass(frozen=True)
class BankPlan:
    """The bank of one model for one run: where, for which pass (`key`), with what, and whether to build it."""

    model: ModelSpec
    directory: str
    key: dict
    contents: BankContents
    build: str | None  # why it must be built; None: reuse it
    shards: int

    def shard_jobs(self, data: DataSpec, settings: ProbeSettings) -> list[ShardJob]:
        key = key_hash(self.key)
        return [
            ShardJob(self.model, data, settings, self.contents, self.directory, shard, self.shards, key)
            for shard in range(self.shards)
        ]


def plan_bank(
    spec: ModelSpec,
    data: DataSpec,
    settings: ProbeSettings,
    probe_names: tuple[str, ...],
    directory: str | Path,
    precision: str,
    shards: int = 1,
    rebuild: bool = False,
) -> BankPlan:
    """Decide whether the bank in `directory` serves this run; a bank built for the same pass with other contents
    is rebuilt with both (so alternating probe sets does not rebuild every time)."""
    train, test, protocol = open_splits(data, spec.name)
    key = bank_key(spec, train, test, settings.img_size or protocol.img_size, settings, precision)
    contents = BankContents.for_probes(probe_names)
    why = "asked to rebuild" if rebuild else bank_status(directory, key, contents)
    if why and why.startswith("the bank lacks"):
        contents = contents.union(Bank(directory).contents)
    test_batches = math.ceil(len(test.indices) / settings.batch_size)
    return BankPlan(spec, str(directory), key, contents, why, max(1, min(shards, test_batches)))


@dataclass(frozen=True)
class ProbeJob:
    """One probe job on `model`'s sealed bank (`bank`, built for the pass `key`). `probes` are the run's probes:
    the job computes those of its kind, and the others decide which images it covers (see analysis/probe_tasks.py).
    """

    model: ModelSpec
    kind: str
    probes: tuple[str, ...]
    data: DataSpec
    settings: ProbeSettings
    bank: str
    key: str
    layer: int = 0

    @property
    def own_probes(self) -> tuple[str, ...]:
        return tuple(probe for probe in self.probes if probe in JOB_PROBES[self.kind])

    @property
    def needs_model(self) -> bool:
        return self.kind in ("removal", "progression", "segmentation")


def probe_jobs(plan: BankPlan, depth: int, probe_names: tuple[str, ...], data: DataSpec, settings: ProbeSettings):
    """Every job of one model: one per layer, then final, removal, progression and segmentation as asked."""
    key = key_hash(plan.key)
    job = lambda kind, layer=0: ProbeJob(plan.model, kind, probe_names, data, settings, plan.directory, key, layer)
    wanted = set(probe_names)
    jobs = [job("layer", layer) for layer in range(depth)] if wanted & set(LAYER_PROBES) else []
    jobs += [
        job(kind) for kind in ("final", "removal", "progression", "segmentation") if wanted & set(JOB_PROBES[kind])
    ]
    return jobs


def run_job(job: ProbeJob) -> TaskResult:
    """Run one probe job; never raises (errors are in the result)."""
    start = time.perf_counter()
    result = TaskResult(model=job.model.label, group=job.kind, chunk=job.layer)
    bank = None
    try:
        bank = Bank(job.bank)
        if bank.manifest["key_hash"] != job.key:
            raise BankError(f"bank {job.bank} was rebuilt for another pass while this job waited")
        result.info = dict(bank.info)
        if job.kind == "layer":
            run_layer(bank, job.layer, job.probes, job.settings, result)
        elif job.kind == "final":
            run_final(bank, job.probes, job.settings, job.data, result)
        else:
            ctx = open_context(job.model, job.data, job.settings)
            runner = {"removal": run_removal, "progression": run_progression}.get(job.kind)
            if runner is not None:
                runner(ctx, bank, job.probes, result)
            else:
                result.guard("segmentation", lambda: run_segmentation(ctx, bank, result))
    except Exception as error:  # the bank or the model could not be read: every probe of the job reports it
        fail(result, job.own_probes, error)
    finally:
        if bank is not None:
            bank.close()
    result.seconds = time.perf_counter() - start
    return result


def fail(result: TaskResult, probe_names: tuple[str, ...], error: BaseException | str) -> None:
    """An error row for each of `probe_names` that has neither a table nor an error yet."""
    failed = {row["probe"] for row in result.errors}
    for probe in probe_names:
        if probe not in result.tables and probe not in failed:
            result.add_error(probe, error)


def build_bank(plan: BankPlan, data: DataSpec, settings: ProbeSettings) -> dict:
    """Build `plan`'s bank in this process (one shard after another); returns the manifest."""
    clear_bank(plan.directory)
    reports = [write_shard(job) for job in plan.shard_jobs(data, settings)]
    return write_manifest(plan.directory, plan.key, plan.contents, reports)


def merge_into(result: TaskResult, part: TaskResult) -> None:
    """Add a job's rows, figures, errors and passes to a task's result (per-layer figures concatenated)."""
    result.info = result.info or part.info
    for probe, rows in part.tables.items():
        result.tables.setdefault(probe, []).extend(rows)
    for kind, data in part.figures.items():
        if kind == "norm_layers" and kind in result.figures:
            merged = result.figures[kind]
            merged["layers"] = merged["layers"] + data["layers"]
            merged["counts"] = np.concatenate([merged["counts"], data["counts"]])
        else:
            result.figures[kind] = data
    result.errors.extend({**error, "group": result.group, "chunk": result.chunk} for error in part.errors)
    for kind, count in part.passes.items():
        result.passes[kind] = result.passes.get(kind, 0) + count


def run_task(task: ProbeTask, bank_dir: str | Path | None = None) -> TaskResult:
    """Run `task` in this process: build (or reuse) its model's bank, then its group's jobs; never raises.

    Args:
        bank_dir: the model's bank directory (None: a temporary one, gone afterwards).
    """
    start = time.perf_counter()
    result = TaskResult(model=task.model.label, group=task.group, chunk=task.chunk)
    with tempfile.TemporaryDirectory(prefix="vitreg-bank-") as scratch:
        directory = str(bank_dir or scratch)
        try:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            plan = plan_bank(task.model, task.data, task.settings, task.probes, directory, precision_of(device))
            if plan.build:
                manifest = build_bank(plan, task.data, task.settings)
                result.passes["bank"] = sum(manifest["backbone_passes"].values())
            depth = Bank(directory).depth
        except Exception as error:  # the model or the pass failed: every probe of the task reports it
            fail(result, task.probes, error)
            result.seconds = time.perf_counter() - start
            return result
        jobs = [
            job for job in probe_jobs(plan, depth, task.probes, task.data, task.settings) if _in_task(job, task, depth)
        ]
        for job in jobs:
            merge_into(result, run_job(job))
    result.seconds = time.perf_counter() - start
    return result


def _in_task(job: ProbeJob, task: ProbeTask, depth: int) -> bool:
    """Whether `job` belongs to the group (and layer chunk) of `task`."""
    if job.kind in ("layer", "progression"):
        chunk = np.array_split(np.arange(depth), task.chunks)[task.chunk].tolist()
        return task.group == "layers" and (job.kind == "progression" or job.layer in chunk)
    if job.kind in ("final", "removal"):
        return task.group == "final"
    return task.group == "segmentation"


def run_shard_in_worker(job: ShardJob, threads: int) -> dict:
    """`write_shard` in a Ray worker (here, not in the runner, so workers never import MLflow or matplotlib); a
    failure comes back as `{"shard": ..., "error": text}`, naming what went wrong without Ray's wrapping."""
    torch.set_num_threads(threads)  # as many as the task's CPUs, so tasks on one node do not oversubscribe
    try:
        return write_shard(job)
    except Exception as error:
        return {"shard": job.shard, "error": f"{type(error).__name__}: {error}"}


def run_job_in_worker(job: ProbeJob, threads: int) -> TaskResult:
    """`run_job` in a Ray worker."""
    torch.set_num_threads(threads)
    return run_job(job)
