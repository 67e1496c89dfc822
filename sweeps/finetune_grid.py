"""The main job: the fine-tune sweep (frozen blocks x lambda x registers x schedule) on Ray Tune + Optuna.

    python sweeps/finetune_grid.py                      # preset `local`: embedded Ray, tiny ViT, generated data
    python sweeps/finetune_grid.py --preset paper --data /mnt/nvme/imagenet --storage s3://bucket/vitreg
    python sweeps/finetune_grid.py --preset paper --data /mnt/nvme/imagenet --dry-run   # cells, parameters, GPU-h
    ray job submit --working-dir . -- python sweeps/finetune_grid.py --preset paper --data ...

Presets (experiments in train/experiments/): local, paper (the study's 32 fine-tunes), schedules (50-epoch lambda
schedules), search (TPE + ASHA); --local runs a preset's local version (the tiny ViT on generated data, embedded
Ray), and `local` is paper's. Rerunning the same command resumes the sweep: finished trials are kept, interrupted ones
continue from their last checkpoint, and MLflow keeps one parent run with one child run per trial. At the end
the Table-8-style table is printed and written (text, CSV) with a figure of accuracy against artifact metrics,
and attached to the MLflow parent run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.grid import make_settings, run_sweep, train_config, validate
from train import cli
from train.config import parse_overrides
from train.data import generated_home, prepare_generated_data, read_class_names
from train.experiments import FINETUNE_SWEEPS, LOCAL, Experiment, MakeExperiment, get_experiment, sweep_names
from train.planted_base import MODEL_FILE as PLANTED_MODEL_FILE
from train.planted_base import prepare_planted_base
from train.tracking import add_mlflow_uri_argument, resolve_tracking_uri


def prepare_local(experiment: Experiment, data: str | None, planted_base: bool) -> tuple[Experiment, str]:
    """Write the generated data set (default: the experiment base's own data directory, shared with
    train/finetune.py --preset tiny) and, for an experiment that starts from the planted-artifact model, that model
    beside it, made part of the experiment's base (so the sweep keeps its plain name)."""
    own = Path(experiment.base["data"]["path"])
    root = Path(data) if data else own
    # Generated images go only to the preset's own folder (or one that holds them already), never into a folder
    # the user named for their data: there the trials read what is there (and the config names what is missing).
    if generated_home(root, own):
        prepare_generated_data(root)
    data = str(root.expanduser().resolve())
    if experiment.planted_base and planted_base and (Path(data) / "train.beton").is_file():
        classes = len(read_class_names(Path(data) / "train.beton"))
        model = prepare_planted_base(own, num_classes=classes)  # a derived file: the preset's folder, not the user's
        planted = {"checkpoint": str(model), "model_kwargs": {}, "pretrained": False}
        experiment = experiment.with_overrides(train_overrides=planted)
    return experiment, data


def _prepare_local_files(experiment: Experiment, data: str | None) -> list[Path]:
    """The files `prepare_local` would write that are not there yet: train.beton, val.beton, then the planted base."""
    own = Path(experiment.base["data"]["path"]).expanduser().resolve()
    root = Path(data).expanduser().resolve() if data else own
    wanted = [root / "train.beton", root / "val.beton"]
    if experiment.planted_base:
        wanted.append(own / PLANTED_MODEL_FILE)
    return [path for path in wanted if not path.exists()]


def experiment_key(preset: str, registry: Mapping[str, MakeExperiment]) -> str:
    """The registry entry `preset` names (`local` is the first one's local version)."""
    return next(iter(registry)) if preset == LOCAL else preset


def main(
    argv: Sequence[str] | None = None,
    registry: Mapping[str, MakeExperiment] = FINETUNE_SWEEPS,
    prefix: str = "finetune",
    default_preset: str = "local",
    description: str = __doc__,
) -> int:
    presets = "\n".join(f"  {name:10s} {get_experiment(name, registry).description}" for name in sweep_names(registry))
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"presets:\n{presets}\n\n{cli.config_fields_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sweep_names(registry), default=default_preset)
    parser.add_argument(
        "--local", action="store_true", help=f"the preset's local version (--preset {LOCAL}: the first preset's)"
    )
    parser.add_argument("--name", help="sweep name (Tune experiment, MLflow parent run); default from the preset")
    parser.add_argument("--storage", help="root of Tune/Train results: path or URI shared by all nodes")
    cli.add_data_argument(
        parser, "data directory of every trial (= --set data.path=DIR; local presets: generated there once)"
    )
    add_mlflow_uri_argument(parser)
    parser.add_argument("--mlflow-experiment", help=f"MLflow experiment (default vitreg-{prefix})")
    parser.add_argument("--num-samples", type=int, help="trials (a grid runs its first N cells)")
    parser.add_argument("--epochs", type=int, help="epochs per trial")
    parser.add_argument("--max-concurrent", type=int, help="trials at a time (default: from the cluster)")
    parser.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else embedded/auto)")
    parser.add_argument("--smoke", action="store_true", help="1 trial of 1 epoch: checks the whole path quickly")
    cli.add_set_argument(parser, "every trial")
    cli.add_dry_run_argument(parser, "the grid (cells, trainable parameters, expected GPU-hours)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    experiment = get_experiment(args.preset, registry, local=args.local)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    num_samples = args.num_samples
    if args.smoke:
        num_samples, overrides = 1, {**overrides, "epochs": 1}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    data = args.data
    if experiment.local and args.dry_run and data is not None and _prepare_local_files(experiment, data)[:2]:
        # A dry run writes no generated set into a folder the user named that does not hold one already.
        print(
            f"dry run: {data} holds no generated data set; none written (validation reads it as it is)", file=sys.stderr
        )
    elif experiment.local:
        written = _prepare_local_files(experiment, data)
        experiment, data = prepare_local(experiment, data, planted_base="checkpoint" not in overrides)
        written = [path for path in written if path.exists()]
        if args.dry_run and written:  # validation reads the data's class list (and the planted base model)
            print(f"dry run: wrote {', '.join(map(str, written))} (validation reads them)", file=sys.stderr)
    try:
        settings = make_settings(
            experiment,
            prefix=prefix,
            name=args.name,
            storage_path=args.storage,
            data=data,
            tracking_uri=resolve_tracking_uri(args.mlflow_uri),
            mlflow_experiment=args.mlflow_experiment,
            num_samples=num_samples,
            train_overrides=overrides,
            max_concurrent=args.max_concurrent,
        )
        if args.dry_run:
            validate(settings)  # every cell's config, before anything else: a bad value names its field and cell
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        estimate = cli.docstring_estimate(registry[experiment_key(args.preset, registry)], experiment.local)
        config_of = partial(train_config, settings)
        print("\n".join(cli.grid_lines(settings.preset, config_of, estimate)))
        return 0
    outcome = run_sweep(settings, address=args.address)
    failed = [t["trial"] for t in outcome.trials if t["status"] != "TERMINATED"]
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(failed)}; rerun the same command to retry them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
