"""Probe every finished trial of a sweep, and draw the study's figures of fine-tuned models.

Each finished trial's last checkpoint is probed as itself (its registers and trained head; see analysis/specs.py,
`run:` specs) through the same runner as analysis/run_probes.py, in one MLflow run that records every trial's
training run id. Before that, `finetune/` gets the fine-tuned figures from one tapped pass per trial on the first
`--figure-images` test images: the [CLS] attention map of every block with the [CLS] norm per block (per trial, and
all trials per image), and the last block's [CLS] vs register attention, one column per trial (lambda schedules).

Examples:
    # the local sweep (make sweep-local), probed on its own validation images
    .venv/bin/python analysis/probe_sweep.py <sweep name> --probes norms attention
    # a sweep by its directory, its MLflow parent run id or name, on CIFAR-10, on a GPU cluster
    python analysis/probe_sweep.py /shared/ray_results/schedules --dataset cifar10 --data-root /data \\
        --gpus-per-task 1 --mlflow-uri http://mlflow:5000

SWEEP: the sweep's directory (`<storage>/<sweep>`), its name under --storage, or its MLflow parent run id or name
(the trials' directories then come from their runs' `vitreg.storage` tag). Unfinished trials are listed and left
out. Data: --images/--dataset as in run_probes.py; by default the trials' own validation images
(`<data.path>/val`, when the training data has that image folder).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import ray

from analysis.data import DataError, DataSpec, image_folder
from analysis.finetune_figures import draw_finetune_figures, summarise
from analysis.run_probes import add_bank_arguments, add_image_source_arguments
from analysis.runner import AnalysisConfig, run_analysis
from analysis.runs import RunError, RunModel, Trial, find_trials, run_model
from analysis.specs import spec_of_run
from analysis.tasks import NEEDS_LABELS, NEEDS_MASKS, PROBES, ProbeSettings
from train.tracking import add_mlflow_uri_argument, resolve_tracking_uri, tracking_client

SWEEP_PROBED_TAG = "vitreg.probed_sweep"  # on the probe run: which sweep's trials it probed


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", metavar="SWEEP", help="sweep directory, name, or MLflow parent run id")
    parser.add_argument("--storage", help="where sweeps live (default: $VITREG_STORAGE, else outputs/ray_results)")
    add_mlflow_uri_argument(parser)
    parser.add_argument("--out", help="output folder (default: outputs/probes/<sweep>)")
    parser.add_argument("--probes", nargs="+", help=f"any of: {' '.join(PROBES)} (default: all the data allows)")
    add_image_source_arguments(parser, required=False)  # default: the trials' own validation images
    parser.add_argument("--figure-images", type=int, default=2, help="test images in the fine-tuned figures")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--gpus-per-task", type=float, default=0.0)
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--experiment", default="vitreg-analysis")
    add_bank_arguments(parser)
    return parser.parse_args(argv), parser


def trial_title(config: dict) -> str:
    """What a trial changed, for figure headings: schedule and lambda, registers, frozen blocks, epochs."""
    schedule, penalty = config.get("lambda_schedule"), config.get("penalty_lambda")
    return (
        f"{schedule}, λ(0)={penalty:g}\n{config.get('registers')} reg, {config.get('frozen_blocks')} frozen, "
        f"{config.get('epochs')} ep"
    )


def default_data(trials: Sequence[Trial], runs: Sequence[RunModel]) -> DataSpec:
    """The trials' own validation images: `<data.path>/val` (an image-folder data set) or `<data.path>/images/val`
    (the generated set beside its .beton files, `train.data.prepare_generated_data`)."""
    roots = {str((run.config.get("data") or {}).get("path")) for run in runs}
    if len(roots) == 1:
        root = roots.pop()
        for folder in (Path(root, "val"), Path(root, "images", "val")):
            try:
                image_folder(folder)
                return DataSpec("folder", str(folder))
            except DataError:
                continue
    names = ", ".join(trial.name for trial in trials)
    raise DataError(
        f"trials {names}: no validation image folder <data.path>/val or <data.path>/images/val to default to; "
        "pass --images or --dataset"
    )


def main(argv: Sequence[str] | None = None) -> Path:
    args, parser = parse_args(argv)
    try:
        sweep, trials = find_trials(args.sweep, args.storage, args.mlflow_uri)
        finished = [trial for trial in trials if trial.finished]
        unfinished = [trial.name for trial in trials if not trial.finished]
        if unfinished:
            print(f"left out, not finished: {', '.join(unfinished)}")
        if not finished:
            raise RunError(f"sweep {sweep!r} has no finished trial ({len(trials)} trials)")
        runs = [run_model(trial.run_dir) for trial in finished]
        specs = [spec_of_run(run, label=trial.name) for trial, run in zip(finished, runs, strict=True)]
        if args.images or args.dataset:
            data = DataSpec(
                "folder" if args.images else args.dataset,
                args.images or args.data_root,
                args.train_images,
                args.test_images,
            )
        else:
            data = default_data(finished, runs)
        probes = args.probes or [
            probe
            for probe in PROBES
            if (probe not in NEEDS_LABELS or data.has_labels) and (probe not in NEEDS_MASKS or data.has_masks)
        ]
        out = Path(args.out or Path("outputs", "probes", sweep))
        config = AnalysisConfig(
            models=tuple(specs),
            probes=tuple(probes),
            data=data,
            out_dir=str(out),
            settings=ProbeSettings(batch_size=args.batch_size, figure_images=args.figure_images),
            cpus_per_task=args.cpus_per_task,
            gpus_per_task=args.gpus_per_task,
            experiment=args.experiment,
            run_name=f"probes-{sweep}",
            tracking_uri=args.mlflow_uri,
            shards=args.shards,
            bank_dir=args.bank_dir,
            rebuild_bank=args.rebuild_bank,
        )
    except ValueError as error:  # sweep, run, data and config errors all name what is wrong
        parser.error(str(error))
    print(f"sweep {sweep}: probing {len(specs)} trials ({', '.join(spec.label for spec in specs)}) with {probes}")

    titles = [trial_title(run.config) for run in runs]
    summaries = summarise(specs, titles, data, args.figure_images)
    figures = draw_finetune_figures(summaries, out / "finetune")  # in `out`, so the probe run logs them too
    outcome = run_analysis(config, ray_address=args.ray_address)
    ray.shutdown()
    tracking_client(resolve_tracking_uri(args.mlflow_uri)).set_tag(outcome.run_id, SWEEP_PROBED_TAG, sweep)
    print(f"fine-tuned figures: {', '.join(str(path) for path in figures)}")
    print(f"summary: {outcome.summary}\nMLflow run: {outcome.run_id}")
    if outcome.report.errors:
        print(f"{len(outcome.report.errors)} probe errors; see {outcome.out_dir / 'errors.csv'}")
    return out


if __name__ == "__main__":
    main()
