"""GPU benchmark, one command, about 7.5 minutes on one H100/H200: writes gpu.json and gpu.md to --out.

Sections, in the order they run (each checks the global deadline first and is skipped, saying so, when its
estimate no longer fits; results are written after every section, so a killed run still leaves what it had):
(a) model-only fine-tuning throughput of DeiT-III S at 224 px, k=10 frozen blocks, 4 registers, bf16 autocast,
    on synthetic uint8 tensors already on the device: one step = ImageNet normalisation on the device, forward,
    cross-entropy (label smoothing 0.1) + 0.01 x the L2-norm penalty on the last block (vitreg's capture hook),
    backward, fused AdamW; register entry "input" (the study's) and "after_frozen" (prefix under no_grad),
    eager first; the torch.compile rows run last (compilation takes minutes).
(c) model FLOP utilisation of each row: FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode
    (matmuls, convolutions and CUDA's attention kernels, forward and backward as executed; it has no formula
    for the CPU attention kernel, so a CPU smoke run leaves attention out), MFU = achieved FLOP/s / the peak dense bf16
    FLOP/s (--peak-tflops; default from the device name: H100 SXM and H200 989, A100 312).
(b) end to end: generated 500x375 JPEGs -> the project's .beton writer -> the project's FFCV training loader
    (crop-and-flip, uint8 batches on the device) -> the same step, against the same step on synthetic tensors
    and against the loader alone, to separate the loader from the model. Target (issue 9): >= 6,000 images/s
    per H100 at k=10 (the study: about 1,800 images/s on an A100).
(d) DINOv2-g (vit_giant_patch14_reg4_dinov2, random weights) at 952 px: plain forward, vitreg.run_taps (CLS and
    register rows of every layer) and, when it fits in memory, the full attention maps of every layer; time per
    forward and torch.cuda.max_memory_allocated, bf16 autocast, inference mode.

    .venv/bin/python benchmarks/gpu.py [--out benchmarks/results] [--deadline-s 450] [--peak-tflops 989]
    .venv/bin/python benchmarks/gpu.py --allow-cpu --smoke      # the code paths on CPU with tiny sizes (< 1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_data, this folder's JPEG generator

import vitreg
from train.data import DataConfig, build_loader, normalize_on_device, write_beton

TARGET_IMAGES_PER_S = 6000.0  # issue 9, per H100, end to end at k=10
STUDY_A100_IMAGES_PER_S = 1800.0
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM
ENTRIES = ("input", "after_frozen")


@dataclass(frozen=True)
class Sizes:
    """What each section runs; FULL is the benchmark, SMOKE the same code paths in seconds on a CPU."""

    model: str = "deit3_small_patch16_224"
    img_size: int = 224
    batch: int = 256
    frozen: int = 10
    registers: int = 4
    arch: dict = field(default_factory=dict)
    taps_model: str = "vit_giant_patch14_reg4_dinov2"
    taps_img_size: int = 952
    taps_batch: int = 1
    taps_arch: dict = field(default_factory=dict)
    jpegs: int = 8192  # 32 batches of 256 an epoch
    jpeg_width: int = 500
    jpeg_height: int = 375
    loader_workers: int = min(16, os.cpu_count() or 1)
    timed_s: float = 6.0  # timed duration of each throughput measurement
    warmup_steps: int = 3
    minimum_steps: int = 3
    compile_backend: str = "inductor"


FULL = Sizes()
SMOKE = Sizes(
    img_size=32, batch=8, frozen=2, arch={"depth": 4, "embed_dim": 64, "num_heads": 2}, taps_model=FULL.taps_model,
    taps_img_size=56, taps_arch={"depth": 2, "embed_dim": 96, "num_heads": 2}, jpegs=32, jpeg_width=100,
    jpeg_height=75, loader_workers=1, timed_s=0.1, compile_backend="eager", warmup_steps=1, minimum_steps=1,
)  # fmt: skip
# Seconds each section is expected to take on an H100 (compilation of a DeiT-S training step: about a minute).
ESTIMATE_S = {"model": 25.0, "data": 100.0, "e2e": 40.0, "taps": 90.0, "compile": 150.0}


class Clock:
    """The global deadline; sections ask it whether their estimate still fits."""

    def __init__(self, deadline_s: float) -> None:
        self.started = time.perf_counter()
        self.deadline_s = deadline_s

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.started)

    def skip_reason(self, need_s: float) -> str | None:
        left = self.left()
        return None if left >= need_s else f"skipped: {left:.0f} s left of the deadline, needs about {need_s:.0f} s"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; fp32 on CPU, as the training does (CPU autocast is slow)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def supports_register_entry() -> bool:
    return "register_entry" in inspect.signature(vitreg.build_model).parameters


class Step:
    """One fine-tuning step as train/epoch.py takes it (without its EMA, clipping and logging)."""

    def __init__(self, sizes: Sizes, entry: str, device: torch.device, compile_backend: str | None) -> None:
        entry_kwargs = {"register_entry": entry} if supports_register_entry() else {}
        with device:  # parameters are made (and initialised) on the device: the giant one would take minutes on CPU
            self.model = vitreg.build_model(
                sizes.model, img_size=sizes.img_size, registers=sizes.registers, frozen_blocks=sizes.frozen,
                num_classes=1000, **entry_kwargs, **sizes.arch,
            ).train()  # fmt: skip
        self.capture = vitreg.BlockOutputCapture(self.model, -1)
        self.net = torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
        self.device = device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        inputs = normalize_on_device(images)
        with autocast(self.device):
            logits = self.net(inputs)
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
            penalty = vitreg.l2_norm_penalty(self.capture.pop(), self.model.num_prefix_tokens)
            loss = ce + 0.01 * penalty
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def synthetic_batch(sizes: Sizes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(
        0, 256, (sizes.batch, 3, sizes.img_size, sizes.img_size), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, 1000, (sizes.batch,), generator=generator)
    return images.to(device), labels.to(device)


def images_per_s(run_batches: Callable[[], int], device: torch.device, timed_s: float, minimum_runs: int) -> float:
    """Images per second of `run_batches` (returns the images it processed), repeated for at least `timed_s`."""
    sync(device)
    started = time.perf_counter()
    images = runs = 0
    while runs < minimum_runs or time.perf_counter() - started < timed_s:
        images += run_batches()
        runs += 1
    sync(device)
    return images / (time.perf_counter() - started)


def count_step_flops(step: Step, images: torch.Tensor, labels: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(images, labels)
    return int(counter.get_total_flops())


def step_flops_by_hand(model: Any, attention: bool) -> int:
    """FLOPs per image of one training step from the model's shapes, to check FlopCounterMode's count.

    2 FLOPs per multiply-add of every linear layer, the patch convolution and (if `attention`) q k^T and attn v.
    Forward: every block, at the token count it sees (a late-register prefix sees no registers). Backward, as
    autograd runs it: nothing for a prefix under no_grad; a frozen block that gradients pass through (to trainable
    position embedding, CLS or registers before it) computes input gradients (1x its linear layers, 2x its
    attention matmuls); a trainable block also weight gradients (2x, 2x); the head 2x; the patch convolution 1x
    if it trains (its input, the images, needs no gradient).
    """
    entry = vitreg.register_entry_block(model) if hasattr(vitreg, "register_entry_block") else None
    rows, cols = model.patch_embed.grid_size
    patches = rows * cols
    conv = 2 * patches * model.patch_embed.proj.weight.numel()
    total = conv * (2 if model.patch_embed.proj.weight.requires_grad else 1) + 3 * 2 * model.head.weight.numel()
    input_trains = any(p is not None and p.requires_grad for p in (model.pos_embed, model.cls_token, model.reg_token))
    for index, block in enumerate(model.blocks):
        in_prefix = entry is not None and index < entry
        tokens = patches + (1 if in_prefix else model.num_prefix_tokens)
        linear = 2 * tokens * sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        matmuls = 2 * 2 * tokens**2 * model.embed_dim if attention else 0
        trains = any(p.requires_grad for p in block.parameters())
        in_graph = not in_prefix and (trains or input_trains or (entry is not None and index >= entry))
        total += linear + matmuls
        if in_graph:
            total += (2 if trains else 1) * linear + 2 * matmuls
    return total


def measure_step(sizes: Sizes, step: Step, device: torch.device, flops: dict[str, int], entry: str) -> dict:
    """Sections (a) and (c) for one step: warm-up (compiled: the compilation), FLOPs of one step, images/s."""
    started = time.perf_counter()
    images, labels = synthetic_batch(sizes, device)
    for _ in range(sizes.warmup_steps):  # warm-up: kernels chosen, (compiled: graphs built)
        step(images, labels)
    sync(device)
    setup_s = time.perf_counter() - started
    if entry not in flops:  # counted on the eager model; a compiled step does the same arithmetic
        flops[entry] = count_step_flops(step, images, labels)

    def one() -> int:
        step(images, labels)
        return sizes.batch

    rate = images_per_s(one, device, sizes.timed_s, minimum_runs=sizes.minimum_steps)
    by_hand = step_flops_by_hand(step.model, attention=device.type == "cuda")  # CPU's SDPA is not counted
    return {
        "setup_s": setup_s,
        "gflop_per_image_by_hand": by_hand / 1e9,
        "counted_over_hand": flops[entry] / sizes.batch / by_hand,
        "images_per_s": rate,
        "ms_per_step": 1000 * sizes.batch / rate,
        "trainable_params": step.trainable_params,
        "gflop_per_image": flops[entry] / sizes.batch / 1e9,
        "achieved_tflops": flops[entry] * rate / sizes.batch / 1e12,
    }


def end_to_end(sizes: Sizes, step: Step, loader: Any, device: torch.device, synthetic: float) -> dict:
    """Section (b): the loader alone, then the loader feeding `step`, against `step` on synthetic tensors."""

    def loader_epoch() -> int:
        return sum(images.shape[0] for images, _ in loader)

    def training_epoch() -> int:
        seen = 0
        for images, labels in loader:
            step(images, labels)
            seen += images.shape[0]
        return seen

    loader_rate = images_per_s(loader_epoch, device, sizes.timed_s, minimum_runs=1)
    e2e_rate = images_per_s(training_epoch, device, sizes.timed_s, minimum_runs=1)
    return {
        "loader_images_per_s": loader_rate,
        "synthetic_images_per_s": synthetic,
        "end_to_end_images_per_s": e2e_rate,
        "end_to_end_over_synthetic": e2e_rate / synthetic,
        "end_to_end_over_target": e2e_rate / TARGET_IMAGES_PER_S,
        "end_to_end_over_study_a100": e2e_rate / STUDY_A100_IMAGES_PER_S,
    }


def make_loader(sizes: Sizes, folder: Path, device: torch.device) -> tuple[Any, dict]:
    """JPEGs -> .beton -> the FFCV training loader, with one untimed epoch (numba compiles the pipeline)."""
    from bench_data import write_jpegs

    started = time.perf_counter()
    processes = min(16, os.cpu_count() or 1) if sizes.jpegs > 256 else 1
    jpeg_bytes = write_jpegs(folder, sizes.jpegs, 10, sizes.jpeg_width, sizes.jpeg_height, processes=processes)
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # FFCV's writer shows a progress bar regardless
        write_beton(folder, "train", folder / "train.beton", num_workers=min(16, os.cpu_count() or 1), progress=False)
    config = DataConfig(
        backend="ffcv", path=folder, img_size=sizes.img_size, batch_size=sizes.batch, num_workers=sizes.loader_workers
    )
    loader = build_loader(config, "train", rank=0, world_size=1, device=device)
    sum(images.shape[0] for images, _ in loader)  # compile and warm
    info = {
        "jpegs": sizes.jpegs,
        "jpeg_kib_mean": jpeg_bytes / sizes.jpegs / 1024,
        "loader_workers": sizes.loader_workers,
    }
    return loader, {**info, "prepare_s": time.perf_counter() - started}


def taps_rows(sizes: Sizes, device: torch.device) -> list[dict]:
    """Section (d): plain forward, row taps and (if it fits) full maps of a large model at high resolution."""
    with device:
        model = vitreg.build_model(sizes.taps_model, img_size=sizes.taps_img_size, **sizes.taps_arch).eval()
    images = torch.randn(sizes.taps_batch, 3, sizes.taps_img_size, sizes.taps_img_size, device=device)
    rows, tokens = model.patch_embed.grid_size
    tokens = rows * tokens + model.num_prefix_tokens
    depth, heads = len(model.blocks), model.blocks[0].attn.num_heads
    sync(device)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    maps: list[torch.Tensor] = []

    def forward(variant: str) -> int:
        maps.clear()
        with torch.inference_mode(), autocast(device):
            if variant == "row_taps":
                taps = vitreg.run_taps(model, images, layers=None, attention_layers=None)
                return taps.cls_attention.nbytes + taps.register_attention.nbytes
            model(images)
            return sum(m.nbytes for m in maps)

    results = []
    for variant in ("plain", "row_taps", "full_maps"):
        row: dict[str, Any] = {
            "variant": variant,
            "model": sizes.taps_model,
            "img_size": sizes.taps_img_size,
            "tokens": tokens,
        }
        if variant == "full_maps":
            need = depth * heads * tokens**2 * 4 * sizes.taps_batch  # float32 softmax of every layer
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
            if need > 0.8 * free:
                row["skipped"] = f"the maps need {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"
                results.append(row)
                continue
            for block in model.blocks:
                block.attn.fused_attn = False
                block.attn.attn_drop.register_forward_hook(lambda module, inputs, output: maps.append(output))
        try:
            forward(variant)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = []
            for _ in range(3):
                sync(device)
                started = time.perf_counter()
                kept = forward(variant)
                sync(device)
                seconds.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            row.update(seconds=min(seconds), peak_gib=peak / 2**30, peak_above_weights_gib=(peak - weights) / 2**30)
            row["attention_gib"] = kept / 2**30
        except torch.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        maps.clear()
        results.append(row)
    return results


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# GPU benchmark: {meta['device']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, commit {meta['commit']}, batch {meta['sizes']['batch']}, "
        f"{meta['sizes']['img_size']} px, k={meta['sizes']['frozen']}, {meta['sizes']['registers']} registers, "
        f"bf16 autocast{' (CPU smoke: fp32, tiny sizes)' if meta['smoke'] else ''}; peak {meta['peak_tflops']} "
        "TFLOP/s dense bf16",
        "",
        "## (a, c) Model-only fine-tuning step on synthetic on-device tensors",
        "",
        "| register entry | torch.compile | images/s | ms/step | trainable params | GFLOP/image | counted / by hand | "
        "TFLOP/s | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["model"]:
        if "images_per_s" not in row:
            lines.append(
                f"| {row['register_entry']} | {row['compile']} | {row.get('skipped') or row.get('error')} |||||"
            )
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
        lines.append(
            f"| {row['register_entry']} | {row['compile']} | {row['images_per_s']:.0f} | {row['ms_per_step']:.1f} | "
            f"{row['trainable_params']:,} | {row['gflop_per_image']:.3g} | {row['counted_over_hand']:.3f} | "
            f"{row['achieved_tflops']:.3g} | {mfu} |"
        )
    lines += ["", "## (b) End to end: FFCV from generated JPEGs into the same step", ""]
    for name, e2e in results["end_to_end"].items():
        if "end_to_end_images_per_s" not in e2e:
            lines.append(f"- {name}: {e2e.get('skipped') or e2e.get('error')}")
            continue
        lines += [
            f"{name} ({e2e['step']}; {e2e['jpegs']} JPEGs, {e2e['loader_workers']} loader threads):",
            "",
            "| measured | images/s | / target 6,000 |",
            "|---|---:|---:|",
            f"| loader alone | {e2e['loader_images_per_s']:.0f} | "
            f"{e2e['loader_images_per_s'] / TARGET_IMAGES_PER_S:.2f} |",
            f"| step on synthetic tensors | {e2e['synthetic_images_per_s']:.0f} | "
            f"{e2e['synthetic_images_per_s'] / TARGET_IMAGES_PER_S:.2f} |",
            f"| end to end | {e2e['end_to_end_images_per_s']:.0f} | {e2e['end_to_end_over_target']:.2f} |",
            "",
            f"end to end / synthetic = {e2e['end_to_end_over_synthetic']:.2f}; end to end / the study's A100 (1,800) = "
            f"{e2e['end_to_end_over_study_a100']:.1f}",
            "",
        ]
    lines += [
        "## (d) Taps at high resolution",
        "",
        "| model | px | tokens | variant | s/forward | peak GiB | above weights GiB | attention kept GiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in results["taps"]:
        head = f"| {row['model']} | {row['img_size']} | {row['tokens']} | {row['variant']} |"
        if "seconds" not in row:
            lines.append(f"{head} {row.get('skipped') or row.get('error')} ||||")
            continue
        lines.append(
            f"{head} {row['seconds']:.3f} | {row['peak_gib']:.2f} | {row['peak_above_weights_gib']:.2f} | "
            f"{row['attention_gib']:.3f} |"
        )
    if results["notes"]:
        lines += ["", "## Skipped and failed", ""] + [f"- {note}" for note in results["notes"]]
    lines += ["", f"wall time {meta.get('wall_s', 0):.0f} s of a {meta['deadline_s']:.0f} s deadline"]
    return "\n".join(lines) + "\n"


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--deadline-s", type=float, help="global deadline in seconds (default 450; --smoke 120)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: by device name)")
    parser.add_argument("--batch", type=int, help=f"batch of the training step (default {FULL.batch})")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (for --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the code paths in seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu.py: no CUDA device found; this benchmark measures a GPU. To test its code on CPU run "
              "`python benchmarks/gpu.py --allow-cpu --smoke`.", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = SMOKE if args.smoke else FULL
    if args.batch is not None:
        if args.batch < 1:
            parser.error("--batch must be >= 1")
        sizes = Sizes(**{**asdict(sizes), "batch": args.batch})
    deadline_s = args.deadline_s if args.deadline_s is not None else (120.0 if args.smoke else 450.0)
    estimate_scale = 0.02 if args.smoke else 1.0
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else detect_peak_tflops(device)
    clock = Clock(deadline_s)
    results: dict[str, Any] = {
        "meta": {
            "benchmark": "gpu",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor()})",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "commit": git_commit(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "smoke": args.smoke,
            "deadline_s": deadline_s,
            "peak_tflops": peak_tflops,
            "target_images_per_s": TARGET_IMAGES_PER_S,
            "sizes": asdict(sizes),
        },
        "model": [],
        "end_to_end": {},
        "taps": [],
        "notes": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["meta"]["wall_s"] = time.perf_counter() - clock.started
        (args.out / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "gpu.md").write_text(markdown(results))

    def section(name: str, estimate: str, run: Callable[[], Any]) -> Any:
        """`run()`, or a dict saying why not (skipped for the deadline, or failed); results saved either way."""
        reason = clock.skip_reason(ESTIMATE_S[estimate] * estimate_scale)
        print(f"[{time.perf_counter() - clock.started:6.1f} s] {name}: {reason or 'running'}", flush=True)
        try:
            if reason:
                results["notes"].append(f"{name}: {reason}")
                return {"skipped": reason}
            return run()
        except Exception as error:  # a failing section must not take the others with it
            traceback.print_exc()
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            results["notes"].append(f"{name}: failed: {message}")
            return {"error": message}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()

    steps: dict[tuple[str, bool], Step] = {}

    def model_section(entry: str, compiled: bool) -> None:
        def run() -> dict:
            if entry != "input" and not supports_register_entry():
                reason = "skipped: vitreg.build_model has no register_entry keyword yet (issue 9 item 1)"
                results["notes"].append(f"model {entry} compile={compiled}: {reason}")
                return {"skipped": reason}
            step = Step(sizes, entry, device, sizes.compile_backend if compiled else None)
            steps[(entry, compiled)] = step
            return measure_step(sizes, step, device, flops, entry)

        row = {
            "register_entry": entry,
            "compile": compiled,
            **section(f"model {entry} compile={compiled}", "compile" if compiled else "model", run),
        }
        if "achieved_tflops" in row:
            row["mfu"] = row["achieved_tflops"] / peak_tflops if peak_tflops else None
        results["model"].append(row)
        save()

    def fastest(compiled: bool) -> dict | None:
        rows = [r for r in results["model"] if r["compile"] == compiled and "images_per_s" in r]
        return max(rows, key=lambda r: r["images_per_s"], default=None)

    def e2e_section(name: str, row: dict | None) -> None:
        if row is None or loader is None:
            results["end_to_end"][name] = {"skipped": "no model row or no loader to run"}
            return
        step = steps[(row["register_entry"], row["compile"])]
        e2e = section(
            f"end to end ({name})", "e2e", lambda: end_to_end(sizes, step, loader, device, row["images_per_s"])
        )
        setting = f"register entry {row['register_entry']}, compile {row['compile']}"
        results["end_to_end"][name] = {"step": setting, **loader_info, **e2e}
        save()

    flops: dict[str, int] = {}
    folder = Path(tempfile.mkdtemp(prefix="vitreg_gpu_bench_"))
    try:
        for entry in ENTRIES:  # (a, c) eager
            model_section(entry, compiled=False)
        prepared = section("prepare JPEGs, .beton and FFCV loader", "data", lambda: make_loader(sizes, folder, device))
        loader, loader_info = prepared if isinstance(prepared, tuple) else (None, {})
        e2e_section("eager", fastest(compiled=False))  # (b)
        results["taps"] = section("taps", "taps", lambda: taps_rows(sizes, device))  # (d)
        if not isinstance(results["taps"], list):
            results["taps"] = [
                {
                    "variant": "all",
                    "model": sizes.taps_model,
                    "img_size": sizes.taps_img_size,
                    "tokens": "-",
                    **results["taps"],
                }
            ]
        for entry in ENTRIES:  # (a, c) compiled
            model_section(entry, compiled=True)
        best_compiled, best_eager = fastest(compiled=True), fastest(compiled=False)
        compile_won = best_compiled and best_eager and best_compiled["images_per_s"] > best_eager["images_per_s"]
        if compile_won and not args.smoke:  # the smoke has run this code path already
            e2e_section("compiled", best_compiled)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    save()
    print()
    print(markdown(results))
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
