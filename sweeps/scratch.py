"""DeiT-III Small trained from scratch on ImageNet-1k with 0 and with 4 registers (the study's Table 9): the same
sweep machinery as sweeps/finetune_grid.py (Tune + Optuna grid, resumable, MLflow parent run, report).

    python sweeps/scratch.py --local                    # tiny ViT from random weights, generated data, embedded Ray
    ray job submit --working-dir . -- python sweeps/scratch.py --data /mnt/nvme/imagenet --storage s3://bucket/vitreg
    python sweeps/scratch.py --data /mnt/nvme/imagenet --dry-run   # cells, trainable parameters, GPU-hours

Options are those of sweeps/finetune_grid.py; presets (train/experiments/scratch.py): scratch
(default, 150 epochs on 2 GPUs per run) and local (= --local).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

from sweeps import finetune_grid
from train.experiments import SCRATCH_SWEEPS


def main(argv: Sequence[str] | None = None) -> int:
    return finetune_grid.main(
        argv, registry=SCRATCH_SWEEPS, prefix="scratch", default_preset="scratch", description=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
