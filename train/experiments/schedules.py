"""The study's comparison of lambda schedules (section 4.2.1, Figure 10): the study's fine-tune (`study_finetune`)
at 10 frozen blocks and 4 registers for 50 epochs, one trial per (schedule, initial lambda).

    python sweeps/finetune_grid.py --preset schedules --data /data/imagenet-ffcv
    python sweeps/finetune_grid.py --preset schedules --local      # the same cells on the tiny ViT
"""

from __future__ import annotations

from train.config import merge
from train.experiments import study_finetune, tiny
from train.experiments.sweep import Experiment

SCHEDULE_CELLS = (
    ("harmonic", 0.1),
    ("exp_hard", 0.1),
    ("exp_soft", 0.01),
    ("step", 0.01),
    ("constant", 0.01),
    ("constant", 0.0),
)


def get_config(local: bool = False) -> Experiment:
    """harmonic 0.1, exp_hard 0.1, exp_soft 0.01, step 0.01, constant 0.01, constant 0.

    Expected run time: 6 trials x 50 epochs, about 10 GPU-hours each (5x the study's 10-epoch fine-tunes); in
    parallel on one p5.48xlarge, about 8-10 h wall clock.

    local=True: the same 6 cells on the tiny ViT from the planted-artifact model, 2 frozen blocks of 4, 3 epochs
    with a schedule period of 1 epoch (so every schedule changes lambda within the run); about 6-10 minutes on a
    2-core CPU machine.
    """
    frozen = 2 if local else 10
    cells = tuple(
        {"frozen_blocks": frozen, "registers": 4, "lambda_schedule": schedule, "penalty_lambda": lam}
        for schedule, lam in SCHEDULE_CELLS
    )
    if local:
        return Experiment(
            name="schedules-local",
            base=tiny.local_base(lambda_period=1),
            cells=cells,
            local=True,
            planted_base=True,
            description="lambda schedules on the tiny ViT with planted artifacts, 3 epochs, embedded Ray",
        )
    return Experiment(
        name="schedules",
        base=merge(study_finetune.BASE, {"epochs": 50}),
        cells=cells,
        description="lambda schedules at 10 frozen blocks and 4 registers, 50 epochs",
    )
