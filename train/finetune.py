"""Fine-tune a pretrained ViT with registers, frozen blocks and the L2-norm penalty: one run on Ray Train.

    python train/finetune.py --data /data/imagenet-ffcv                     # the study's fine-tune (preset)
    python train/finetune.py --data /data/imagenet-ffcv --set registers=0 --set frozen_blocks=8 \\
        --set penalty_lambda=0.1 --set lambda_schedule=harmonic
    python train/finetune.py --preset tiny                                  # tiny ViT, generated data, CPU
    python train/finetune.py --data /data/imagenet-ffcv --set lr=1e-4 --dry-run   # print the config, run nothing

Connects to a running Ray cluster (under `ray job submit`, or RAY_ADDRESS) or starts a local one. Rerunning with
the same --name and --storage resumes the run from its last checkpoint; a finished run is reported, not rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train import cli
from train.config import TrainConfig, merge, parse_overrides
from train.data import generated_home, prepare_generated_data
from train.driver import default_run_name, run_training
from train.experiments import TRAINING_PRESETS, training_values
from train.tracking import add_mlflow_uri_argument


def main(argv: Sequence[str] | None = None, default_preset: str = "finetune", doc: str = __doc__) -> dict[str, Any]:
    """Run (or with --dry-run only validate and print) one training run; returns the run's result, or
    {"dry_run": True, "config": ...} for a dry run. Bad values exit with status 2 and the config's message."""
    parser = argparse.ArgumentParser(
        description=doc, epilog=cli.config_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        default=default_preset,
        choices=sorted(TRAINING_PRESETS),
        help="base configuration (train/experiments/)",
    )
    cli.add_data_argument(parser)
    cli.add_set_argument(parser)
    parser.add_argument("--name", help="run name (default: derived from the config, so reruns resume)")
    parser.add_argument("--storage", default="outputs/runs", help="Ray Train storage path (shared on clusters)")
    parser.add_argument("--mlflow-parent-run-id", help="log as a nested child of this MLflow run")
    add_mlflow_uri_argument(parser)
    cli.add_dry_run_argument(parser, "the resolved config as JSON")
    args = parser.parse_args(argv)

    try:
        overrides = parse_overrides(args.overrides)
        if args.data:  # the flag wins over --set data.path=...
            overrides = merge(overrides, {"data": {"path": args.data}})
        if args.mlflow_uri:  # the flag wins over --set tracking.tracking_uri=...
            overrides = merge(overrides, {"tracking": {"tracking_uri": args.mlflow_uri}})
        if args.preset == "tiny":
            data_path = Path(merge(training_values("tiny"), overrides)["data"]["path"])
            existed = (data_path / "train.beton").is_file() and (data_path / "val.beton").is_file()
            # Generated images go only to the preset's own folder (or one that holds them already), never into
            # a folder the user named for their data; there the config reads what is there.
            if generated_home(data_path, Path(training_values("tiny")["data"]["path"])):
                prepare_generated_data(data_path)
                if args.dry_run and not existed:  # validation reads the data's class list
                    print(
                        f"dry run: wrote the generated data set to {data_path.resolve()} (validation reads it)",
                        file=sys.stderr,
                    )
        config = TrainConfig.from_preset(args.preset, overrides)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        print(config.to_json(), end="")
        return {"dry_run": True, "config": config.to_dict()}
    name = args.name or default_run_name(config, args.preset)
    result = run_training(config, name=name, storage_path=args.storage, mlflow_parent_run_id=args.mlflow_parent_run_id)
    keys = ("name", "path", "checkpoint_path", "mlflow_run_id", "already_finished", "metrics")
    print(json.dumps({key: result.get(key) for key in keys}, indent=2))
    return result


if __name__ == "__main__":
    main()
