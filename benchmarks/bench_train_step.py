"""Benchmark: one fine-tuning optimiser step of DeiT-III Small, three ways, measured side by side in one run.

One step = forward + cross-entropy + the study's L2-norm penalty on the last block's patch tokens (captured by a
hook, as train/epoch.py) + backward + AdamW step over the trainable parameters. Variants, at each number k of frozen
blocks, all from the same random weights (no download; speed does not depend on the values):
- input: ours today, the study's trainable set: registers at the input; position embedding, CLS, registers,
  blocks >= k, norm, head train, so autograd runs back through all k frozen blocks; timm's fused attention.
- after_frozen: `register_entry="after_frozen"`: the prefix (embeddings, blocks < k) frozen and run under
  `torch.no_grad()`, registers inserted at block k; blocks >= k, norm, head, registers train; fused attention.
- naive: the study code's way: the input variant with the explicit attention path in every block
  (`block.attn.fused_attn = False`, the (T x T) softmax materialised) and autograd through everything.

The variants are interleaved (every repeat times each (k, variant) once, in turn), after an untimed warm-up step
each; the median over repeats is reported, so slow phases of a shared machine fall on every variant alike, and the
fastest repeat beside it (other load only ever adds time, so on a busy machine the minimum is the steadier estimate
of the cost). Target (issue 9): after_frozen >= 1.5x input at k=10 on CPU.

    .venv/bin/python benchmarks/bench_train_step.py                           # k in {0, 8, 10, 11}, batch 16, 224 px
    .venv/bin/python benchmarks/bench_train_step.py --frozen 10 --repeats 5 --json benchmarks/results/step.json
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from output import write_json  # this folder (the script's own directory is on sys.path)
from torch import nn

import vitreg

VARIANTS = ("input", "after_frozen", "naive")


def build_variant(
    variant: str, model_name: str, registers: int, frozen: int, img_size: int, weights: dict
) -> nn.Module:
    """The model of `variant` with `weights` loaded (the same for every variant)."""
    entry = "after_frozen" if variant == "after_frozen" else "input"
    model = vitreg.build_model(
        model_name, img_size=img_size, registers=registers, frozen_blocks=frozen, register_entry=entry
    )
    model.load_state_dict(weights)
    if variant == "naive":
        for block in model.blocks:
            block.attn.fused_attn = False  # timm's explicit path: q k^T, softmax, @ v, as the study's code
    return model.train()


class Step:
    """One training step of a model: forward, CE + lambda x penalty, backward, AdamW."""

    def __init__(self, model: nn.Module, penalty_lambda: float = 0.01) -> None:
        self.model = model
        self.capture = vitreg.BlockOutputCapture(model, -1)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.penalty_lambda = penalty_lambda

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        logits = self.model(images)
        penalty = vitreg.l2_norm_penalty(self.capture.pop(), self.model.num_prefix_tokens)
        loss = F.cross_entropy(logits, labels) + self.penalty_lambda * penalty
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def timed(step: Step, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = vitreg.build_model(args.model, img_size=args.img_size, registers=args.registers)
    weights = reference.state_dict()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, reference.num_classes, (args.batch_size,), device=device)
    del reference

    steps: dict[tuple[int, str], Step] = {}
    trainable: dict[tuple[int, str], int] = {}
    for frozen in args.frozen:
        for variant in args.variants:
            model = build_variant(variant, args.model, args.registers, frozen, args.img_size, weights).to(device)
            steps[frozen, variant] = Step(model)
            trainable[frozen, variant] = vitreg.trainable_parameters(model)
    for _ in range(args.warmup):
        for step in steps.values():
            step(images, labels)
    seconds: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    for repeat in range(args.repeats):
        for key, step in steps.items():
            seconds[key].append(timed(step, images, labels, device))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    rows = []
    for frozen in args.frozen:
        median = {v: statistics.median(seconds[frozen, v]) for v in args.variants}
        best = {v: min(seconds[frozen, v]) for v in args.variants}
        for variant in args.variants:
            rows.append(
                {
                    "frozen_blocks": frozen,
                    "variant": variant,
                    "trainable_parameters": trainable[frozen, variant],
                    "median_s": median[variant],
                    "images_per_s": args.batch_size / median[variant],
                    "vs_input": median["input"] / median[variant] if "input" in median else None,
                    "vs_naive": median["naive"] / median[variant] if "naive" in median else None,
                    "best_images_per_s": args.batch_size / best[variant],
                    "best_vs_input": best["input"] / best[variant] if "input" in best else None,
                    "best_vs_naive": best["naive"] / best[variant] if "naive" in best else None,
                    "seconds": seconds[frozen, variant],
                }
            )
    return {
        "benchmark": "train_step",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [
        f"{settings['model']}, {settings['img_size']} px, batch {settings['batch_size']}, {settings['registers']} "
        f"registers, {result['machine']['device']} ({result['machine']['torch_threads']} threads), median of "
        f"{settings['repeats']}, {result['date']}",
        "",
        "| frozen k | variant | trainable | images/s (median) | x input | x naive | images/s (best) | x input "
        "| x naive |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ratio = lambda value: "" if value is None else f"{value:.2f}"
        lines.append(
            f"| {row['frozen_blocks']} | {row['variant']} | {row['trainable_parameters']:,} | "
            f"{row['images_per_s']:.2f} | {ratio(row['vs_input'])} | {ratio(row['vs_naive'])} | "
            f"{row['best_images_per_s']:.2f} | {ratio(row['best_vs_input'])} | {ratio(row['best_vs_naive'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit3_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--frozen", type=int, nargs="+", default=[0, 8, 10, 11], help="frozen blocks k")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per (k, variant), interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per (k, variant) first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats >= 1, --warmup >= 0, --batch-size >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(markdown(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
