"""Benchmark: vitreg's row taps against the study-style way of getting attention (explicit path, full maps kept).

Each variant runs in a fresh subprocess on the same model and images; the script prints the peak resident
memory a forward adds (Linux VmHWM, reset before each repeat; the smallest of the repeats, since the allocator
adds noise), the attention data kept, wall time per forward (median), and the ratios side by side.

    .venv/bin/python benchmarks/bench_taps.py [--model vit_small_patch14_reg4_dinov2] [--img-size 518]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "row_taps", "full_maps")


def measure(variant: str, model_name: str, img_size: int, batch: int, repeats: int) -> dict[str, float]:
    import torch

    import vitreg

    torch.manual_seed(0)
    model = vitreg.build_model(model_name, img_size=img_size).eval()
    images = torch.randn(batch, 3, img_size, img_size)
    kept_bytes = 0
    maps: list[torch.Tensor] = []
    if variant == "full_maps":  # the study's way: timm's explicit path on every block, each (T x T) map kept
        for block in model.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(lambda module, inputs, output: maps.append(output))
    seconds, peaks = [], []
    for _ in range(repeats):
        maps.clear()
        resident = _status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident memory, to now
        start = time.perf_counter()
        with torch.no_grad():
            if variant == "plain":
                model(images)
            elif variant == "row_taps":
                taps = vitreg.run_taps(model, images, layers=None, attention_layers=None)
                kept_bytes = taps.cls_attention.nbytes + taps.register_attention.nbytes
                del taps
            else:
                model(images)
                kept_bytes = sum(m.nbytes for m in maps)
        seconds.append(time.perf_counter() - start)
        peaks.append(_status_mib("VmHWM") - resident)
    return {
        "seconds": statistics.median(seconds),
        "peak_mib_above_model": min(peaks),
        "attention_mib": kept_bytes / 2**20,
    }


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_reg4_dinov2")
    parser.add_argument("--img-size", type=int, default=518)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.model, args.img_size, args.batch, args.repeats)))
        return

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model]
        command += ["--img-size", str(args.img_size), "--batch", str(args.batch), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    print(f"{args.model} at {args.img_size}px, batch {args.batch}, attention of every layer")
    print(f"{'variant':<10} {'s/forward':>10} {'peak MiB':>10} {'attention MiB':>14}")
    for variant, row in results.items():
        print(
            f"{variant:<10} {row['seconds']:>10.3f} {row['peak_mib_above_model']:>10.1f} {row['attention_mib']:>14.2f}"
        )
    rows, full = results["row_taps"], results["full_maps"]
    print(f"time   row_taps / plain     = {rows['seconds'] / results['plain']['seconds']:.2f}")
    print(f"time   full_maps / row_taps = {full['seconds'] / rows['seconds']:.2f}")
    peak_ratio = full["peak_mib_above_model"] / max(rows["peak_mib_above_model"], 1)
    print(f"memory full_maps / row_taps = {peak_ratio:.1f} (peak)")
    print(f"kept   full_maps / row_taps = {full['attention_mib'] / rows['attention_mib']:.0f} (attention data)")


if __name__ == "__main__":
    main()
