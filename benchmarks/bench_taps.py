"""Benchmark: vitreg's row taps against the study-style way of getting attention (explicit path, full maps kept),
swept over resolutions, with the growth exponent in tokens fitted for time, peak memory and attention kept.

Variants, each run in a fresh subprocess per (variant, resolution) on the same model and images:
- plain: the model's forward (timm's fused attention), nothing recorded: the floor.
- row_taps: `vitreg.run_taps` recording CLS and register attention rows of every layer: O(layers x heads x T).
- full_maps: timm's explicit attention on every block with each (T x T) map kept, as the study's code does:
  O(layers x heads x T^2).

Per point: wall time per forward (the fastest of the repeats, after one untimed warm-up forward: on a shared
machine the other load only ever adds time, so the minimum is the best estimate of the cost), the peak resident
memory one forward adds above what was resident before it (Linux VmHWM, measured in a separate forward after
the timing, with glibc told to give every large buffer back to the system on free, so the peak is the live
tensors' and not the allocator's history), and the attention data kept (computed from the tensors' sizes).
Then the exponent b of y = c * T^b by least squares on log y against log T, for each variant and quantity.
Target (issue 9): about 1 for the taps' memory, about 2 for the full maps'. Time grows faster than linearly
for every variant at large T, since attention's compute is quadratic however little of it is kept.

    .venv/bin/python benchmarks/bench_taps.py                       # 224, 336, 448, 518 px (about 2 minutes)
    .venv/bin/python benchmarks/bench_taps.py --full                # 224 ... 952 px (needs about 10 GB for the maps)
    .venv/bin/python benchmarks/bench_taps.py --sizes 224 448 --json benchmarks/results/taps.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from output import machine, write_json  # this folder (the script's own directory is on sys.path)

VARIANTS = ("plain", "row_taps", "full_maps")
DEFAULT_SIZES = (224, 336, 448, 518)
FULL_SIZES = (224, 336, 448, 518, 672, 952)
QUANTITIES = ("seconds", "peak_mib", "attention_mib")
TARGETS = {"row_taps": "memory ~1", "full_maps": "memory ~2", "plain": "-"}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fit_exponent(tokens: list[float], values: list[float]) -> float | None:
    """b of values = c * tokens**b, by least squares on the logs; None when fewer than 2 positive points."""
    pairs = [(n, y) for n, y in zip(tokens, values, strict=True) if n > 0 and y is not None and y > 0]
    if len(pairs) < 2 or len({n for n, _ in pairs}) < 2:
        return None
    log_n, log_y = np.log([n for n, _ in pairs]), np.log([y for _, y in pairs])
    slope, _ = np.polyfit(log_n, log_y, 1)
    return float(slope)


def model_geometry(model_name: str, img_size: int) -> dict[str, int]:
    """Tokens, depth and heads of `model_name` at `img_size`, from a model on the meta device (no memory)."""
    import torch

    import vitreg

    with torch.device("meta"):
        model = vitreg.build_model(model_name, img_size=img_size)
    rows, cols = model.patch_embed.grid_size
    return {
        "tokens": rows * cols + model.num_prefix_tokens,
        "depth": len(model.blocks),
        "heads": model.blocks[0].attn.num_heads,
    }


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _release_freed_memory() -> None:
    """From now on glibc returns every buffer of 64 KiB or more to the system when it is freed, and gives back
    what it holds now, so that VmHWM - VmRSS measures live tensors, not memory the allocator kept from before."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)


def measure(variant: str, model_name: str, img_size: int, batch: int, repeats: int, threads: int) -> dict[str, float]:
    """One point, in this process: time per forward, peak memory above the model, attention kept."""
    import torch

    import vitreg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vitreg.build_model(model_name, img_size=img_size).eval()
    images = torch.randn(batch, 3, img_size, img_size)
    maps: list[torch.Tensor] = []
    if variant == "full_maps":  # the study's way: timm's explicit path on every block, each (T x T) map kept
        for block in model.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(lambda module, inputs, output: maps.append(output))

    def forward() -> int:
        """One forward; returns the bytes of attention it keeps (alive until the caller drops them)."""
        maps.clear()
        with torch.no_grad():
            if variant == "plain":
                model(images)
                return 0
            if variant == "row_taps":
                taps = vitreg.run_taps(model, images, layers=None, attention_layers=None)
                return taps.cls_attention.nbytes + taps.register_attention.nbytes
            model(images)
            return sum(m.nbytes for m in maps)

    forward()  # warm-up: one-off costs (thread pools, first-touch of the weights) out of the timing
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        kept_bytes = forward()
        seconds.append(time.perf_counter() - start)
    maps.clear()
    _release_freed_memory()
    resident = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident memory, to now
    forward()
    peak = _status_mib("VmHWM") - resident
    return {"seconds": min(seconds), "peak_mib": peak, "attention_mib": kept_bytes / 2**20}


