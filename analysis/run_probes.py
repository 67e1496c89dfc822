"""Run the study's probes on models x layers as Ray tasks; write tables, figures and a summary; log to MLflow.

Examples:
    # here (CPU, no weights): two tiny random models and the planted-artifact model on generated images
    .venv/bin/python analysis/run_probes.py --dataset generated --out outputs/probes \\
        --models planted vit_tiny_patch16_224:random:img_size=64 vit_tiny_patch16_224:random:img_size=64:registers=4
    # a GPU cluster: DINOv2-L with and without registers on CIFAR-10 (study sizes: 800/200 images at 196 px)
    python analysis/run_probes.py --dataset cifar10 --data-root /data --gpus-per-task 1 --out outputs/dinov2 \\
        --models vit_large_patch14_dinov2.lvd142m vit_large_patch14_reg4_dinov2.lvd142m

Each model's backbone runs once per image, into a feature bank (OUT/bank/<model>, or --bank-dir); the probes read
the bank, and a rerun with other probe settings (seeds, detection, thresholds, ...) reuses it. Only removal's edited
pass and the attention-progression figure's pass over the figure images forward images again.

Model specs: NAME[=CHECKPOINT][:random][:img_size=N][:registers=N][:label=TEXT]; `planted` is the planted model;
a trained model: run:RUN_DIR[@epoch_NNNN][:img_size=N][:label=TEXT] or mlflow:RUN_ID[@...] (see analysis/specs.py).
"""

from __future__ import annotations

import argparse

import ray

from analysis.data import DataSpec
from analysis.runner import AnalysisConfig, run_analysis
from analysis.segmentation import HeadSettings
from analysis.specs import parse_model_spec
from analysis.tasks import PROBES, REMOVAL_FIRST_OUTLIER, ProbeSettings
from train.tracking import add_mlflow_uri_argument


def add_image_source_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """Which images the probes read (--images or --dataset, --data, --train-images, --test-images); the same flags
    in run_probes.py and probe_sweep.py."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--images", help="a folder of images (labelled by sub-folder, if it has them)")
    source.add_argument("--dataset", choices=["cifar10", "ade20k", "generated"])
    parser.add_argument(
        "--data",
        "--data-root",
        dest="data_root",
        metavar="DIR",
        help="folder holding cifar-10-batches-py or ADEChallengeData2016 (--data-root: the same)",
    )
    parser.add_argument("--train-images", type=int, help="training images (default: the study's)")
    parser.add_argument("--test-images", type=int, help="test images (default: the study's)")


def add_bank_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the feature banks live and how they are built (--bank-dir, --rebuild-bank, --shards)."""
    parser.add_argument(
        "--bank-dir",
        metavar="DIR",
        help="feature banks, one folder per model (default: OUT/bank); a rerun with the same pass settings reuses "
        "a model's bank, other probe settings included (a folder every node reads on a multi-node cluster)",
    )
    parser.add_argument("--rebuild-bank", action="store_true", help="rebuild the banks even where they can be reused")
    parser.add_argument(
        "--shards",
        "--chunks",
        dest="shards",
        type=int,
        help="bank tasks (image shards) per model (default: fill every worker; --chunks: the same, older name)",
    )


def parse_args() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model specs (see above)")
    parser.add_argument("--probes", nargs="+", default=list(PROBES), help=f"any of: {' '.join(PROBES)} (default: all)")
    add_image_source_arguments(parser, required=True)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--img-size", type=int, help="resolution for every model (default: the study's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--artifact-method", default="auto", choices=["auto", "top_percent", "threshold"])
    parser.add_argument("--norm-threshold", type=float, default=100.0)
    parser.add_argument("--top-percent", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 999])
    removal = parser.add_mutually_exclusive_group()
    removal.add_argument(
        "--removal-layers",
        type=int,
        nargs="+",
        default=[],
        metavar="BLOCK",
        help="blocks to remove artifacts at, e.g. 6 7 8 (negative: from the end; never the last block)",
    )
    removal.add_argument(
        "--removal-from",
        default=REMOVAL_FIRST_OUTLIER,
        metavar=f"{{{REMOVAL_FIRST_OUTLIER},BLOCK}}",
        help="remove at this block and every later one but the last (default: the first block with outliers "
        "found by the norms probe of that model, on the test images, as the study; the middle block if none)",
    )
    parser.add_argument("--seg-epochs", type=int, default=20, help="linear segmentation head epochs")
    parser.add_argument("--seg-block-epochs", type=int, default=50, help="last block + registers epochs")
    parser.add_argument("--seg-registers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument(
        "--seg-lrs", type=float, nargs="+", default=[],
        help="head learning rates tried for every segmentation variant, all trained together (default: one)",
    )  # fmt: skip
    add_bank_arguments(parser)
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--gpus-per-task", type=float, default=0.0)
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--experiment", default="vitreg-analysis")
    parser.add_argument("--run-name")
    add_mlflow_uri_argument(parser)
    return parser.parse_args(), parser


def main() -> None:
    args, parser = parse_args()
    try:
        settings = ProbeSettings(
            batch_size=args.batch_size,
            img_size=args.img_size,
            artifact_method=args.artifact_method,
            norm_threshold=args.norm_threshold,
            top_percent=args.top_percent,
            seeds=tuple(args.seeds),
            removal_layers=tuple(args.removal_layers),
            removal_from=args.removal_from,
            seg_head=HeadSettings(epochs=args.seg_epochs),
            seg_block=HeadSettings(epochs=args.seg_block_epochs),
            seg_registers=tuple(args.seg_registers),
            seg_lrs=tuple(args.seg_lrs),
        )
        data = DataSpec(
            "folder" if args.images else args.dataset,
            args.images or args.data_root,
            args.train_images,
            args.test_images,
        )
        config = AnalysisConfig(
            models=tuple(parse_model_spec(text, args.mlflow_uri) for text in args.models),
            probes=tuple(args.probes),
            data=data,
            out_dir=args.out,
            settings=settings,
            shards=args.shards,
            bank_dir=args.bank_dir,
            rebuild_bank=args.rebuild_bank,
            cpus_per_task=args.cpus_per_task,
            gpus_per_task=args.gpus_per_task,
            experiment=args.experiment,
            run_name=args.run_name,
            tracking_uri=args.mlflow_uri,
        )
    except ValueError as error:  # every config, data and model-spec error names what is wrong
        parser.error(str(error))
    outcome = run_analysis(config, ray_address=args.ray_address)
    ray.shutdown()
    print(f"summary: {outcome.summary}\nMLflow run: {outcome.run_id}")
    errors = outcome.report.errors
    if errors:
        print(f"{len(errors)} probe errors; see {outcome.out_dir / 'errors.csv'}")


if __name__ == "__main__":
    main()
