"""Benchmark: segmentation heads trained one by one (the loop before issue 9) against all together (seg_heads.py).

Both train the same heads on the same small random features in one run: the linear head and, with
--registers, the last-block variants (a DeiT-III-S-like block), for every seed and head learning rate. One by
one: per head, `train_segmenter` over host-cached float16 features moved minibatch by minibatch, then
`evaluate_segmenter` (torchmetrics on the host). Together: `segmentation_rows` (features moved to the device once,
every head stepped on each minibatch, mIoU from a confusion matrix on the device). Times include the evaluation;
the together time includes moving the features to the device. Prints times and ratios side by side.

    .venv/bin/python benchmarks/bench_seg_heads.py [--device cuda] [--images 32] [--epochs 2] [--registers 0 1 2 4]
        [--json benchmarks/results/seg_heads.json]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from output import write_json  # this folder (the script's own directory is on sys.path)
from timm.models.vision_transformer import Block
from torch import nn

from analysis.seg_heads import segmentation_rows
from analysis.segmentation import (
    HeadSettings,
    LastBlockSegmenter,
    LinearSegmenter,
    evaluate_segmenter,
    train_segmenter,
)


@dataclass(frozen=True)
class Settings:
    """The ProbeSettings fields segmentation_rows reads."""

    seeds: tuple[int, ...]
    seg_head: HeadSettings
    seg_block: HeadSettings
    seg_registers: tuple[int, ...]
    seg_lrs: tuple[float, ...]


class TwoBlocks(nn.Module):
    """Stands in for the frozen model: segmentation_rows reads its last block and final norm."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(channels, heads) for _ in range(2)])
        self.norm = nn.LayerNorm(channels)


def one_by_one(cached, model, grid, classes, settings: Settings, device) -> float:
    """Seconds for the loop before issue 9: every (variant, lr, seed) trained and evaluated alone."""
    masks_train, masks_test = cached["masks"]
    channels = cached["patches"][0].shape[-1]
    jobs = [("patches", settings.seg_head, lambda: LinearSegmenter(channels, classes))]
    for count in settings.seg_registers:
        make = lambda r=count: LastBlockSegmenter(model.blocks[-1], model.norm, 1, r, classes)
        jobs.append(("block_inputs", settings.seg_block, make))
    start = time.perf_counter()
    for inputs, head, make in jobs:
        train_x, test_x = cached[inputs]
        for lr in settings.seg_lrs:
            for seed in settings.seeds:
                torch.manual_seed(seed)  # the head's (and new registers') initial weights, as the old loop
                trained = train_segmenter(make().to(device), train_x, masks_train, grid, replace(head, lr=lr), seed)
                evaluate_segmenter(trained, test_x, masks_test, grid, classes)
    _sync(device)
    return time.perf_counter() - start


def together(cached, model, grid, classes, settings: Settings, device) -> float:
    start = time.perf_counter()
    segmentation_rows(cached, model, 1, grid, classes, settings, device)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=32, help="training images (a quarter as many test images)")
    parser.add_argument("--grid", type=int, default=8, help="patches per side")
    parser.add_argument("--patch", type=int, default=16, help="label pixels per patch side")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--registers", type=int, nargs="*", default=[0, 1, 2, 4])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    grid, tokens = (args.grid, args.grid), args.grid**2
    model = TwoBlocks(args.channels, max(1, args.channels // 64)).to(args.device).eval()
    size = args.grid * args.patch
    train, test = args.images, max(1, args.images // 4)
    cached = {
        "patches": tuple(torch.randn(n, tokens, args.channels).half() for n in (train, test)),
        "masks": tuple(torch.randint(0, args.classes + 1, (n, size, size), dtype=torch.uint8) for n in (train, test)),
        "block_inputs": tuple(torch.randn(n, 1 + tokens, args.channels).half() for n in (train, test)),
    }
    head = HeadSettings(epochs=args.epochs, batch_size=32, label_stride=4)
    print(
        f"device {args.device}, {torch.get_num_threads()} threads; {train} train + {test} test images, "
        f"{args.grid}x{args.grid} patches, {size}x{size} labels (stride 4 in training), C={args.channels}, "
        f"K={args.classes}, {args.epochs} epochs, seeds {args.seeds}, lrs {args.lrs}"
    )
    results = {"setup": {**vars(args), "json": None, "threads": torch.get_num_threads()}, "cases": []}
    print(f"{'heads':<44} {'one by one s':>13} {'together s':>11} {'ratio':>7}")
    cases = [("linear", ())] + ([("linear + last block x registers", tuple(args.registers))] if args.registers else [])
    for name, registers in cases:
        settings = Settings(tuple(args.seeds), head, head, registers, tuple(args.lrs))
        count = len(args.seeds) * len(args.lrs) * (1 + len(registers))
        together(cached, model, grid, args.classes, replace(settings, seeds=settings.seeds[:1]), args.device)  # warm-up
        slow = one_by_one(cached, model, grid, args.classes, settings, args.device)
        fast = together(cached, model, grid, args.classes, settings, args.device)
        print(f"{f'{name} ({count} heads)':<44} {slow:>13.2f} {fast:>11.2f} {slow / fast:>6.1f}x")
        results["cases"].append({"heads": name, "count": count, "one_by_one_s": slow, "together_s": fast})
    write_json(args.json, results)


if __name__ == "__main__":
    main()
