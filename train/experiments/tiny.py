"""The tiny experiment: a 4-block, 64-wide ViT on 32 px generated data, 2 CPU workers; one run takes about a minute
anywhere. It is the `tiny` training preset and the base every experiment's local version shrinks to.

    python train/finetune.py --preset tiny
"""

from __future__ import annotations

from typing import Any

from train.config import merge

# The training preset `tiny`: every value a run needs except what the class defaults already say.
BASE: dict[str, Any] = {
    "model": "vit_tiny_patch16_224",
    "model_kwargs": {"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2},
    "pretrained": False,
    "img_size": 32,
    "registers": 4,
    "frozen_blocks": 2,
    "penalty_lambda": 0.1,
    "epochs": 2,
    "batch_size": 32,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup_epochs": 0.5,
    "label_smoothing": 0.0,
    "num_workers": 2,
    "use_gpu": False,
    "cpus_per_worker": 0.5,
    "max_failures": 1,
    "log_every_steps": 2,
    "precision": "fp32",
    "data": {"backend": "ffcv", "path": "outputs/data/generated", "num_workers": 1, "min_crop_scale": 0.35},
    "tracking": {"experiment": "vitreg-tiny", "system_metrics_interval_s": 2.0},
}

# Epochs of a trial of a local sweep: enough for the planted artifacts to fall in the cells with the penalty.
LOCAL_EPOCHS = 3


def local_base(**overrides: Any) -> dict[str, Any]:
    """The base of an experiment's local version: `BASE` for `LOCAL_EPOCHS` epochs, with `overrides`."""
    return merge(BASE, {"epochs": LOCAL_EPOCHS, **overrides})
