"""Benchmark: the FFCV loader against torchvision ImageFolder + PIL on the same JPEGs, images/s per worker core.

It draws photo-sized JPEGs (default 320 images of 500x375, smooth random colour fields with fine noise, about
the file size of an ImageNet photo at quality 90) in ImageFolder layout in a temporary folder, writes their
`.beton` with the project's writer (`train.data.write_beton`, default settings), and times the project's own
training loader (`train.data.build_loader(config, "train")`: the crop-and-flip augmentation the training uses,
uint8 batches on the CPU) for backend "ffcv" and "imagefolder", with 1 and 2 workers (FFCV: decoding threads;
imagefolder: DataLoader processes). Per configuration: the loader's construction, one untimed first epoch (FFCV
compiles its pipeline with numba there; the DataLoader starts its processes every epoch, which the timed
epochs count too, as training pays it), then the best of `--epochs` timed epochs, both whole (images / epoch
time) and steady (from the first batch to the last, which leaves out the start of the DataLoader's processes
and the pipeline's fill: with a few hundred images an epoch is short, while an ImageNet epoch amortises those
starts). Every batch is checked for shape and dtype, and every epoch for its image count.

    .venv/bin/python benchmarks/bench_data.py [--images 320] [--workers 1 2] [--json benchmarks/results/data.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from output import machine, write_json  # this folder (the script's own directory is on sys.path)
from PIL import Image

BACKENDS = ("ffcv", "imagefolder")


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a coarse random colour field upsampled bicubically, plus fine sensor noise."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = field + rng.normal(0.0, 8.0, size=field.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_jpeg(job: tuple[Path, int, int, int, int, int]) -> int:
    """Draw and save image `index` (its own seed: the same pixels in any process); returns its bytes."""
    root, index, classes, width, height, seed = job
    folder = root / "train" / f"class_{index % classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"image_{index:05d}.JPEG"
    smooth_image(np.random.default_rng([seed, index]), width, height).save(path, format="JPEG", quality=90)
    return path.stat().st_size


def write_jpegs(
    root: Path, images: int, classes: int, width: int, height: int, seed: int = 0, processes: int = 1
) -> int:
    """`images` JPEGs (quality 90) in `root/train/<class>/`, drawn by `processes` processes; returns total bytes."""
    jobs = [(root, index, classes, width, height, seed) for index in range(images)]
    if processes <= 1:
        return sum(map(_write_jpeg, jobs))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:  # spawn: no fork of a CUDA process
        return sum(pool.map(_write_jpeg, jobs, chunksize=32))


def time_loader(root: Path, backend: str, workers: int, img_size: int, batch: int, epochs: int) -> dict[str, float]:
    """Construction, first-epoch and best steady-epoch time of the training loader of `backend`."""
    from train.data import DataConfig, build_loader

    config = DataConfig(backend=backend, path=root, img_size=img_size, batch_size=batch, num_workers=workers)
    started = time.perf_counter()
    loader = build_loader(config, "train", rank=0, world_size=1)
    setup_s = time.perf_counter() - started
    expected = len(loader) * batch  # train drops the last partial batch
    epoch_seconds, steady_rates = [], []
    for _ in range(1 + epochs):
        started = time.perf_counter()
        first_batch_at = None
        seen = 0
        for images, labels in loader:
            if images.shape != (batch, 3, img_size, img_size) or str(images.dtype) != "torch.uint8":
                raise RuntimeError(f"{backend}: batch of {tuple(images.shape)} {images.dtype}, expected uint8")
            if labels.shape != (batch,):
                raise RuntimeError(f"{backend}: labels of shape {tuple(labels.shape)}")
            seen += images.shape[0]
            first_batch_at = first_batch_at or time.perf_counter()
        ended = time.perf_counter()
        if seen != expected:
            raise RuntimeError(f"{backend}: an epoch gave {seen} images, expected {expected}")
        epoch_seconds.append(ended - started)
        steady_rates.append((seen - batch) / (ended - first_batch_at) if seen > batch else float("nan"))
    best = min(epoch_seconds[1:])
    steady = max(steady_rates[1:])
    return {
        "setup_s": setup_s,
        "first_epoch_s": epoch_seconds[0],
        "epoch_s": best,
        "images_per_epoch": expected,
        "images_per_s": expected / best,
        "images_per_s_per_worker": expected / best / workers,
        "steady_images_per_s": steady,
        "steady_images_per_s_per_worker": steady / workers,
    }


def report(results: dict) -> str:
    """One row per (workers, backend), with FFCV's speed-up over imagefolder at the same worker count."""
    lines = [
        f"{results['images']} JPEGs of {results['width']}x{results['height']} ({results['jpeg_kib_mean']:.0f} KiB "
        f"each), train loader at {results['img_size']} px, batch {results['batch']}; epoch = whole epoch (worker "
        "start included), steady = from the first batch on",
        f"{'backend':<12} {'workers':>7} {'setup s':>8} {'1st epoch s':>11} {'epoch img/s':>11} {'steady img/s':>12} "
        f"{'steady/worker':>13} {'ffcv/imagefolder (epoch, steady)':>33}",
    ]
    rows = results["rows"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['backend']:<12} {row['workers']:>7} failed: {row['error']}")
            continue
        other = next(
            (r for r in rows if r["workers"] == row["workers"] and r["backend"] == "imagefolder" and "error" not in r),
            None,
        )
        ratio = ""
        if row["backend"] == "ffcv" and other:
            epoch_ratio = row["images_per_s"] / other["images_per_s"]
            steady_ratio = row["steady_images_per_s"] / other["steady_images_per_s"]
            ratio = f"{epoch_ratio:>24.2f} {steady_ratio:>8.2f}"
        lines.append(
            f"{row['backend']:<12} {row['workers']:>7} {row['setup_s']:>8.2f} {row['first_epoch_s']:>11.2f} "
            f"{row['images_per_s']:>11.1f} {row['steady_images_per_s']:>12.1f} "
            f"{row['steady_images_per_s_per_worker']:>13.1f} {ratio}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320, help="JPEGs to generate")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--img-size", type=int, default=224, help="training crop size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration (best one counts)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.images < args.batch * max(args.workers) or min(args.batch, args.epochs, args.classes) < 1:
        parser.error("need --images >= --batch x workers, and --batch, --epochs, --classes >= 1")
    if min(args.workers) < 1:
        parser.error("--workers: each must be >= 1")

    from train.data import write_beton

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        root = Path(folder)
        jpeg_bytes = write_jpegs(root, args.images, args.classes, args.width, args.height)
        with contextlib.redirect_stderr(io.StringIO()):  # FFCV's writer shows a progress bar even with progress=False
            written = write_beton(root, "train", root / "train.beton", num_workers=min(2, os.cpu_count() or 1))
        if written.num_written != args.images or written.skipped:
            raise RuntimeError(f"write_beton wrote {written.num_written} of {args.images} images: {written.summary()}")
        print(
            f"wrote {args.images} JPEGs and {root / 'train.beton'} in {time.perf_counter() - started:.1f} s", flush=True
        )
        rows = []
        for workers in args.workers:
            for backend in args.backends:
                row: dict = {"backend": backend, "workers": workers}
                try:
                    row.update(time_loader(root, backend, workers, args.img_size, args.batch, args.epochs))
                except ImportError as error:  # no ffcv installed: the imagefolder rows still mean something
                    row["error"] = str(error)
                rows.append(row)
                print(f"  {backend} x{workers}: {row.get('images_per_s', float('nan')):.1f} img/s", flush=True)
    results = {
        "benchmark": "data",
        "images": args.images,
        "width": args.width,
        "height": args.height,
        "jpeg_kib_mean": jpeg_bytes / args.images / 1024,
        "img_size": args.img_size,
        "batch": args.batch,
        "epochs": args.epochs,
        "rows": rows,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
    }
    print()
    print(report(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
