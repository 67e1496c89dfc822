"""Segmentation heads trained together (analysis/seg_heads.py) against today's one-by-one training, planted answers
and the host torchmetrics mIoU."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

from analysis.seg_heads import (
    BlockHeads,
    HeadSet,
    LinearHeads,
    _head_losses,
    evaluate_heads,
    segmentation_rows,
    train_heads,
)
from analysis.segmentation import (
    IGNORE_INDEX,
    HeadSettings,
    LastBlockSegmenter,
    LinearSegmenter,
    confusion_matrix,
    evaluate_segmenter,
    iou_from_confusion,
    mean_iou,
    minibatch_order,
    to_targets,
    train_segmenter,
)
from vitreg.synthetic import planted_artifact_vit

GRID, PATCH, CLASSES, CHANNELS = (4, 4), 4, 3, 8
LINEAR = HeadSettings(epochs=3, batch_size=8, lr=1e-2, label_stride=2)
BLOCK = HeadSettings(epochs=2, batch_size=8, lr=1e-2, backbone_lr=1e-3, label_stride=2)


@dataclass(frozen=True)
class Settings:
    """The fields of ProbeSettings that segmentation_rows reads, with the learning-rate grid the lead will add."""

    seeds: tuple[int, ...] = (0,)
    seg_head: HeadSettings = LINEAR
    seg_block: HeadSettings = BLOCK
    seg_registers: tuple[int, ...] = ()
    seg_lrs: tuple[float, ...] = field(default=())


def tiny_model(channels: int) -> torch.nn.Module:
    """A random 2-block ViT on the 4 x 4 grid: its last block and norm seed the last-block variants."""
    return planted_artifact_vit(img_size=16, patch_size=PATCH, embed_dim=channels, depth=2, num_heads=2, plant_block=0)


def random_problem(images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (B, N, C) features and (B, H, W) uint8 ADE-style labels (0 = other) with no relation between them."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(images, GRID[0] * GRID[1], CHANNELS, generator=generator).half()
    labels = torch.randint(0, CLASSES + 1, (images, GRID[0] * PATCH, GRID[1] * PATCH), generator=generator)
    return features, labels.to(torch.uint8)


def planted_problem(images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right halves of each image in two random classes; each patch's features are its class one-hot x 3."""
    generator = torch.Generator().manual_seed(seed)
    halves = torch.randint(1, CLASSES + 1, (images, 2), generator=generator)
    patch_labels = halves.repeat_interleave(GRID[1] // 2, dim=1).unsqueeze(1).expand(-1, GRID[0], -1)  # (B, r, c)
    features = torch.eye(CHANNELS)[patch_labels.reshape(images, -1) - 1] * 3
    features = features + 0.1 * torch.randn(features.shape, generator=generator)
    pixels = patch_labels.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    return features.half(), pixels.to(torch.uint8)


def alone(make, inputs, labels, settings: HeadSettings, seed: int, order, test_inputs, test_labels):
    """Today's way: build under `torch.manual_seed(seed)`, `train_segmenter`, `evaluate_segmenter`."""
    torch.manual_seed(seed)
    segmenter = train_segmenter(make(), inputs, labels, GRID, settings, seed, order=order)
    return segmenter, evaluate_segmenter(segmenter, test_inputs, test_labels, GRID, CLASSES)[0]


def together_miou(head_set: HeadSet, test_inputs: torch.Tensor, test_labels: torch.Tensor) -> np.ndarray:
    return iou_from_confusion(evaluate_heads(head_set, test_inputs, test_labels, GRID, CLASSES))[0].numpy()


# ---------------------------------------------------------------- (a) one head: the same as today's training


@pytest.mark.parametrize("injected", [False, True])
def test_one_linear_head_together_equals_train_segmenter(injected):
    features, labels = random_problem(24)
    seed = 3
    order = [torch.arange(16).flip(0), torch.arange(16), torch.arange(16).roll(5)] if injected else None
    head, today = alone(
        lambda: LinearSegmenter(CHANNELS, CLASSES),
        features[:16],
        labels[:16],
        LINEAR,
        seed,
        order,
        features[16:],
        labels[16:],
    )
    together = HeadSet(LinearHeads(CHANNELS, CLASSES, [LINEAR.lr], [seed]), "patches", LINEAR)
    ok = train_heads([together], {"patches": features[:16]}, labels[:16], GRID, order or minibatch_order(16, 3, seed))
    assert ok[0].tolist() == [True]
    torch.testing.assert_close(together.heads.weights[0][0], head.head.weight.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.heads.biases[0][0], head.head.bias, rtol=1e-5, atol=1e-6)
    assert together_miou(together, features[16:], labels[16:])[0] == pytest.approx(today, abs=1e-6)
    # and through segmentation_rows with its default order (the first seed's, as train_segmenter draws it)
    if not injected:
        rows = segmentation_rows(
            {"patches": (features[:16], features[16:]), "masks": (labels[:16], labels[16:])},
            tiny_model(CHANNELS),
            2,  # a model with a register: linear variant only
            GRID,
            CLASSES,
            Settings(seeds=(seed,), seg_registers=(0, 1)),
            "cpu",
        )
        assert [(row["variant"], row["registers"], row["lr"]) for row in rows] == [("linear", 1, LINEAR.lr)]
        assert rows[0]["miou_mean"] == pytest.approx(today, abs=1e-6)
        assert math.isnan(rows[0]["miou_std"]) and rows[0]["seeds"] == 1


def test_rows_with_one_seed_equal_todays_loop():
    """segmentation_rows against the loop it replaces (analysis/tasks.py before issue 9), one seed: same numbers."""
    model = tiny_model(CHANNELS)
    features, labels = random_problem(20, seed=2)
    tokens = torch.randn(20, 17, CHANNELS, generator=torch.Generator().manual_seed(2)).half()
    cached = {
        "patches": (features[:12], features[12:]),
        "masks": (labels[:12], labels[12:]),
        "block_inputs": (tokens[:12], tokens[12:]),
    }
    rows = segmentation_rows(cached, model, 1, GRID, CLASSES, Settings(seeds=(5,), seg_registers=(0, 1)), "cpu")
    variants = [("patches", LINEAR, lambda: LinearSegmenter(CHANNELS, CLASSES))]
    for count in (0, 1):
        make = lambda c=count: LastBlockSegmenter(model.blocks[-1], model.norm, 1, c, CLASSES)
        variants.append(("block_inputs", BLOCK, make))
    assert len(rows) == len(variants)
    for row, (inputs, settings, make) in zip(rows, variants, strict=True):
        train, test = cached[inputs]
        _, today = alone(make, train, labels[:12], settings, 5, None, test, labels[12:])
        assert row["miou_mean"] == pytest.approx(today, abs=1e-6)


# ---------------------------------------------------------------- (b) a grid of heads: each as if alone


def test_grid_of_linear_and_last_block_heads_equals_each_trained_alone():
    model = tiny_model(CHANNELS * 2)
    generator = torch.Generator().manual_seed(1)
    _, labels = random_problem(20, seed=1)
    patches = torch.randn(20, 16, CHANNELS, generator=generator).half()
    tokens = torch.randn(20, 17, CHANNELS * 2, generator=generator).half()
    lrs, seeds, registers = (1e-3, 1e-2, 1e-1), (0, 1), (0, 2)
    order = minibatch_order(12, max(LINEAR.epochs, BLOCK.epochs), seed=7)
    linear = HeadSet(LinearHeads(CHANNELS, CLASSES, lrs, seeds), "patches", LINEAR)
    blocks = HeadSet(
        BlockHeads(model.blocks[-1], model.norm, 1, CLASSES, registers, lrs[:2], seeds), "block_inputs", BLOCK
    )
    inputs = {"patches": patches[:12], "block_inputs": tokens[:12]}
    train_heads([linear, blocks], inputs, labels[:12], GRID, order)
    linear_miou = together_miou(linear, patches[12:], labels[12:])
    block_miou = together_miou(blocks, tokens[12:], labels[12:])

    for i, (lr, seed) in enumerate((lr, seed) for lr in lrs for seed in seeds):
        settings = replace(LINEAR, lr=lr)
        make = lambda: LinearSegmenter(CHANNELS, CLASSES)
        head, today = alone(make, patches[:12], labels[:12], settings, seed, order, patches[12:], labels[12:])
        torch.testing.assert_close(linear.heads(patches[:1].float(), slice(i, i + 1))[:, :, 0], head(patches[:1]))
        assert linear_miou[i] == pytest.approx(today, abs=1e-6)
    head_index = 0
    for count in registers:
        for lr in lrs[:2]:
            for seed in seeds:
                settings = replace(BLOCK, lr=lr)
                make = lambda c=count: LastBlockSegmenter(model.blocks[-1], model.norm, 1, c, CLASSES)
                trained, today = alone(make, tokens[:12], labels[:12], settings, seed, order, tokens[12:], labels[12:])
                mine = blocks.heads.segmenters[head_index]
                for name, value in trained.state_dict().items():
                    torch.testing.assert_close(mine.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
                assert block_miou[head_index] == pytest.approx(today, abs=1e-6)
                head_index += 1
    assert len(set(np.round(linear_miou, 6))) > 1  # the learning rates do make different heads


def test_summed_loss_gives_each_head_its_own_gradient():
    model = tiny_model(CHANNELS)
    _, labels = random_problem(4)
    targets = to_targets(labels[:, 1::2, 1::2])
    valid = targets != IGNORE_INDEX
    inputs = {"linear": torch.randn(4, 16, CHANNELS), "block": torch.randn(4, 17, CHANNELS)}
    heads = {
        "linear": LinearHeads(CHANNELS, CLASSES, (1e-3, 1e-2), (0, 1)),
        "block": BlockHeads(model.blocks[-1], model.norm, 1, CLASSES, (0, 3), (1e-3,), (0,)),
    }
    for name, module in heads.items():
        _head_losses(module(inputs[name]), targets, valid, GRID).sum().backward()
        summed = per_head_gradients(module)
        for h in range(module.heads):
            module.zero_grad(set_to_none=True)
            _head_losses(module(inputs[name], slice(h, h + 1)), targets, valid, GRID).sum().backward()
            own = per_head_gradients(module)
            for other in range(module.heads):  # head h's gradient alone is its part of the summed one; 0 elsewhere
                for mine, total in zip(own[other], summed[other], strict=True):
                    torch.testing.assert_close(mine, total if other == h else torch.zeros_like(total))
            assert all(grad.abs().sum() > 0 for grad in own[h] if grad.numel())  # (0 registers: an empty one)
        module.zero_grad(set_to_none=True)


def per_head_gradients(module: LinearHeads | BlockHeads) -> list[list[torch.Tensor]]:
    """Each head's parameter gradients (zeros where None): its rows of the stacked weights, or its segmenter's."""

    def grads(parameters) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters]

    if isinstance(module, LinearHeads):
        weights, biases = torch.cat(grads(module.weights)), torch.cat(grads(module.biases))
        return [[weights[h], biases[h]] for h in range(module.heads)]
    return [grads(segmenter.parameters()) for segmenter in module.segmenters]


# ---------------------------------------------------------------- (c) planted answer, seeds that matter


def test_planted_separable_segmentation_reaches_miou_one_and_shuffled_labels_do_not():
    features, labels = planted_problem(48)
    cached = {"patches": (features[:32], features[32:]), "masks": (labels[:32], labels[32:])}
    settings = Settings(seeds=(0, 1), seg_head=HeadSettings(epochs=30, batch_size=8, label_stride=2), seg_lrs=(0.05,))
    model = tiny_model(CHANNELS)
    rows = segmentation_rows(cached, model, 2, GRID, CLASSES, settings, "cpu")
    assert rows[0]["miou_mean"] > 0.97 and rows[0]["seeds"] == 2
    shuffled = {
        **cached,
        "masks": (labels[:32][torch.randperm(32, generator=torch.Generator().manual_seed(0))], labels[32:]),
    }
    assert segmentation_rows(shuffled, model, 2, GRID, CLASSES, settings, "cpu")[0]["miou_mean"] < 0.6


def test_rows_of_every_variant_and_lr_and_seeds_change_the_result():
    model = tiny_model(CHANNELS)
    features, labels = random_problem(24)
    tokens = torch.randn(24, 17, CHANNELS).half()
    cached = {
        "patches": (features[:16], features[16:]),
        "masks": (labels[:16], labels[16:]),
        "block_inputs": (tokens[:16], tokens[16:]),
    }
    settings = Settings(seeds=(0, 1, 2), seg_registers=(0, 1), seg_lrs=(1e-2, 1e-1))
    rows = segmentation_rows(cached, model, 1, GRID, CLASSES, settings, "cpu")
    assert [(row["variant"], row["registers"], row["lr"], row["epochs"]) for row in rows] == [
        ("linear", 0, 1e-2, LINEAR.epochs),
        ("linear", 0, 1e-1, LINEAR.epochs),
        ("last_block+reg0", 0, 1e-2, BLOCK.epochs),
        ("last_block+reg0", 0, 1e-1, BLOCK.epochs),
        ("last_block+reg1", 1, 1e-2, BLOCK.epochs),
        ("last_block+reg1", 1, 1e-1, BLOCK.epochs),
    ]
    for row in rows:  # one shared minibatch order: the seeds vary only the initialisation, and that still shows
        assert row["seeds"] == 3 and 0 < row["miou_std"] < 1 and 0 <= row["miou_mean"] <= 1
        assert row["trains"] == ("head" if row["variant"] == "linear" else "head + last block + norm + registers")
    default = segmentation_rows(cached, model, 1, GRID, CLASSES, Settings(seg_registers=(2,)), "cpu")
    assert [(row["variant"], row["lr"]) for row in default] == [("linear", LINEAR.lr), ("last_block+reg2", BLOCK.lr)]


def test_a_diverging_head_is_reported_as_nan_and_leaves_the_others_alone():
    features, labels = random_problem(24)
    cached = {"patches": (features[:16], features[16:]), "masks": (labels[:16], labels[16:])}
    model = tiny_model(CHANNELS)
    rows = segmentation_rows(cached, model, 2, GRID, CLASSES, Settings(seeds=(0, 1), seg_lrs=(1e-2, 1e37)), "cpu")
    sane = segmentation_rows(cached, model, 2, GRID, CLASSES, Settings(seeds=(0, 1), seg_lrs=(1e-2,)), "cpu")
    assert math.isnan(rows[1]["miou_mean"]) and rows[1]["seeds"] == 0  # Adam steps of 1e37: logits overflow, nan loss
    assert rows[0] == sane[0]


def test_rows_with_the_real_probe_settings():
    from analysis.probe_settings import ProbeSettings

    features, labels = random_problem(12)
    settings = ProbeSettings(seeds=(0, 1), seg_head=LINEAR, seg_registers=(0,))
    cached = {"patches": (features[:8], features[8:]), "masks": (labels[:8], labels[8:])}
    rows = segmentation_rows(cached, tiny_model(CHANNELS), 3, GRID, CLASSES, settings, "cpu")
    assert [(row["variant"], row["registers"], row["lr"], row["seeds"]) for row in rows] == [
        ("linear", 2, LINEAR.lr, 2)
    ]


def test_bad_inputs_are_named():
    features, labels = random_problem(12)
    cached = {"patches": (features[:8], features[8:]), "masks": (labels[:8], labels[8:])}
    model = tiny_model(CHANNELS)
    with pytest.raises(ValueError, match=r"lack \['block_inputs'\]"):
        segmentation_rows(cached, model, 1, GRID, CLASSES, Settings(seg_registers=(0,)), "cpu")
    with pytest.raises(ValueError, match="seeds=.*each seed once"):
        segmentation_rows(cached, model, 2, GRID, CLASSES, Settings(seeds=(0, 0)), "cpu")
    with pytest.raises(ValueError, match="seg_lrs="):
        segmentation_rows(cached, model, 2, GRID, CLASSES, Settings(seg_lrs=(0.1, -1.0)), "cpu")
    with pytest.raises(ValueError, match=r"patches \(train\) have shape \(8, 16, 8\); expected \(8, 9, C\)"):
        segmentation_rows(cached, model, 2, (3, 3), CLASSES, Settings(), "cpu")
    with pytest.raises(ValueError, match="not a permutation"):
        segmentation_rows(
            cached, model, 2, GRID, CLASSES, Settings(), "cpu", order=[torch.zeros(8, dtype=torch.long)] * 3
        )


# ---------------------------------------------------------------- (d) mIoU on the device = host torchmetrics


@pytest.mark.parametrize("classes", [3, 6])  # 6: classes 4 and 5 absent from the labels, in some predictions
def test_device_miou_equals_host_torchmetrics(classes):
    generator = torch.Generator().manual_seed(classes)
    labels = torch.randint(0, 4, (5, 12, 12), generator=generator)  # 0 = other -> ignored
    targets = to_targets(labels)
    predicted = torch.randint(0, classes, (4, 5, 12, 12), generator=generator)  # four heads
    predicted[3] = predicted[3].clamp(max=2)  # a head that never predicts the absent classes
    miou, iou = iou_from_confusion(confusion_matrix(predicted, targets, classes))
    for head in range(4):
        host_miou, host_iou = mean_iou(predicted[head], targets, classes)
        assert miou[head].item() == pytest.approx(host_miou, abs=1e-6)
        np.testing.assert_allclose(iou[head].numpy(), host_iou, atol=1e-6)  # nan where absent, in both
    if classes == 6:
        assert math.isnan(iou[3, -1]) and not math.isnan(miou[3])
    with pytest.raises(ValueError, match="targets outside 0..2"):
        confusion_matrix(predicted[0].clamp(max=2), torch.full((5, 12, 12), 3), 3)
