"""The study's fine-tune and its grid (section 3.4, Table 8): DeiT-III Small pretrained on ImageNet-21k and
fine-tuned on 1k (`deit3_small_patch16_224.fb_in22k_ft_in1k`), fine-tuned for 10 epochs on ImageNet-1k (FFCV) with
the study's recipe (`recipe.STUDY_RECIPE`).

- `BASE`: one fine-tune, the training preset `finetune`: 4 registers, 10 frozen blocks, constant lambda 0.01.
- `get_config()`: the sweep `paper`: frozen blocks {8, 9, 10, 11} x registers {0, 1, 4} x constant lambda
  {0, 0.01, 0.1}, minus the 4 cells with no registers and lambda 0 (plain fine-tuning), and one more cell
  (`BASELINE_CELL`, epochs 0) that evaluates the pretrained model as it is, through the same data pipeline: Table
  8's "no fine-tuning" row (the study measured 82.81% top-1 for it).
- `get_config(local=True)`: the sweep `local`, the same axes on a laptop (see `get_config`).

    python train/finetune.py --set data.path=/data/imagenet-ffcv              # BASE
    python sweeps/finetune_grid.py --preset paper --data /data/imagenet-ffcv  # get_config()
    python sweeps/finetune_grid.py                                            # get_config(local=True)
"""

from __future__ import annotations

from typing import Any

from train.config import merge
from train.experiments import tiny
from train.experiments.recipe import STUDY_RECIPE
from train.experiments.sweep import Experiment

BASE: dict[str, Any] = merge(
    STUDY_RECIPE,
    {
        "model": "deit3_small_patch16_224.fb_in22k_ft_in1k",
        "pretrained": True,
        "img_size": 224,
        "registers": 4,
        "frozen_blocks": 10,
        "penalty_lambda": 0.01,
        "lambda_schedule": "constant",
        "epochs": 10,
        "batch_size": 512,
        "data": {"backend": "ffcv", "num_workers": 8},  # data.path is left to the user
    },
)

PAPER_FROZEN = (8, 9, 10, 11)
PAPER_REGISTERS = (0, 1, 4)
PAPER_LAMBDAS = (0.0, 0.01, 0.1)

# Table 8's "no fine-tuning" row: the pretrained model evaluated through the same pipeline (epochs=0).
BASELINE_CELL = {"frozen_blocks": 12, "registers": 0, "penalty_lambda": 0.0, "epochs": 0}

# The local grid: frozen blocks x registers x lambda x schedule on the tiny ViT (4 blocks).
LOCAL_CELLS = (
    {"frozen_blocks": 2, "registers": 0, "penalty_lambda": 0.01, "lambda_schedule": "constant"},
    {"frozen_blocks": 2, "registers": 4, "penalty_lambda": 0.0, "lambda_schedule": "constant"},
    {"frozen_blocks": 2, "registers": 4, "penalty_lambda": 0.1, "lambda_schedule": "harmonic"},
    {"frozen_blocks": 3, "registers": 1, "penalty_lambda": 0.01, "lambda_schedule": "constant"},
)


def get_config(local: bool = False) -> Experiment:
    """The study's 32 fine-tunes, each exactly once, and its "no fine-tuning" row (`paper`).

    Expected run time: about 2 GPU-hours per trial (the study: ~2 h each on one A100, 64 h in all); on
    `cluster.yaml` at full size (4 x p5.48xlarge, 32 H100) all 32 run side by side, about 1.5-2 h wall clock.

    local=True (`local`, the default of sweeps/finetune_grid.py): embedded Ray, the tiny ViT, the generated data
    set (written as JPEGs and a .beton under the data directory on first use), 4 grid cells over frozen blocks x
    registers x lambda x schedule, 3 epochs each. Every trial starts from the planted-artifact model
    (`train.planted_base`: two patch positions at ~50x the median norm in the last block), so the table shows the
    artifacts falling in the cells with the penalty and staying in the cell without it. Expected run time: 3-6
    minutes on a 2-core CPU machine (about 1 minute per trial, trials one or two at a time), plus ~20 s to
    generate the data on the first run.
    """
    if local:
        return Experiment(
            name="local",
            base=tiny.local_base(),
            cells=LOCAL_CELLS,
            local=True,
            planted_base=True,
            description="tiny ViT with planted artifacts on generated data, embedded Ray: the whole sweep on a laptop",
        )
    fine_tunes = [
        {"frozen_blocks": frozen, "registers": registers, "penalty_lambda": lam}
        for frozen in PAPER_FROZEN
        for registers in PAPER_REGISTERS
        for lam in PAPER_LAMBDAS
        if not (registers == 0 and lam == 0.0)
    ]
    return Experiment(
        name="paper",
        base=BASE,
        cells=(*fine_tunes, BASELINE_CELL),
        description="the study's 32 DeiT-III Small fine-tunes (frozen x registers x lambda), 10 epochs, + baseline",
    )
