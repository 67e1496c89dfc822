"""Train DeiT-III Small from scratch (random init, every block trainable) on Ray Train, with or without registers.

    python train/scratch.py --data /data/imagenet-ffcv                              # 0 registers, 150 epochs
    python train/scratch.py --data /data/imagenet-ffcv --set registers=4
    python train/scratch.py --data /data/imagenet-ffcv --dry-run                    # print the config, run nothing
    python train/scratch.py --preset tiny --set frozen_blocks=0 --set penalty_lambda=0   # on a laptop

Options as in train/finetune.py (--data, --set, --dry-run, --name, --storage, --mlflow-uri); the default preset
is `scratch`.
"""

from collections.abc import Sequence
from typing import Any

from train import finetune


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return finetune.main(argv, default_preset="scratch", doc=__doc__)


if __name__ == "__main__":
    main()
