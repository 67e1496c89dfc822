"""The training recipe without Ray: learning rates against hand-written formulas, weight-decay groups, the study's
lambda schedules, evaluation-only configs, and what one training epoch does to frozen and trainable weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import vitreg
from train.checkpoints import MODEL_FILE, RunState, save_checkpoint
from train.config import TrainConfig
from train.epoch import train_epoch
from train.experiments import STUDY_RECIPE, training_values
from train.loop import build_network
from train.optim import LearningRate, make_ema, make_optimizer
from train.planted_base import PLANTED_POSITIONS, prepare_planted_base

CPU = torch.device("cpu")
Tiny = Callable[..., TrainConfig]  # the `tiny` fixture (tests/conftest.py): the tiny preset on generated images


def study_lr(epoch: float, peak: float, epochs: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """timm's cosine with a linear warm-up (warmup_prefix=False), written out by hand."""
    if epoch < warmup:
        return warmup_lr + epoch * (peak - warmup_lr) / warmup
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def test_study_learning_rate_per_epoch_follows_the_formula(tiny: Tiny) -> None:
    recipe = {k: v for k, v in STUDY_RECIPE.items() if k != "data"}
    config = tiny(**{**recipe, "epochs": 10, "batch_size": 1024})
    assert config.peak_lr == pytest.approx(1e-3)  # 5e-4 x 1024 / 512: DeiT's linear scaling
    model = build_network(config)
    optimizer = make_optimizer(model, config, CPU)
    schedule = LearningRate(optimizer, config, steps_per_epoch=7)
    seen = []
    for epoch in range(10):
        schedule.start_epoch(epoch)
        for step in range(7):
            schedule.before_step(epoch * 7 + step)  # per-epoch schedules ignore steps
            if step:
                assert optimizer.param_groups[0]["lr"] == seen[-1]
            seen.append(optimizer.param_groups[0]["lr"])
        want = study_lr(epoch, 1e-3, 10, 5, 1e-6, 1e-5)
        assert all(group["lr"] == pytest.approx(want, rel=1e-9) for group in optimizer.param_groups), epoch
    assert seen[0] == pytest.approx(1e-6)


def test_per_step_learning_rate_warms_up_then_decays(tiny: Tiny) -> None:
    config = tiny(epochs=4, warmup_epochs=0.5, warmup_lr=0.0, lr=1e-3, min_lr=1e-5)
    model = build_network(config)
    optimizer = make_optimizer(model, config, CPU)
    steps = 8
    schedule = LearningRate(optimizer, config, steps_per_epoch=steps)
    for step in range(4 * steps):
        schedule.before_step(step)
        want = study_lr(step, 1e-3, 4 * steps, 4, 0.0, 1e-5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9), step


def test_study_weight_decay_reaches_the_registers_and_timms_does_not(tiny: Tiny) -> None:
    def decayed(config: TrainConfig) -> set[str]:
        model = build_network(config)
        optimizer = make_optimizer(model, config, CPU)
        ids = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        return {name for name, p in model.named_parameters() if id(p) in ids}

    study = decayed(tiny(no_weight_decay=["pos_embed", "cls_token"]))
    timm_default = decayed(tiny())
    assert "reg_token" in study and "reg_token" not in timm_default
    for names in (study, timm_default):
        assert "pos_embed" not in names and "cls_token" not in names
        assert not any(name.endswith(".bias") or "norm" in name for name in names)
        assert not any(name.startswith("blocks.0.") for name in names)  # frozen: not in the optimiser at all


def test_the_studys_lambda_schedules_from_its_code() -> None:
    # engine.py: cos_decay is l2_weight * cos(pi * (epoch % 10) / 20)
    for epoch in range(25):
        want = 0.1 * math.cos(math.pi * (epoch % 10) / 20)
        assert vitreg.lambda_at("cos_decay", 0.1, epoch) == pytest.approx(want)
    assert vitreg.lambda_at("cos_decay", 0.1, 9) == pytest.approx(0.1 * math.cos(0.45 * math.pi))
    assert vitreg.lambda_at("cos_decay", 0.1, 10) == pytest.approx(0.1)


def test_finetune_preset_carries_the_studys_recipe(imagefolder_root: Path) -> None:
    overrides = {"data": {"path": str(imagefolder_root), "backend": "imagefolder"}}
    config = TrainConfig.from_preset("finetune", overrides).to_dict()  # the recipe as the run gets it
    for key, value in STUDY_RECIPE.items():
        if key != "data":
            assert config[key] == value, key
    for key, value in STUDY_RECIPE["data"].items():
        assert config["data"][key] == value, key


