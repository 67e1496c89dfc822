"""Validation accuracy in training and segmentation mIoU, both from torchmetrics, against hand counts."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from analysis.segmentation import IGNORE_INDEX, iou_metrics, mean_iou, to_targets
from train.epoch import evaluate


class PlantedLogits(nn.Module):
    """A 'model' that answers each batch with the next planted logits (one parameter, so evaluate finds a device)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        super().__init__()
        self.num_classes = batches[0].shape[1]
        self.anchor = nn.Parameter(torch.zeros(()))
        self.batches = iter(batches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = next(self.batches)
        assert logits.shape[0] == images.shape[0]
        return logits + 0 * self.anchor


def run_evaluate(logits: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, float]:
    loader = [(torch.zeros(len(y), 3, 4, 4, dtype=torch.uint8), y) for y in labels]
    config = SimpleNamespace(precision="fp32")  # evaluate reads only the precision (for autocast on GPU)
    return evaluate(PlantedLogits(logits), loader, config)  # type: ignore[arg-type]


def test_evaluate_counts_top1_and_top5_hits_and_averages_the_loss() -> None:
    # 7 classes, two batches (3 + 4 samples), logits without ties. Ranks of the label (0 = argmax):
    logits = [
        torch.tensor(
            [
                [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0: rank 0 (top-1 hit)
                [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0],  # label 0: rank 6 (miss)
                [0.5, 7.0, 1.5, 2.5, 3.5, 4.5, 5.5],  # label 6: rank 1 (top-5 hit)
            ]
        ),
        torch.tensor(
            [
                [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 4: rank 4 (top-5 hit, the last one)
                [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 5: rank 5 (miss)
                [0.0, 1.0, 2.0, 3.0, 8.0, 5.0, 6.0],  # label 4: rank 0 (top-1 hit)
                [3.0, 1.0, 2.0, 0.0, 4.0, 5.0, 6.0],  # label 3: rank 6 (miss)
            ]
        ),
    ]
    labels = [torch.tensor([0, 0, 6]), torch.tensor([4, 5, 4, 3])]
    metrics = run_evaluate(logits, labels)
    assert metrics["val/top1"] == 100 * 2 / 7  # exact: counts divided in float64, as before torchmetrics
    assert metrics["val/top5"] == 100 * 4 / 7
    all_logits, all_labels = torch.cat(logits).double(), torch.cat(labels)
    expected_loss = (all_logits.logsumexp(1) - all_logits[torch.arange(7), all_labels]).mean().item()
    assert metrics["val/loss"] == pytest.approx(expected_loss, rel=1e-6)
    # exactly: the float32 per-sample losses summed in float64 (a float32 running sum would be off by ~1e-8)
    per_sample = torch.nn.functional.cross_entropy(torch.cat(logits), all_labels, reduction="none").double()
    assert metrics["val/loss"] == pytest.approx(per_sample.mean().item(), rel=1e-14)


def test_evaluate_with_fewer_classes_than_five_takes_top_k_as_all_classes() -> None:
    # 3 classes: top-5 is capped at 3, so every sample is a "top-5" hit; top-1 hits: samples 0 and 2.
    logits = [torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])]
    labels = [torch.tensor([0, 2, 2, 2])]
    metrics = run_evaluate(logits, labels)
    assert metrics["val/top1"] == 100 * 2 / 4
    assert metrics["val/top5"] == 100.0


def test_evaluate_keeps_a_nan_loss_visible() -> None:
    logits = [torch.tensor([[float("nan"), 1.0, 2.0], [1.0, 3.0, 2.0]])]
    metrics = run_evaluate(logits, [torch.tensor([0, 1])])
    assert torch.isnan(torch.tensor(metrics["val/loss"]))


def evaluate_shard(rank: int, port: int, logits: list[torch.Tensor], labels: list[torch.Tensor], out: str) -> None:
    """One gloo rank of `test_evaluate_sums_uneven_shards_over_ranks`: evaluates its shard, writes its metrics."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shard = slice(0, 1) if rank == 0 else slice(1, None)
        torch.save(run_evaluate(logits[shard], labels[shard]), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_sums_uneven_shards_over_ranks(tmp_path: Path) -> None:
    # Rank 0: 4 samples, 3 top-1 hits (75%); rank 1: 2 samples, 0 hits. All samples: 3/6 = 50% on both ranks
    # (the mean of the ranks' percentages would be 37.5%).
    logits = [
        torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]),
        torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]]),
    ]
    labels = [torch.tensor([0, 1, 2, 2]), torch.tensor([1, 0])]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(evaluate_shard, args=(port, logits, labels, str(tmp_path)), nprocs=2)
    single = run_evaluate([torch.cat(logits)], [torch.cat(labels)])
    for rank in (0, 1):
        metrics = torch.load(tmp_path / f"rank{rank}.pt")
        assert metrics["val/top1"] == 100 * 3 / 6
        assert metrics["val/top5"] == 100.0  # 3 classes: top-k is capped at 3
        assert metrics["val/loss"] == pytest.approx(single["val/loss"], rel=1e-12)


# ---------------------------------------------------------------- segmentation mIoU


def oracle_miou(predicted: np.ndarray, targets: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """The standard protocol by hand: confusion matrix without ignored pixels -> IoU per class -> mean over the
    classes whose union is > 0."""
    keep = targets != IGNORE_INDEX
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets[keep], predicted[keep]), 1)
    intersection = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = np.full(num_classes, np.nan)
    iou[union > 0] = intersection[union > 0] / union[union > 0]
    return float(np.nanmean(iou)), iou


def test_miou_averages_present_classes_and_skips_ignored_pixels() -> None:
    # 5 classes. Class 3 is predicted only on ignored pixels (so absent), class 4 only predicted (IoU 0, counted).
    targets = torch.tensor([[0, 0, 0, 1, 1, 2, 2, IGNORE_INDEX, IGNORE_INDEX, 0, 1]])
    predicted = torch.tensor([[0, 0, 2, 1, 2, 2, 2, 3, 0, 4, 1]])
    miou, iou = mean_iou(predicted, targets, num_classes=5)
    # class 0: TP 2, union 4 (4 target + 2 predicted - 2); class 1: TP 2, union 3; class 2: TP 2, union 4;
    # class 4: TP 0, union 1; class 3: union 0 -> left out. The study's 151-class mean would divide by 5 (1/3).
    np.testing.assert_allclose(iou, [1 / 2, 2 / 3, 1 / 2, np.nan, 0.0], rtol=1e-6)
    assert miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2 + 0) / 4, rel=1e-6)
    oracle, oracle_iou = oracle_miou(predicted.numpy(), targets.numpy(), 5)
    assert miou == pytest.approx(oracle, rel=1e-6)
    np.testing.assert_allclose(iou, oracle_iou, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_the_oracle_on_ade_style_labels_with_absent_classes(seed: int) -> None:
    # 150 ADE20K classes, label 0 = "other" (ignored); the labels use 40 classes, the predictions 60 (partly other).
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randperm(150, generator=generator)
    labels = torch.cat([torch.zeros(1, dtype=torch.long), classes[:40] + 1])[
        torch.randint(41, (6, 20, 30), generator=generator)
    ]
    targets = to_targets(labels)
    predicted = classes[20:80][torch.randint(60, (6, 20, 30), generator=generator)]
    hits = torch.rand(6, 20, 30, generator=generator) < 0.4  # some pixels right, so IoUs are not all ~0
    predicted = torch.where(hits & (targets != IGNORE_INDEX), targets, predicted)
    miou, iou = mean_iou(predicted, targets, num_classes=150)
    oracle, oracle_iou = oracle_miou(predicted.numpy(), targets.numpy(), 150)
    assert np.isnan(oracle_iou).sum() > 50  # many classes absent: averaging over all 150 would differ
    assert miou == pytest.approx(oracle, rel=1e-6)
    np.testing.assert_allclose(iou, oracle_iou, rtol=1e-6)
    assert abs(np.nan_to_num(oracle_iou).mean() - oracle) > 0.05


def test_iou_metrics_accumulate_over_chunks_as_one_pass() -> None:
    generator = torch.Generator().manual_seed(3)
    targets = torch.randint(6, (8, 10, 10), generator=generator)
    targets[targets == 5] = IGNORE_INDEX
    predicted = torch.randint(5, (8, 10, 10), generator=generator)
    metrics = iou_metrics(5)
    for chunk in range(0, 8, 3):
        metrics.update(predicted[chunk : chunk + 3], targets[chunk : chunk + 3])
    assert metrics.compute()["miou"].item() == pytest.approx(oracle_miou(predicted.numpy(), targets.numpy(), 5)[0])
