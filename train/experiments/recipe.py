"""The study's fine-tuning recipe, `STUDY_RECIPE`: training-config values that the study's fine-tunes (the
`finetune` training preset, the `paper`, `schedules` and `search` sweeps) share.

Each value comes from the study's code (vit-reg/vit-reg, `DEIT-III/main.py` argument defaults and `engine.py`):
- plain `CrossEntropyLoss` (label smoothing and mixup/cutmix are commented out in main.py): label_smoothing 0;
- lr = 5e-4 x global batch / 512 (`--lr 5e-4`, linear scaling unless `--unscale-lr`): lr 5e-4,
  lr_reference_batch 512;
- AdamW (`--opt adamw`), weight decay 0.05 (`--weight-decay`) through timm's `create_optimizer`: no decay on 1-d
  parameters and on the model's `no_weight_decay()`, which in the study's model is pos_embed and cls_token only,
  so its registers DO get weight decay: no_weight_decay [pos_embed, cls_token];
- timm's cosine schedule stepped per epoch (`--sched cosine`), 5 warm-up epochs from 1e-6 (`--warmup-epochs 5
  --warmup-lr 1e-6`), min lr 1e-5 (`--min-lr`): lr_schedule_unit "epoch". DeiT's loop calls `step(epoch)` after
  epoch `epoch`, so its epoch e+1 runs at the schedule's value for e; ours runs epoch e at e (timm's intent);
- drop path 0.1 (`--drop-path`); model EMA 0.99996 (`--model-ema-decay`). The study evaluates the raw model and so
  do we; the EMA is kept in the checkpoint and evaluated once, at the end, as val_ema/*;
- RandAugment rand-m9-mstd0.5-inc1 (`--aa`), random erasing 0.25 in pixel mode (`--reprob`, `--remode`).
  `--color-jitter 0.3` is passed too, but timm's `create_transform` ignores colour jitter when RandAugment is on,
  so the study trained without it. FFCV cannot run these in its CPU pipeline: `train.augment` applies them on the
  device, per image, per batch;
- repeated augmentation x3 (`--repeated-aug`, DeiT's RASampler, used when distributed): data.repeated_augmentations;
- registers drawn from a standard normal (`torch.randn`): register_init_std 1.0;
- evaluation: the shorter side resized to 224 / 0.875 = 256 (bicubic), centre crop 224 (`--eval-crop-ratio`):
  data.crop_pct 0.875.
"""

from __future__ import annotations

from typing import Any

STUDY_RECIPE: dict[str, Any] = {
    "label_smoothing": 0.0,
    "lr": 5e-4,
    "lr_reference_batch": 512,
    "weight_decay": 0.05,
    "no_weight_decay": ["pos_embed", "cls_token"],
    "lr_schedule_unit": "epoch",
    "warmup_epochs": 5.0,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "drop_path_rate": 0.1,
    "ema_decay": 0.99996,
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "color_jitter": 0.0,
    "random_erasing": 0.25,
    "register_init_std": 1.0,
    "data": {"repeated_augmentations": 3, "crop_pct": 0.875},
}