def test_evaluation_only_config(tiny: Tiny) -> None:
    config = tiny(epochs=0, warmup_epochs=3.0)  # warm-up means nothing without training
    assert config.epochs == 0
    with pytest.raises(ValueError, match="epochs=-1"):
        tiny(epochs=-1)
    with pytest.raises(ValueError, match="warmup_epochs=0.5: must be whole epochs"):
        tiny(lr_schedule_unit="epoch", warmup_epochs=0.5)
    with pytest.raises(ValueError, match="lr_schedule_unit='month'"):
        tiny(lr_schedule_unit="month")
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        tiny(ema_decay=1.0)


def test_one_epoch_moves_trainable_weights_only_and_the_penalty_lowers_norms(tiny: Tiny) -> None:
    """Frozen weights stay bit-identical; trainable ones move; lambda > 0 ends with smaller last-block norms."""
    torch.manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (8,))) for _ in range(6)]

    def run(lam: float) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, float]]:
        config = tiny(penalty_lambda=lam, lr=3e-3, warmup_epochs=0.0, ema_decay=0.9)
        model = build_network(config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        capture = vitreg.BlockOutputCapture(model, config.penalty_block)
        optimizer = make_optimizer(model, config, CPU)
        schedule = LearningRate(optimizer, config, len(batches))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        ema = make_ema(model, config)
        metrics = {}
        for epoch in range(2):
            metrics = train_epoch(
                model, model, capture, batches, optimizer, schedule, scaler, ema, config, epoch, lambda e, s: None
            )
        assert ema is not None and not torch.equal(ema.module.reg_token, model.reg_token)  # the EMA lags
        return model, before, metrics

    model, before, _ = run(0.0)
    after = model.state_dict()
    trainable = set(vitreg.trainable_parameter_names(model))
    for name, value in after.items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"{name} is trainable but did not move"
        else:
            assert torch.equal(value, before[name]), f"{name} is frozen but changed"
    assert not any(name.startswith(("patch_embed.", "blocks.0.", "blocks.1.")) for name in trainable)

    _, _, plain = run(0.0)
    _, _, penalised = run(1.0)
    assert penalised["train/penalty"] < 0.9 * plain["train/penalty"]
    assert plain["train/lambda"] == 0.0 and penalised["train/lambda"] == 1.0


def test_augmented_epoch_is_a_pure_function_of_the_seed(tiny: Tiny) -> None:
    """With the study's device-side augmentation, the same (seed, epoch) trains to the same weights, bit for bit
    (what a resume from an epoch checkpoint relies on); another seed trains to other weights."""
    batches = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (4,))) for _ in range(3)]

    def train(seed: int) -> dict[str, torch.Tensor]:
        config = tiny(seed=seed, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
        model = build_network(tiny())  # the same start for every seed: only the augmentation differs
        capture = vitreg.BlockOutputCapture(model, config.penalty_block)
        optimizer = make_optimizer(model, config, CPU)
        schedule = LearningRate(optimizer, config, len(batches))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        train_epoch(model, model, capture, batches, optimizer, schedule, scaler, None, config, 1, lambda e, s: None)
        return model.state_dict()

    first, again, other = train(3), train(3), train(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_training_from_a_model_file_adds_registers_and_a_head(tiny: Tiny, tmp_path: Path) -> None:
    """The local sweep's start: the planted base file (4 classes, no registers) under a 3-class run with 4
    registers keeps every weight it holds, adds the registers and a fresh head; contradicting registers fail."""
    base = prepare_planted_base(tmp_path, num_classes=4)
    held = vitreg.read_model_file(base)[0]
    config = tiny(checkpoint=str(base), model_kwargs={}, registers=4)
    assert config.num_classes == 3
    model = build_network(config)
    assert vitreg.count_registers(model) == 4 and model.head.out_features == 3
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in held.items() if not key.startswith("head."))
    assert set(state) - set(held) == {"reg_token"}

    # The training checkpoint's model file records the architecture the base file held.
    optimizer = make_optimizer(model, config, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(tmp_path, model, optimizer, scaler, None, RunState(epoch=1), config, run_dir="r", run_id="x")
    trained = tmp_path / MODEL_FILE
    assert vitreg.read_model_file_info(trained).model_kwargs == training_values("tiny")["model_kwargs"]
    assert vitreg.read_model_file_info(trained).training_run_id == "x"
    with pytest.raises(vitreg.ModelBuildError, match="holds 4 trained registers; the config asks for registers=2"):
        build_network(tiny(checkpoint=str(trained), model_kwargs={}, registers=2))
    again = build_network(tiny(checkpoint=str(trained), model_kwargs={}, registers=None))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())


def test_planted_positions_are_artifacts_on_any_image_and_the_penalty_removes_them(tmp_path: Path) -> None:
    model = vitreg.build_model(checkpoint=prepare_planted_base(tmp_path, num_classes=4))
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    norms = vitreg.run_taps(model, images, layers=[-1]).patch_norms[0]  # (B, 16)
    planted = [row * 4 + col for row, col in PLANTED_POSITIONS]
    others = [i for i in range(16) if i not in planted]
    assert norms[:, planted].min() > 30 * norms[:, others].max()

    def ratio_after(lam: float, steps: int = 20) -> float:
        net = vitreg.build_model(checkpoint=prepare_planted_base(tmp_path, num_classes=4), frozen_blocks=2)
        capture = vitreg.BlockOutputCapture(net, -1)
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 4, (16,), generator=generator)
            ce = torch.nn.functional.cross_entropy(net(x), y)
            loss = ce + lam * vitreg.l2_norm_penalty(capture.pop(), net.num_prefix_tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = vitreg.run_taps(net.eval(), images, layers=[-1]).patch_norms[0]
        return (after[:, planted].mean() / after[:, others].median()).item()

    kept, removed = ratio_after(0.0), ratio_after(0.1)
    assert kept > 20 and removed < 0.25 * kept


def test_evaluation_preprocessing_from_timms_data_config(tiny: Tiny) -> None:
    study = tiny()
    assert (study.data.crop_pct, study.data.eval_interpolation) == (0.875, "bicubic")
    deit = {"model": "deit3_small_patch16_224.fb_in22k_ft_in1k", "model_kwargs": {}, "pretrained": False}
    timm_config = tiny(**deit, eval_preprocessing="timm")
    assert (timm_config.data.crop_pct, timm_config.data.eval_interpolation) == (1.0, "bicubic")  # timm's card
    with pytest.raises(ValueError, match="eval_preprocessing='timm': .*normalises with mean"):
        tiny(eval_preprocessing="timm")  # vit_tiny's card normalises with 0.5: not our pipeline
    with pytest.raises(ValueError, match="eval_preprocessing='imagenet': allowed: study, timm"):
        tiny(eval_preprocessing="imagenet")


def test_progress_inside_an_epoch_every_n_steps(tiny: Tiny) -> None:
    """Rank 0's progress hook sees the global step, the step's own loss and a throughput every N steps."""
    batches = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (4,))) for _ in range(7)]
    config = tiny(log_every_steps=3, penalty_lambda=0.0)
    model = build_network(config)
    capture = vitreg.BlockOutputCapture(model, config.penalty_block)
    optimizer = make_optimizer(model, config, CPU)
    schedule = LearningRate(optimizer, config, len(batches))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen: list[tuple[int, dict[str, float]]] = []
    losses: list[float] = []
    original = torch.nn.CrossEntropyLoss.forward

    def recording(self, logits, labels):  # the loss of every step, to hold the reported ones against
        value = original(self, logits, labels)
        losses.append(value.item())
        return value

    torch.nn.CrossEntropyLoss.forward = recording
    try:
        train_epoch(
            model, model, capture, batches, optimizer, schedule, scaler, None, config, 2, lambda e, s: None,
            lambda values, step: seen.append((step, values)),
        )  # fmt: skip
    finally:
        torch.nn.CrossEntropyLoss.forward = original
    assert [step for step, _ in seen] == [2 * 7 + 2, 2 * 7 + 5]  # steps 3 and 6 of epoch 2, 0-based global
    for (step, values), loss in zip(seen, (losses[2], losses[5]), strict=True):
        assert values["progress/loss"] == pytest.approx(loss) and values["progress/ce"] == pytest.approx(loss)
        assert values["progress/images_per_s_per_worker"] > 0
        assert values["progress/epoch"] == pytest.approx(2 + (step - 14 + 1) / 7)
    with pytest.raises(ValueError, match="log_every_steps=-1"):
        tiny(log_every_steps=-1)
