"""DeiT-III Small trained from scratch on ImageNet-1k with 0 and with 4 registers (section 4.2.2, Table 9).

- `BASE`: one run, the training preset `scratch`: random init, every block trainable, no penalty, 150 epochs on
  2 GPUs.
- `get_config()`: the sweep `scratch`, 0 vs 4 registers; `get_config(local=True)`: the sweep `local`, the same on
  the tiny ViT.

    python train/scratch.py --set data.path=/data/imagenet-ffcv                 # BASE
    python sweeps/scratch.py --data /data/imagenet-ffcv                         # get_config()
    python sweeps/scratch.py --local                                            # get_config(local=True)
"""

from __future__ import annotations

from typing import Any

from train.experiments import tiny
from train.experiments.sweep import Experiment

BASE: dict[str, Any] = {
    "model": "deit3_small_patch16_224",
    "pretrained": False,
    "img_size": 224,
    "registers": 0,
    "frozen_blocks": 0,
    "penalty_lambda": 0.0,
    "epochs": 150,
    "batch_size": 1024,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_epochs": 5.0,
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "drop_path_rate": 0.05,
    "num_workers": 2,
    "keep_checkpoints": 3,
    "data": {"backend": "ffcv", "num_workers": 8},
}

REGISTER_CELLS = ({"registers": 0}, {"registers": 4})


def get_config(local: bool = False) -> Experiment:
    """0 and 4 registers.

    Expected run time: the study's 150 epochs took ~25 h per run on 2 x H100; two runs side by side on one
    p5.48xlarge (4 GPUs each when `scratch` uses 4 workers) take about 13-25 h wall clock.

    local=True: the tiny ViT from random weights on the generated data (2 epochs, as the tiny preset); 1-3 minutes
    on a 2-core CPU machine.
    """
    if local:
        return Experiment(
            name="local",
            base={**tiny.BASE, "frozen_blocks": 0, "penalty_lambda": 0.0},
            cells=REGISTER_CELLS,
            local=True,
            description="tiny ViT from scratch on generated data, 0 vs 4 registers",
        )
    return Experiment(
        name="scratch",
        base=BASE,
        cells=REGISTER_CELLS,
        description="DeiT-III Small from scratch, 0 vs 4 registers",
    )
