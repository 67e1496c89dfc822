"""Benchmark: the probes' feature bank (one backbone pass per image, then probe tasks on the bank) against the
per-chunk design it replaced (every task loads the model and runs its own full pass), on 1 and 2 Ray workers.

The per-chunk design is rebuilt faithfully from its cost model: per model, `chunks` layer tasks (default: enough to
fill the workers, as before) plus one `final` task (with removal's edited pass) and one `segmentation` task, each a
Ray task that loads the model and forwards every image its probes read (`analysis.tasks.run_task` on a ProbeTask
of that group, with a private bank). Each chunk task samples tokens at every layer where the old one sampled only
its chunk's, so its cost is, if anything, slightly over-counted. The bank design is the runner's own execution
(`analysis.runner.plan_banks` + `execute`, no MLflow), first building the bank, then rerun with other probe
settings (seeds, detection) on the bank it left.

Printed per worker count: backbone passes per image per model (`passes/image`; removal's edited pass per image
and the progression figure's pass, in images, counted apart), wall time of each design (fastest of `--repeats`,
the designs alternating, on workers warmed up first) and its ratio to the bank design's first (building) run.

    .venv/bin/python benchmarks/bench_probes.py [--workers 1 2] [--model SPEC] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray binds to 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch
from output import write_json  # this folder (the script's own directory is on sys.path)

from analysis.data import DataSpec
from analysis.runner import AnalysisConfig, execute, plan_banks
from analysis.segmentation import HeadSettings
from analysis.specs import model_depth, parse_model_spec
from analysis.tasks import GROUPS, PROBE_GROUPS, PROBES, ProbeSettings, ProbeTask, TaskResult, run_task

PASS_KINDS = ("bank", "removal", "figure")
MODEL_TEXT: list[str] = []  # the model spec as given, for the warm-up tasks


def per_chunk_task(task: ProbeTask, threads: int) -> TaskResult:
    """One task of the old design: load the model, forward the images its group reads, run its probes."""
    torch.set_num_threads(threads)
    return run_task(task)


def run_per_chunk(config: AnalysisConfig, workers: int, chunks: int | None) -> tuple[float, dict[str, int]]:
    """The old fan-out: per model `chunks` layer tasks, a final task and a segmentation task, all at once."""
    chunks = chunks or max(1, math.ceil(workers / len(config.models)))
    tasks = []
    for spec in config.models:
        for group in GROUPS:
            probe_names = tuple(probe for probe in config.probes if group in PROBE_GROUPS[probe])
            if probe_names:
                count = min(chunks, model_depth(spec) or chunks) if group == "layers" else 1
                tasks += [
                    ProbeTask(spec, group, probe_names, config.data, config.settings, c, count) for c in range(count)
                ]
    remote = ray.remote(per_chunk_task).options(num_cpus=1, max_retries=0)
    start = time.perf_counter()
    results = ray.get([remote.remote(task, 1) for task in tasks])
    seconds = time.perf_counter() - start
    errors = [error for result in results for error in result.errors]
    if errors:
        raise RuntimeError(f"per-chunk design: {errors[:3]}")
    return seconds, {kind: sum(result.passes.get(kind, 0) for result in results) for kind in PASS_KINDS}


def run_bank(config: AnalysisConfig, workers: int) -> tuple[float, dict[str, int]]:
    """The runner's two phases (bank shards, then probe tasks on the bank)."""
    start = time.perf_counter()
    plans, failed = plan_banks(config, workers)
    results, banks = execute(config, plans)
    seconds = time.perf_counter() - start
    errors = [error for result in failed + results for error in result.errors]
    if errors:
        raise RuntimeError(f"bank design: {errors[:3]}")
    names = {"bank": "backbone_passes", "removal": "removal_passes", "figure": "figure_passes"}
    return seconds, {kind: sum(row.get(names[kind], 0) for row in banks) for kind in PASS_KINDS}


def warm_up(spec_text: str) -> None:
    """Import the probe code and build the model once in a worker, so no design pays Ray's cold start."""
    from analysis.specs import load_model

    load_model(parse_model_spec(spec_text))


def measure(
    workers: int, config: AnalysisConfig, chunks: int | None, repeats: int
) -> dict[str, tuple[float, dict[str, int]]]:
    """Each design `repeats` times, alternating, on warm workers; the fastest wall time of each."""
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    rows: dict[str, tuple[float, dict[str, int]]] = {}
    keep = lambda name, measured: rows.__setitem__(name, min(rows.get(name, measured), measured, key=lambda r: r[0]))
    try:
        warm = ray.remote(warm_up).options(num_cpus=1)
        ray.get([warm.remote(MODEL_TEXT[0]) for _ in range(2 * workers)])
        for repeat in range(repeats):
            banks = Path(config.out_dir, f"bank-{repeat}")  # a new bank each time: built, not reused
            fresh = dataclasses.replace(config, bank_dir=str(banks))
            keep("per-chunk", run_per_chunk(config, workers, chunks))
            keep("bank", run_bank(fresh, workers))
            other = dataclasses.replace(config.settings, seeds=(1,), top_percent=2.0, artifact_method="top_percent")
            keep("bank, rerun", run_bank(dataclasses.replace(fresh, settings=other), workers))  # the bank is reused
    finally:
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224:random:img_size=224:registers=2")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each design (the fastest is shown)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, help="layer chunks of the per-chunk design (default: fill the workers)")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=32)
    parser.add_argument("--probes", nargs="+", default=list(PROBES))
    parser.add_argument("--json", metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    MODEL_TEXT[:] = [args.model]
    settings = ProbeSettings(
        batch_size=8, seeds=(0,), max_iter=100, seg_head=HeadSettings(epochs=1), seg_block=HeadSettings(epochs=1)
    )
    images = args.train_images + args.test_images
    print(
        f"model {args.model}, {args.train_images} + {args.test_images} generated images, probes {' '.join(args.probes)}"
    )
    measured = []
    header = ("workers", "design", "passes/image", "removal", "figure", "seconds", "vs bank")
    print("{:>7}  {:<12} {:>12} {:>8} {:>7} {:>8} {:>8}".format(*header))
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="bench-probes-") as out:
            config = AnalysisConfig(
                models=(parse_model_spec(args.model),),
                probes=tuple(args.probes),
                data=DataSpec("generated", train_images=args.train_images, test_images=args.test_images),
                out_dir=out,
                settings=settings,
            )
            rows = measure(workers, config, args.chunks, args.repeats)
        bank_seconds = rows["bank"][0]
        for design, (seconds, passes) in rows.items():
            measured.append({"workers": workers, "design": design, "seconds": seconds, "images": images, **passes})
            print(
                f"{workers:>7}  {design:<12} {passes['bank'] / images:>12.2f} {passes['removal'] / images:>8.2f} "
                f"{passes['figure']:>7} {seconds:>8.1f} {seconds / bank_seconds:>7.2f}x"
            )
    write_json(args.json, {"model": args.model, "probes": args.probes, "rows": measured})


if __name__ == "__main__":
    main()