def run_point(variant: str, model_name: str, img_size: int, batch: int, repeats: int, threads: int) -> dict[str, float]:
    """`measure` in a fresh interpreter, so no point inherits another's allocator state or caches."""
    command = [sys.executable, __file__, "--variant", variant, "--model", model_name, "--sizes", str(img_size)]
    command += ["--batch", str(batch), "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} at {img_size}px failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_maps_gib(geometry: dict[str, int], batch: int) -> float:
    """Attention kept by full_maps (float32 maps of every layer), plus one layer's transient logits."""
    per_layer = batch * geometry["heads"] * geometry["tokens"] ** 2 * 4
    return (geometry["depth"] + 2) * per_layer / 2**30


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def sweep(
    model_name: str, sizes: list[int], variants: list[str], batch: int, repeats: int, threads: int, max_map_gib: float
) -> dict:
    """Every (resolution, variant) point, the fitted exponents and a note of what was skipped."""
    points: list[dict] = []
    for img_size in sizes:
        geometry = model_geometry(model_name, img_size)
        for variant in variants:
            point = {"img_size": img_size, "tokens": geometry["tokens"], "variant": variant}
            need = full_maps_gib(geometry, batch)
            if variant == "full_maps" and need > max_map_gib:
                point["skipped"] = f"needs about {need:.2f} GiB for the maps; limit {max_map_gib:.2f} GiB"
            else:
                point.update(run_point(variant, model_name, img_size, batch, repeats, threads))
            points.append(point)
            print(_point_line(point), flush=True)
    exponents = {}
    for variant in variants:
        rows = [p for p in points if p["variant"] == variant and "skipped" not in p]
        exponents[variant] = {q: fit_exponent([p["tokens"] for p in rows], [p[q] for p in rows]) for q in QUANTITIES}
    return {"points": points, "exponents": exponents}


def _point_line(point: dict) -> str:
    head = f"  {point['img_size']:>4}px {point['tokens']:>6} tokens {point['variant']:<10}"
    if "skipped" in point:
        return f"{head} skipped: {point['skipped']}"
    return (
        f"{head} {point['seconds']:>8.3f} s {point['peak_mib']:>9.1f} MiB peak {point['attention_mib']:>10.2f} MiB kept"
    )


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec` (e.g. "8.3f"), or "-" right-aligned to the same width when there is none."""
    if value is None or math.isnan(value):
        return "-".rjust(int(spec.split(".")[0]))
    return format(value, spec)


def report(results: dict) -> str:
    """The table (one row per resolution, variants side by side), ratios, and the fitted exponents."""
    by_key = {(p["img_size"], p["variant"]): p for p in results["points"]}
    sizes = sorted({p["img_size"] for p in results["points"]})
    lines = [
        f"{results['model']}, batch {results['batch']}, {results['threads']} thread(s), attention of every layer; "
        f"s = seconds per forward, peak = MiB above the model, kept = attention MiB",
        f"{'px':>5} {'tokens':>7} | {'plain s':>8} {'peak':>7} | {'taps s':>8} {'peak':>7} {'kept':>7} | "
        f"{'full s':>8} {'peak':>8} {'kept':>9} | {'full/taps s':>11} {'kept':>6}",
    ]
    for size in sizes:
        plain, taps, full = (by_key.get((size, v), {}) for v in VARIANTS)
        time_ratio = full["seconds"] / taps["seconds"] if "seconds" in full and "seconds" in taps else None
        kept = "attention_mib" in full and taps.get("attention_mib")
        kept_ratio = full["attention_mib"] / taps["attention_mib"] if kept else None
        tokens = next(p["tokens"] for p in results["points"] if p["img_size"] == size)
        cells = [
            f"{size:>5} {tokens:>7} |",
            _fmt(plain.get("seconds"), "8.3f"),
            _fmt(plain.get("peak_mib"), "7.1f") + " |",
            _fmt(taps.get("seconds"), "8.3f"),
            _fmt(taps.get("peak_mib"), "7.1f"),
            _fmt(taps.get("attention_mib"), "7.2f") + " |",
            _fmt(full.get("seconds"), "8.3f"),
            _fmt(full.get("peak_mib"), "8.1f"),
            _fmt(full.get("attention_mib"), "9.1f") + " |",
            _fmt(time_ratio, "11.2f"),
            _fmt(kept_ratio, "6.0f"),
        ]
        lines.append(" ".join(cells))
    lines += ["", "growth exponent b of y = c * tokens^b (log-log least squares)"]
    lines.append(f"{'variant':<10} {'time':>6} {'peak mem':>9} {'kept attn':>10}   target (issue 9)")
    for variant, fitted in results["exponents"].items():
        lines.append(
            f"{variant:<10} {_fmt(fitted['seconds'], '6.2f')} {_fmt(fitted['peak_mib'], '9.2f')}"
            f" {_fmt(fitted['attention_mib'], '10.2f')}   {TARGETS[variant]}"
        )
    for point in results["points"]:
        if point["variant"] == "full_maps" and "peak_mib" in point and point["peak_mib"] < 0.9 * point["attention_mib"]:
            lines.append(
                f"WARNING: at {point['img_size']}px the measured peak ({point['peak_mib']:.0f} MiB) is below the maps "
                f"kept ({point['attention_mib']:.0f} MiB): the resident-memory measure is not trustworthy here"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_reg4_dinov2", help="timm name (built pretrained=False)")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"resolutions in px (default {DEFAULT_SIZES})")
    parser.add_argument("--full", action="store_true", help=f"the full sweep {FULL_SIZES}")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per point (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per point (default 1: steadier on a shared machine)"
    )
    parser.add_argument(
        "--max-map-gib", type=float, help="skip full_maps points needing more (default: half of MemAvailable)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one point: the subprocess's job
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.model, args.sizes[0], args.batch, args.repeats, args.threads)))
        return
    if min(args.batch, args.repeats, args.threads) < 1:
        parser.error("--batch, --repeats and --threads must be >= 1")
    sizes = sorted(set(args.sizes or (FULL_SIZES if args.full else DEFAULT_SIZES)))
    max_map_gib = args.max_map_gib if args.max_map_gib is not None else available_gib() / 2
    variants = [v for v in VARIANTS if v in args.variants]
    print(f"sweeping {sizes} px, variants {', '.join(variants)} (one fresh process per point)", flush=True)
    started = time.perf_counter()
    results = {
        "benchmark": "taps",
        "model": args.model,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "sizes": sizes,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **sweep(args.model, sizes, variants, args.batch, args.repeats, args.threads, max_map_gib),
    }
    results["wall_s"] = time.perf_counter() - started
    print()
    print(report(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
