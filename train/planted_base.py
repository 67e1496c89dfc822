"""The embedded default's starting model: the planted-artifact ViT in the `tiny` preset's shape, as a model file.

The local sweep fine-tunes from it, so its table shows what the system exists to measure: the planted tokens
(`PLANTED_POSITIONS`, from `PLANT_BLOCK`, the last block, on every image) start at ~50x the median patch norm;
cells with the norm penalty bring them down, cells without it keep them. The plant is a massive MLP activation read
by a small weight (`vitreg.synthetic`), so a few dozen optimiser steps are enough to see the difference on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import vitreg
from train.experiments.tiny import BASE as TINY
from vitreg.synthetic import planted_artifact_vit

MODEL_FILE = "planted_base.safetensors"
PLANTED_POSITIONS = ((0, 0), (3, 3))  # two corners of the 4 x 4 patch grid: 2 of 16 patches, on every image
PLANT_BLOCK = 3  # the last block: it trains in every cell of the local grid (frozen_blocks <= 3)


def prepare_planted_base(directory: Path, num_classes: int) -> Path:
    """Write (once) and return `directory/planted_base.safetensors` for the tiny preset's architecture."""
    path = Path(directory).expanduser().resolve() / MODEL_FILE
    if path.is_file() and vitreg.read_model_file_info(path).num_classes == num_classes:
        return path
    arch = TINY["model_kwargs"]
    model = planted_artifact_vit(
        img_size=TINY["img_size"],
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        num_classes=num_classes,
        plant_block=PLANT_BLOCK,
        positions=PLANTED_POSITIONS,
    )
    vitreg.save_model_file(
        model, path, timm_name=TINY["model"], model_kwargs=arch, extra={"planted_positions": PLANTED_POSITIONS}
    )
    return path
