"""Where the registers enter (`register_entry`): the study's fine-tune with its input-level registers against the
same fine-tune with the registers entering after the frozen prefix, at the study's frozen-block values.

- "input" (the study's): registers at the input; position embedding, CLS, registers, later blocks, final norm and
  head train, so every step back-propagates through all k frozen blocks.
- "after_frozen": registers inserted after CLS at the input of block k; the prefix (embeddings, blocks < k) is frozen
  and runs under `torch.no_grad()`; later blocks, final norm, head and registers train.

    python sweeps/finetune_grid.py --preset entry --data /data/imagenet-ffcv   # get_config()
    python sweeps/finetune_grid.py --preset entry --local                      # get_config(local=True)
"""

from __future__ import annotations

from train.experiments import study_finetune, tiny
from train.experiments.sweep import Experiment
from vitreg.models import REGISTER_ENTRIES

LOCAL_FROZEN = (2, 3)  # the tiny ViT has 4 blocks; the planted artifacts come from block 3, which trains in both
LOCAL_LAMBDA = 0.1  # the tiny preset's


def cells(frozen_values: tuple[int, ...], penalty_lambda: float) -> tuple[dict[str, object], ...]:
    """frozen blocks x register entry, 4 registers, constant lambda."""
    return tuple(
        {"frozen_blocks": frozen, "registers": 4, "penalty_lambda": penalty_lambda, "register_entry": entry}
        for frozen in frozen_values
        for entry in REGISTER_ENTRIES
    )


def get_config(local: bool = False) -> Experiment:
    """frozen blocks {8, 9, 10, 11} x register entry {input, after_frozen}, 4 registers, lambda 0.01 (`entry`).

    Expected run time: 8 trials of the study's 10-epoch fine-tune, at most about 2 GPU-hours each (the study's time
    for input-level registers; the after_frozen trials skip the backward pass through the frozen prefix and take
    less), about 16 GPU-hours in all.

    local=True (`entry --local`): the tiny ViT from the planted-artifact model on the generated data, embedded Ray,
    frozen blocks {2, 3} x register entry, 4 registers, constant lambda 0.1, 3 epochs. Expected run time: 3-6
    minutes on a 2-core CPU machine, as the `local` sweep.
    """
    if local:
        return Experiment(
            name="entry-local",
            base=tiny.local_base(),
            cells=cells(LOCAL_FROZEN, LOCAL_LAMBDA),
            local=True,
            planted_base=True,
            description="register entry (input vs after_frozen) on the tiny ViT with planted artifacts, embedded Ray",
        )
    return Experiment(
        name="entry",
        base=study_finetune.BASE,
        cells=cells(study_finetune.PAPER_FROZEN, 0.01),
        description="register entry: input (the study's) vs after_frozen, at frozen blocks {8..11}, 4 registers",
    )
