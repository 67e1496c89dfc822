"""A search around the study's fine-tune (`study_finetune`): Optuna TPE over frozen blocks, registers, lambda,
lambda schedule and learning rate, with ASHA stopping weak trials early.

    python sweeps/finetune_grid.py --preset search --data /data/imagenet-ffcv
    python sweeps/finetune_grid.py --preset search --local         # the same axes on the tiny ViT
"""

from __future__ import annotations

from train.config import merge
from train.experiments import study_finetune, tiny
from train.experiments.sweep import Asha, Choice, Experiment, IntRange, LogUniform
from vitreg.schedules import SCHEDULES


def get_config(local: bool = False) -> Experiment:
    """Frozen blocks 0..11, registers 0..8, lambda (log-uniform), schedule and learning rate, 64 trials, with ASHA
    stopping weak trials after 2, 6, ... epochs (10 at most).

    Expected run time: 64 trials; with ASHA most stop after 2 epochs, so about 64 x 0.5 + 10 x 2 = ~50
    GPU-hours; on 32 H100 about 3-4 h wall clock (TPE learns less when many trials run at once).

    local=True: the same axes scaled to the tiny ViT (frozen blocks 0..3, registers 0..4) from the
    planted-artifact model, 6 trials of 3 epochs, ASHA after 1 epoch; about 5-8 minutes on a 2-core CPU machine.
    """
    if local:
        return Experiment(
            name="search-local",
            base=tiny.local_base(),
            space={
                "frozen_blocks": IntRange(0, 3),
                "registers": IntRange(0, 4),
                "penalty_lambda": LogUniform(1e-4, 0.3),
                "lambda_schedule": Choice(SCHEDULES),
                "lr": LogUniform(1e-4, 1e-2),
            },
            num_samples=6,
            asha=Asha(grace_period=1, reduction_factor=3),
            local=True,
            planted_base=True,
            description="TPE + ASHA over the same axes on the tiny ViT with planted artifacts, embedded Ray",
        )
    return Experiment(
        name="search",
        base=merge(study_finetune.BASE, {"epochs": 10}),
        space={
            "frozen_blocks": IntRange(0, 11),
            "registers": IntRange(0, 8),
            "penalty_lambda": LogUniform(1e-4, 0.3),
            "lambda_schedule": Choice(SCHEDULES),
            "lr": LogUniform(1e-5, 1e-3),
        },
        num_samples=64,
        asha=Asha(grace_period=2, reduction_factor=3),
        description="TPE over frozen blocks, registers, lambda, schedule, lr with ASHA",
    )
