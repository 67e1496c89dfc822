"""What rank 0 measures on fixed validation images every epoch: the artifact metrics of the last block, and the
end-of-run figures."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

import vitreg
from train.config import TrainConfig
from train.data import build_loader
from train.figures import attention_figure, norm_histogram

HIGH_NORM_FACTOR = 3.0  # artifact/high_norm_fraction: patch tokens above 3x their image's median norm


def probe_images(config: TrainConfig, device: torch.device) -> torch.Tensor:
    """`artifact_images` validation images evenly spaced in file order (so across classes), uint8 (B, 3, H, W).

    The validation split read as "rank 0 of `stride`" is samples 0, stride, 2 x stride, ... (see train.data).
    """
    data = replace(config.data, batch_size=config.artifact_images)
    size = build_loader(data, "val", rank=0, world_size=1, device=device).num_samples
    stride = max(1, size // config.artifact_images)
    images, _ = next(iter(build_loader(data, "val", rank=0, world_size=stride, device=device)))
    return images


@torch.no_grad()
def artifact_metrics(model: VisionTransformer, images: torch.Tensor) -> tuple[dict[str, float], vitreg.Taps]:
    """Artifact measures of the last block on normalised `images` (B, 3, H, W), and the taps they came from.

    - outlier_fraction: patch tokens flagged by `detect_artifacts(method="auto")` (no threshold or percentage);
    - high_norm_fraction: patch tokens above 3x their image's median norm (a fixed, detector-free measure);
    - max_median_ratio: largest patch norm over the median patch norm;
    - cls_attention_entropy: entropy of the head-mean CLS attention over patches, / log(patches) (1 = uniform);
    - cls_attention_to_registers: share of the CLS attention that goes to registers.
    """
    was_training = model.training
    model.eval()
    taps = vitreg.run_taps(model, images, layers=[-1], attention_layers=[-1])
    model.train(was_training)
    norms = taps.patch_norms[0].float()  # (B, N)
    report = vitreg.detect_artifacts(norms, method="auto")
    high = (norms > HIGH_NORM_FACTOR * norms.median(dim=1, keepdim=True).values).float().mean()
    attention = taps.cls_attention[0].float().mean(dim=1)  # (B, T): head-mean CLS row
    prefix = taps.num_prefix_tokens
    patches = attention[:, prefix:] / attention[:, prefix:].sum(dim=1, keepdim=True)  # (B, N), sums to 1
    entropy = -(patches * patches.clamp_min(1e-12).log()).sum(dim=1) / math.log(patches.shape[1])
    metrics = {
        "artifact/outlier_fraction": report.outlier_fraction,
        "artifact/high_norm_fraction": high.item(),
        "artifact/max_median_ratio": report.max_median_ratio,
        "artifact/cls_attention_entropy": entropy.mean().item(),
        "artifact/cls_attention_to_registers": attention[:, 1:prefix].sum(dim=1).mean().item(),
    }
    return metrics, taps


def draw_figures(taps: vitreg.Taps, images: torch.Tensor, count: int, title: str, directory: Path) -> list[Path]:
    """The end-of-run figures of the first tapped layer: attention maps of `count` images, norm histogram."""
    directory.mkdir(parents=True, exist_ok=True)
    layer = taps.layers[0]
    return [
        attention_figure(taps, images[:count], layer, directory / "attention.png", title),
        norm_histogram(taps, layer, directory / "norm_histogram.png", title),
    ]
