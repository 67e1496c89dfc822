"""The data layer: a generated toy set, FFCV .beton writing, and one loader interface over two backends.

- `generate_dataset` draws a small image-classification set (JPEG files, ImageNet folder layout) so that every
  path here runs on a laptop without downloads.
- `write_beton` turns an ImageFolder-layout split into an FFCV `.beton`, skipping (and reporting) unreadable images.
- `build_loader` yields `(images, labels)` batches from either backend: `ffcv` (`<path>/<split>.beton`) or
  `imagefolder` (`<path>/<split>/<class>/*.JPEG`, plain torchvision, for users without FFCV). Both yield uint8
  images `(B, 3, img_size, img_size)` and int64 labels on the requested device; `normalize_on_device` turns the
  images into ImageNet-normalised floats there, so only uint8 crosses the host-to-device link.

Evaluation (val) is the study's, DeiT's and timm's: resize the shorter side to floor(img_size / crop_pct) with
Pillow's antialiased bicubic (or bilinear), then centre-crop img_size (`eval_resize_crop`). The imagefolder backend
runs torchvision's Resize + CenterCrop on the PIL image; the FFCV backend runs a numba port of the same Pillow
arithmetic, so both give the same pixels from the same stored image, bit for bit. A .beton's images are only as
large as `write_beton(max_resolution=...)` kept them (default 512); the val loader refuses one stored too small
for its evaluation resize (`check_stored_resolution`).

Train augmentation is the same on both backends and deliberately simple: RandomResizedCrop(img_size,
scale=(min_crop_scale, 1)) + horizontal flip (DeiT's geometric part; colour jitter, RandAugment and random
erasing are not done here). The crop box and flip of a sample are a pure function of (seed, epoch, sample index,
repeated-augmentation copy), `crop_and_flip`, computed with a counter-based hash instead of a random-number
stream: they do not depend on decoding threads, worker processes, rank or what was read before, so a run resumed
from a checkpoint sees the same pixels as an uninterrupted one. Both backends cut the same boxes from images of
the same size (a .beton written with `max_resolution` below an image's size stores it smaller, so its boxes
differ), and resize them with different filters (FFCV: OpenCV's INTER_AREA; imagefolder: bicubic), so their train
pixels differ slightly.

Sharding (same on both backends, `shard_order`): each rank reads its own shard, chosen by explicit
`rank`/`world_size` (or taken from an initialised torch.distributed). Train: one permutation of the whole set per
epoch, each sample repeated `repeated_augmentations` times in a row and the list dealt out to the ranks (DeiT's
RASampler; with 1, torch's DistributedSampler with seed and epoch, drop_last=True), num_samples // world_size per
rank, so every rank takes the same number of steps. Val: rank r reads samples r, r + world_size, ... in file
order, with no padding, so the shards are disjoint and cover the set exactly (ranks may differ by one sample;
reduce metric totals once, after the loop).
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

if TYPE_CHECKING:
    from ffcv.loader import Loader

try:  # numba comes with the ffcv extra; without it the augmentation helpers below run as plain Python
    from numba.extending import register_jitable
except ImportError:  # pragma: no cover - depends on the environment

    def register_jitable(fn: Callable) -> Callable:
        return fn


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("ffcv", "imagefolder")
SPLITS = ("train", "val")
WRITE_MODES = ("jpg", "proportion", "raw")
# Longest side write_beton keeps by default. The study's evaluation resizes the shorter side to 256 (224 / 0.875)
# from the original JPEG; a .beton must keep at least that: 342 px on the longer side for a 4:3 photo, 512 for
# 2:1. FFCV's own ImageNet recipe stores 500 (most ImageNet photos are 500 px long, so those stay untouched
# either way); 512 also keeps every image up to 2:1 at >= 256 px on its shorter side.
DEFAULT_MAX_RESOLUTION = 512

# ---------------------------------------------------------------------------------------------------------------
# Generated data set
# ---------------------------------------------------------------------------------------------------------------

# Each class is one shape family drawn in one hue; shape and colour both separate the classes, so a tiny ViT
# learns them in a couple of epochs even from random crops.
SHAPES = ("circle", "square", "triangle", "ring", "cross", "stripes", "diamond", "checker")
_MARKER = "generated.json"


def _class_names(num_classes: int) -> list[str]:
    width = max(2, len(str(num_classes - 1)))  # zero-padded so sorted names == class index order
    return [f"c{k:0{width}d}_{SHAPES[k % len(SHAPES)]}" for k in range(num_classes)]


def _class_hue(k: int) -> float:
    # Golden-ratio spacing keeps any number of hues far apart; classes sharing a shape get different hues.
    return (k * 0.618033988749895) % 1.0


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return round(r * 255), round(g * 255), round(b * 255)


def draw_image(label: int, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """One RGB image of class `label`: a coloured shape at a random place and size on a noisy background.

    Args:
        label: class index; picks the shape family (`SHAPES[label % 8]`) and the hue.
        rng: the source of all randomness (position, size, rotation, colour jitter, background, noise).
        image_size: side of the square image in pixels.
    """
    s = image_size
    # Background: a dim, weakly saturated colour with a gentle gradient (large redundant regions, as in photos).
    bg = np.array(_hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.15, 0.45)), dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (H, W)
    canvas = bg[None, None, :] + 20.0 * gradient[:, :, None]  # (H, W, 3)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))

    hue = (_class_hue(label) + rng.uniform(-0.03, 0.03)) % 1.0
    colour = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    size = rng.uniform(0.4, 0.7) * s
    cx, cy = rng.uniform(size / 2, s - size / 2, size=2)
    r = size / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(image)
    shape = SHAPES[label % len(SHAPES)]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.regular_polygon((cx, cy, r), 4, rotation=rng.uniform(0, 90), fill=colour)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=rng.uniform(0, 120), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(size / 6)))
    elif shape == "cross":
        w = max(2, round(size / 5))
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=colour)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=colour)
    elif shape == "stripes":
        step = max(3, round(size / 4))
        for y in range(round(cy - r), round(cy + r), step):
            draw.rectangle((cx - r, y, cx + r, y + step // 2), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)], fill=colour)
    else:  # checker
        step = max(2, round(size / 4))
        for i, y in enumerate(range(round(cy - r), round(cy + r), step)):
            for j, x in enumerate(range(round(cx - r), round(cx + r), step)):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)

    noise = rng.normal(0.0, 6.0, size=(s, s, 3))  # sensor-like noise over everything
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def generate_dataset(
    root: Path,
    num_classes: int = 4,
    train_per_class: int = 16,
    val_per_class: int = 8,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a small procedurally drawn classification set as JPEG files in ImageNet's folder layout.

    `root/train/<class>/<class>_<i>.JPEG` and `root/val/<class>/<class>_<i>.JPEG`; class names sort in class
    order. The pixels depend only on (seed, split, class, i). Idempotent: a finished set (marked by
    `root/generated.json`) with the same parameters is left alone; one with other parameters is an error.

    Args:
        root: directory to write into (created if missing).
        num_classes: number of classes (shape families x hues).
        train_per_class: training images per class.
        val_per_class: validation images per class.
        image_size: side of the square images in pixels.
        seed: seed of everything drawn.

    Returns:
        `root`.
    """
    for name, value, low in (
        ("num_classes", num_classes, 2),
        ("train_per_class", train_per_class, 1),
        ("val_per_class", val_per_class, 1),
        ("image_size", image_size, 16),
    ):
        if value < low:
            raise ValueError(f"{name}={value}: must be >= {low}")
    root = Path(root)
    params = {
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    marker = root / _MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != params:
            raise ValueError(f"{root} already holds a generated set with {found}, not {params}; use another root")
        return root

    names = _class_names(num_classes)
    planned = {
        root / split / name / f"{name}_{i:05d}.JPEG": (split_id, label, i)
        for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class)))
        for label, name in enumerate(names)
        for i in range(per_class)
    }
    # No marker: a fresh root or an interrupted run. Refuse to mix our files into a foreign folder.
    foreign = [p for split in SPLITS if (root / split).exists() for p in (root / split).rglob("*") if p.is_file()]
    foreign = [p for p in foreign if p not in planned]
    if foreign:
        raise ValueError(f"{root} holds files this generator did not plan, e.g. {foreign[0]}; use another root")

    for path, (split_id, label, i) in planned.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, split_id, label, i])
        draw_image(label, rng, image_size).save(path, format="JPEG", quality=95)
    marker.write_text(json.dumps(params, indent=2) + "\n")  # written last: its presence means "complete"
    return root


# ---------------------------------------------------------------------------------------------------------------
# FFCV writing
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedImage:
    """An image file left out of a .beton, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class WriteReport:
    """What `write_beton` wrote: counts, the class names (label order) and the images it skipped."""

    out_path: Path
    classes_path: Path
    class_names: tuple[str, ...]
    num_written: int
    per_class: tuple[int, ...]
    skipped: tuple[SkippedImage, ...] = ()

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [
            f"{self.out_path}: {self.num_written} images, {len(self.class_names)} classes "
            f"({min(self.per_class)}-{max(self.per_class)} per class), {len(self.skipped)} skipped",
            f"  class names: {self.classes_path}",
        ]
        lines += [f"  skipped {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Undo FFCV's changes to torch's (process-wide) intra-op thread count inside the block.

    Importing ffcv sets it to 1, and every FFCV Loader construction and epoch (also from its reading thread) set
    it to the loader's num_workers, which would silently slow the model's CPU work.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _require_ffcv() -> None:
    """Import ffcv (only the ffcv paths need it) with a helpful message when it is missing."""
    try:
        with _keep_torch_threads():
            import ffcv.loader  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "the ffcv paths need the ffcv package (scripts/setup.sh installs it); without it use backend='imagefolder'"
        ) from error


def classes_path_for(beton_path: Path) -> Path:
    """Where the class names of `beton_path` live: `train.beton` -> `train.classes.json`."""
    return Path(beton_path).with_suffix(".classes.json")


def read_class_names(beton_path: Path) -> list[str]:
    """The class names (index = label) written next to a .beton by `write_beton`."""
    path = classes_path_for(beton_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: class names of {beton_path} (written by write_beton)")
    return list(json.loads(path.read_text())["classes"])


def check_image(path: str) -> str | None:
    """None if the file at `path` decodes completely to RGB with PIL, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.load()  # open() only parses the header; truncated or garbled data fail here
            image.convert("RGB")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"
    return None


class _ImageList:
    """The indexable data set FFCV's writer reads: verified (path, label) pairs -> (HWC uint8 RGB, label)."""

    def __init__(self, samples: Sequence[tuple[str, int]], failure_dir: Path) -> None:
        self.samples = list(samples)
        self.failure_dir = failure_dir

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")), label
        except Exception as error:
            # Every file decoded once already; one that fails now changed on disk meanwhile. FFCV 1.0.2's writer
            # waits forever for a worker that raised, so note the failure for the parent and write a stand-in,
            # which the parent throws away with the whole file.
            (self.failure_dir / f"{index}.txt").write_text(f"{path}: {type(error).__name__}: {error}\n")
            return np.zeros((8, 8, 3), dtype=np.uint8), label


def _check_all(paths: list[str], num_workers: int, progress: bool, desc: str) -> list[str | None]:
    """`check_image` over `paths` (in a process pool when it pays), with a progress bar."""
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    if num_workers <= 1 or len(paths) < 256:
        results = []
        for path in paths:
            results.append(check_image(path))
            bar.update()
    else:
        import multiprocessing

        with multiprocessing.get_context().Pool(num_workers) as pool:
            results = []
            for result in pool.imap(check_image, paths, chunksize=64):
                results.append(result)
                bar.update()
    bar.close()
    return results


def write_beton(
    image_folder: Path,
    split_dir_name: str,
    out_path: Path,
    max_resolution: int | None = DEFAULT_MAX_RESOLUTION,
    jpeg_quality: int = 90,
    num_workers: int = min(8, os.cpu_count() or 1),
    write_mode: str = "jpg",
    compress_probability: float = 0.5,
    progress: bool = True,
) -> WriteReport:
    """Write `image_folder/split_dir_name` (one folder per class) as an FFCV .beton with fields image and label.

    Files and labels are those torchvision's ImageFolder would see (same extensions, class index = position of
    the class folder in sorted order, files in sorted order), so .beton index i is ImageFolder sample i when
    nothing is skipped. Every file is decoded completely with PIL first; the ones that fail are skipped and
    listed in the report instead of crashing the write. The class names go to `classes_path_for(out_path)`.

    Args:
        image_folder: root of the data set, e.g. an ImageNet directory.
        split_dir_name: the split's sub-folder, e.g. "train" or "val".
        out_path: the .beton to write (replaced atomically when complete).
        max_resolution: longest side kept (larger images are downscaled with OpenCV's INTER_AREA, by FFCV);
            None keeps the original size. The default, 512, keeps what the study's evaluation needs (a shorter
            side >= 256 for images up to 2:1; see DEFAULT_MAX_RESOLUTION); it is recorded in the class file,
            and the validation loader refuses a .beton stored too small for its evaluation resize
            (`check_stored_resolution`).
        jpeg_quality: JPEG quality of the re-encoded images.
        num_workers: processes for checking and for FFCV's writer.
        write_mode: "jpg" (all JPEG), "proportion" (JPEG with probability compress_probability, else raw
            pixels: faster to decode, larger file) or "raw".
        compress_probability: see write_mode.
        progress: show tqdm progress bars.
    """
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r}: allowed {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality}: must be in 1..100")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"max_resolution={max_resolution}: must be >= 1 or None")
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: must be >= 1")
    source = Path(image_folder) / split_dir_name
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {source} does not exist (expected <data>/{split_dir_name}/<class>/)")
    class_names, class_to_idx = find_classes(source)  # raises FileNotFoundError naming `source` if no classes
    samples = make_dataset(source, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {source}")

    reasons = _check_all([p for p, _ in samples], num_workers, progress, f"checking {source}")
    good = [sample for sample, reason in zip(samples, reasons, strict=True) if reason is None]
    skipped = tuple(SkippedImage(p, r) for (p, _), r in zip(samples, reasons, strict=True) if r is not None)
    if not good:
        raise ValueError(f"none of the {len(samples)} images under {source} decodes; first: {skipped[0]}")

    _require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    failure_dir = out_path.with_name(out_path.name + ".failures")
    shutil.rmtree(failure_dir, ignore_errors=True)  # left by an interrupted run
    failure_dir.mkdir()
    image_field = RGBImageField(
        write_mode=write_mode,
        max_resolution=max_resolution,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
    )
    writer = DatasetWriter(str(partial), {"image": image_field, "label": IntField()}, num_workers=num_workers)
    # Several chunks per worker so they share the work; FFCV's default (100) leaves one worker doing small sets.
    chunksize = max(1, min(100, len(good) // (4 * num_workers)))
    writer.from_indexed_dataset(_ImageList(good, failure_dir), chunksize=chunksize)  # shows its own tqdm bar
    late = [f.read_text().strip() for f in sorted(failure_dir.glob("*.txt"))]
    shutil.rmtree(failure_dir)
    if late:
        partial.unlink()
        raise RuntimeError(f"{len(late)} images changed while {out_path} was written; rerun. First: {late[0]}")
    os.replace(partial, out_path)

    per_class = tuple(int(n) for n in np.bincount([label for _, label in good], minlength=len(class_names)))
    classes_path = classes_path_for(out_path)
    classes_path.write_text(
        json.dumps(
            {
                "classes": class_names,
                "num_samples": len(good),
                "per_class": list(per_class),
                "source": str(source),
                "max_resolution": max_resolution,
                "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
            },
            indent=2,
        )
        + "\n"
    )
    return WriteReport(out_path, classes_path, tuple(class_names), len(good), per_class, skipped)


# ---------------------------------------------------------------------------------------------------------------
# Train augmentation parameters: a pure function of (seed, epoch, sample index)
# ---------------------------------------------------------------------------------------------------------------

# splitmix64 (Steele, Lea & Flood 2014; the seeder of xoshiro): a bijective 64-bit mixer. Draw k of a sample is
# the mixer of (key + k * golden), computed rather than generated in sequence, so no state is shared between the
# threads and processes that decode in parallel. np.uint64 throughout: numba would turn uint64 arithmetic mixed
# with plain (signed) ints into float64, and the same code must give the same bits as Python and as numba.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11))
_2_POW_M53 = 1.0 / 9007199254740992.0
CROP_ATTEMPTS = 10  # as torchvision's and FFCV's RandomResizedCrop, before the centre-crop fallback
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


@register_jitable
def _splitmix64(x: np.uint64) -> np.uint64:
    z = x + _GOLDEN  # wraps mod 2**64 (Python callers silence numpy's overflow warning)
    z = (z ^ (z >> _SHIFTS[0])) * _MIX1
    z = (z ^ (z >> _SHIFTS[1])) * _MIX2
    return z ^ (z >> _SHIFTS[2])


@register_jitable
def _uniform(key: np.uint64, k: int) -> float:
    """Draw k of the stream `key`: a double in [0, 1) from the top 53 bits."""
    return float(_splitmix64(key + np.uint64(k) * _GOLDEN) >> _SHIFTS[3]) * _2_POW_M53


def _crop_and_flip(
    seed: int,
    epoch: int,
    index: int,
    copy: int,
    height: int,
    width: int,
    scale_lo: float,
    scale_hi: float,
    ratio_lo: float,
    ratio_hi: float,
) -> tuple[int, int, int, int, bool]:
    # Compiled by numba for FFCV's decoder (see _ffcv_kernels) and run as Python by the imagefolder backend: only
    # operations whose results are bit-identical in both (integer hashing, IEEE +-*/, sqrt, and libm's log/exp).
    key = _splitmix64(_splitmix64(_splitmix64(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(index))
    key = _splitmix64(key ^ np.uint64(copy))
    flip = _uniform(key, 0) < 0.5
    height, width = int(height), int(width)
    area = float(height) * float(width)
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for attempt in range(CROP_ATTEMPTS):  # torchvision's RandomResizedCrop.get_params, draws 1..4 per attempt
        target_area = area * (scale_lo + (scale_hi - scale_lo) * _uniform(key, 4 * attempt + 1))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(key, 4 * attempt + 2))
        w = int(math.sqrt(target_area * aspect) + 0.5)  # >= 0: round half up
        h = int(math.sqrt(target_area / aspect) + 0.5)
        if 0 < w <= width and 0 < h <= height:
            top = min(int(_uniform(key, 4 * attempt + 3) * (height - h + 1)), height - h)
            left = min(int(_uniform(key, 4 * attempt + 4) * (width - w + 1)), width - w)
            return top, left, h, w, flip
    # Fallback: the largest centred box whose aspect ratio is in range.
    if width / height < ratio_lo:
        w = width
        h = min(height, int(w / ratio_lo + 0.5))
    elif width / height > ratio_hi:
        h = height
        w = min(width, int(h * ratio_hi + 0.5))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def crop_and_flip(
    seed: int,
    epoch: int,
    index: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
    copy: int = 0,
) -> tuple[int, int, int, int, bool]:
    """The train crop box and flip of sample `index` in `epoch`: `(top, left, crop_height, crop_width, flip)`.

    RandomResizedCrop's box (area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, up to 10
    tries, then a centre crop) and a fair coin for the horizontal flip, drawn from a splitmix64 hash of
    (seed, epoch, index, copy) instead of a random-number stream. Both backends call this (FFCV's decoder a
    numba build of the same code), so it alone decides the train augmentation.

    Args:
        seed: the run's data seed (`DataConfig.seed`), >= 0.
        epoch: the epoch, >= 0.
        index: the sample's index in its split (.beton / ImageFolder order), >= 0.
        height, width: the stored image's size in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
        copy: which of the sample's repeated-augmentation copies in this epoch (0 .. repeats - 1, see
            `shard_order`); each copy gets its own box and flip.
    """
    with np.errstate(over="ignore"):  # the hash wraps mod 2**64 on purpose
        top, left, h, w, flip = _crop_and_flip(
            seed, epoch, index, copy, height, width, scale[0], scale[1], ratio[0], ratio[1]
        )
    return int(top), int(left), int(h), int(w), bool(flip)


@functools.cache
def _ffcv_kernels() -> tuple[Callable, Callable, Callable]:
    """numba builds for FFCV's compiled decoder: (crop_and_flip, load_int64, flip_width_in_place).

    `load_int64(address)` reads an int64 that Python changes after compilation: numba freezes the arrays a
    compiled function captures (their values at compile time are baked into the code), and FFCV compiles a
    loader's pipeline once, so the epoch reaches it through the address of an array its decoder owns.
    """
    import numba
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _int64_at(typingctx: Any, address: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))

        return types.CPointer(types.int64)(types.intp), codegen

    @numba.njit(nogil=True)
    def load_int64(address: int) -> int:
        return _int64_at(address)[0]

    @numba.njit(nogil=True)
    def flip_width_in_place(image: np.ndarray) -> None:  # (H, W, C)
        height, width, channels = image.shape
        for r in range(height):
            for c in range(width // 2):
                for k in range(channels):
                    image[r, c, k], image[r, width - 1 - c, k] = image[r, width - 1 - c, k], image[r, c, k]

    # No fastmath (FFCV compiles its decoders with it): the box must match the Python build bit for bit.
    return numba.njit(nogil=True)(_crop_and_flip), load_int64, flip_width_in_place


# ---------------------------------------------------------------------------------------------------------------
# Evaluation transform: resize the shorter side, centre crop (timm's and DeiT's eval transform)
# ---------------------------------------------------------------------------------------------------------------

EVAL_INTERPOLATIONS = ("bicubic", "bilinear")
# Pillow's fixed-point resampling (src/libImaging/Resample.c): 8-bit pixels, weights with 22 fraction bits.
_PRECISION_BITS = 22


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """The shorter side the evaluation resizes to before the centre crop: floor(img_size / crop_pct).

    As DeiT's `int(input_size / eval_crop_ratio)` and timm's `math.floor(img_size / crop_pct)`: 224 / 0.875
    = 256, 64 / 0.875 -> 73.
    """
    return math.floor(img_size / crop_pct)


def timm_eval_settings(model_name: str) -> dict[str, Any]:
    """`crop_pct` and `eval_interpolation` of a timm model's pretrained data config, for `DataConfig(**...)`.

    E.g. {"crop_pct": 1.0, "eval_interpolation": "bicubic"} for deit3_small_patch16_224.fb_in22k_ft_in1k
    (the study evaluates it at 0.875 instead). Raises when timm's config asks for what our pipeline does not do:
    another normalisation than ImageNet's mean and std, a crop mode other than "center", another filter.
    """
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"model={model_name!r}: not a timm model name")
    pretrained = timm.models.get_pretrained_cfg(model_name)
    if pretrained is None:
        raise ValueError(f"model={model_name!r}: timm has no pretrained data config for it")
    config = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    if tuple(config["mean"]) != IMAGENET_MEAN or tuple(config["std"]) != IMAGENET_STD:
        raise ValueError(
            f"model={model_name!r}: timm normalises with mean {config['mean']} and std {config['std']}; "
            f"normalize_on_device uses ImageNet's {IMAGENET_MEAN}, {IMAGENET_STD}"
        )
    if config.get("crop_mode", "center") != "center":
        raise ValueError(f"model={model_name!r}: timm's crop_mode={config['crop_mode']!r}; we only centre-crop")
    if config["interpolation"] not in EVAL_INTERPOLATIONS:
        raise ValueError(
            f"model={model_name!r}: timm's interpolation={config['interpolation']!r}; allowed: "
            f"{', '.join(EVAL_INTERPOLATIONS)}"
        )
    return {"crop_pct": float(config["crop_pct"]), "eval_interpolation": config["interpolation"]}


@register_jitable
def _filter_weight(x: float, bicubic: bool) -> float:
    # Pillow's bicubic (a = -0.5, support 2) and bilinear (triangle, support 1), in its order of operations.
    if x < 0.0:
        x = -x
    if bicubic:
        if x < 1.0:
            return (1.5 * x - 2.5) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        return 0.0
    if x < 1.0:
        return 1.0 - x
    return 0.0


@register_jitable
def _resample_weights(
    in_size: int, out_size: int, first: int, count: int, bicubic: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for outputs first .. first + count - 1 of a
    resize from in_size to out_size: (first input, number of inputs, int64 weights (count, taps))."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)  # antialiasing: the filter widens by the downscaling factor
    support = (2.0 if bicubic else 1.0) * filter_scale
    taps = math.ceil(support) * 2 + 1
    starts = np.empty(count, np.int64)
    lengths = np.empty(count, np.int64)
    weights = np.zeros((count, taps), np.int64)
    raw = np.empty(taps, np.float64)
    inverse_scale = 1.0 / filter_scale
    one = float(1 << _PRECISION_BITS)
    for j in range(count):
        center = (first + j + 0.5) * scale
        low = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        n = min(int(center + support + 0.5), in_size) - low
        total = 0.0
        for t in range(n):
            raw[t] = _filter_weight((t + low - center + 0.5) * inverse_scale, bicubic)
            total += raw[t]
        for t in range(n):
            w = raw[t] / total if total != 0.0 else raw[t]
            weights[j, t] = int(w * one - 0.5) if w < 0 else int(w * one + 0.5)
        starts[j] = low
        lengths[j] = n
    return starts, lengths, weights


@register_jitable
def _clip8(accumulator: int) -> int:
    value = accumulator >> _PRECISION_BITS
    return min(max(value, 0), 255)


@register_jitable
def _resample_two_pass(
    src: np.ndarray,
    dst: np.ndarray,
    row_start: np.ndarray,
    row_length: np.ndarray,
    row_weights: np.ndarray,
    col_start: np.ndarray,
    col_length: np.ndarray,
    col_weights: np.ndarray,
) -> None:
    """Along axis 1 first (only the rows the second pass needs, into uint8 as Pillow), then along axis 0."""
    out_rows, out_cols = dst.shape[0], dst.shape[1]
    first_row = row_start[0]
    last_row = row_start[out_rows - 1] + row_length[out_rows - 1]
    half = 1 << (_PRECISION_BITS - 1)
    between = np.empty((last_row - first_row, out_cols, 3), np.uint8)
    for r in range(last_row - first_row):
        for j in range(out_cols):
            for c in range(3):
                acc = half
                for t in range(col_length[j]):
                    acc += np.int64(src[first_row + r, col_start[j] + t, c]) * col_weights[j, t]
                between[r, j, c] = _clip8(acc)
    for i in range(out_rows):
        for j in range(out_cols):
            for c in range(3):
                acc = half
                for t in range(row_length[i]):
                    acc += np.int64(between[row_start[i] - first_row + t, j, c]) * row_weights[i, t]
                dst[i, j, c] = _clip8(acc)


def _resize_center_crop(src: np.ndarray, dst: np.ndarray, resize_short: int, bicubic: bool) -> None:
    """dst (c, c, 3) = CenterCrop(c)(Resize(resize_short, bicubic or bilinear)(src)), as torchvision on a PIL image.

    torchvision's Resize(int) sizes the longer side int(resize_short * long / short) and hands the image to
    Pillow's antialiased resampling; CenterCrop offsets by Python's round(), which rounds halves to even. Only
    the crop window is computed: every resampled pixel depends on its own weights only, so the window equals
    the same window of the whole resized image. Pillow 13 runs the vertical pass first when the height shrinks
    by more than twice what the width does (otherwise horizontal first); the 8-bit rounding between the passes
    makes the order visible, so we follow it.
    """
    height, width = src.shape[0], src.shape[1]
    out_h, out_w = dst.shape[0], dst.shape[1]
    if width <= height:
        new_w, new_h = resize_short, int(resize_short * height / width)
    else:
        new_w, new_h = int(resize_short * width / height), resize_short
    spare_h, spare_w = new_h - out_h, new_w - out_w
    top = spare_h // 2 + (spare_h % 2) * ((spare_h // 2) % 2)  # round(spare_h / 2), halves to even
    left = spare_w // 2 + (spare_w % 2) * ((spare_w // 2) % 2)
    row_start, row_length, row_weights = _resample_weights(height, new_h, top, out_h, bicubic)
    col_start, col_length, col_weights = _resample_weights(width, new_w, left, out_w, bicubic)
    if height - new_h > 0 and height - new_h > 2 * (width - new_w):  # vertical pass first: transpose
        _resample_two_pass(
            src.transpose(1, 0, 2),
            dst.transpose(1, 0, 2),
            col_start,
            col_length,
            col_weights,
            row_start,
            row_length,
            row_weights,
        )
    else:
        _resample_two_pass(src, dst, row_start, row_length, row_weights, col_start, col_length, col_weights)


@functools.cache
def _eval_kernel() -> Callable[[np.ndarray, np.ndarray, int, bool], None]:
    """The numba build of `_resize_center_crop` (no fastmath: the weights must be Pillow's to the bit)."""
    import numba

    return numba.njit(nogil=True, cache=True)(_resize_center_crop)


def eval_resize_crop(image: np.ndarray, img_size: int, crop_pct: float, interpolation: str = "bicubic") -> np.ndarray:
    """The evaluation transform of one HWC uint8 RGB image, as the FFCV backend computes it: (img_size, img_size, 3).

    Equals `CenterCrop(img_size)(Resize(eval_resize_size(img_size, crop_pct), interpolation)(PIL image))` bit
    for bit (tests/test_data.py checks it over random sizes).
    """
    if interpolation not in EVAL_INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: allowed {', '.join(EVAL_INTERPOLATIONS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC uint8 RGB image, got {image.dtype} {image.shape}")
    out = np.empty((img_size, img_size, 3), dtype=np.uint8)
    _eval_kernel()(np.ascontiguousarray(image), out, eval_resize_size(img_size, crop_pct), interpolation == "bicubic")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r}: must be a number in (0, 1]")


@dataclass(frozen=True)
class DataConfig:
    """Where the data are and how one rank loads them; validated on creation.

    Attributes:
        backend: "ffcv" reads `<path>/<split>.beton` and `<path>/<split>.classes.json` (see `write_beton`);
            "imagefolder" reads `<path>/<split>/<class>/<image>` with torchvision.
        path: the data directory (required; must exist where the config is made).
        img_size: side of the square images fed to the model.
        batch_size: batch size per rank (Ray Train worker).
        num_workers: decoding threads (ffcv, >= 1) or DataLoader processes (imagefolder, 0 = in the main process).
        min_crop_scale: lower bound of RandomResizedCrop's area fraction (DeiT: 0.08).
        repeated_augmentations: train only: copies of each sample per epoch, spread over the ranks, each with its
            own crop and flip, the epoch still about one pass of samples long (DeiT's RASampler; see
            `shard_order`). 1 = none; the study's recipe (DeiT III) uses 3.
        crop_pct: evaluation resizes the shorter side to floor(img_size / crop_pct), then centre-crops img_size
            (DeiT's and timm's eval transform; the study: 0.875, so 256 -> 224). `timm_eval_settings(model)`
            gives a timm model's own value instead.
        eval_interpolation: the filter of that resize, Pillow's antialiased "bicubic" (the study's) or
            "bilinear"; both backends compute the same pixels (see `eval_resize_crop`).
        hflip: random horizontal flips in training.
        seed: seed of the per-epoch shuffle and of the train augmentation (see `crop_and_flip`).
        batches_ahead: ffcv only: batches decoded in advance.
        os_cache: ffcv only: let the OS page cache hold the .beton (best when it fits in RAM or several ranks
            on a node share it); False uses FFCV's own process cache.
    """

    backend: str = "ffcv"
    path: Path | None = None
    img_size: int = 224
    batch_size: int = 128
    num_workers: int = 4
    min_crop_scale: float = 0.08
    repeated_augmentations: int = 1
    crop_pct: float = 0.875
    eval_interpolation: str = "bicubic"
    hflip: bool = True
    seed: int = 0
    batches_ahead: int = 2
    os_cache: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: allowed {', '.join(BACKENDS)}")
        if self.path is None or str(self.path) == "":
            raise ValueError(f"path={self.path!r}: required, the data directory")
        object.__setattr__(self, "path", Path(self.path))  # accept str (e.g. from JSON); frozen, hence setattr
        if not self.path.is_dir():
            raise ValueError(f"path={str(self.path)!r}: no such directory")
        _check_int("img_size", self.img_size, 8)
        _check_int("batch_size", self.batch_size, 1)
        # FFCV reads num_workers < 1 as "every core", which is never what a config meant.
        _check_int("num_workers", self.num_workers, 1 if self.backend == "ffcv" else 0)
        _check_fraction("min_crop_scale", self.min_crop_scale)
        _check_int("repeated_augmentations", self.repeated_augmentations, 1)
        _check_fraction("crop_pct", self.crop_pct)
        if self.eval_interpolation not in EVAL_INTERPOLATIONS:
            raise ValueError(
                f"eval_interpolation={self.eval_interpolation!r}: allowed {', '.join(EVAL_INTERPOLATIONS)}"
            )
        _check_int("seed", self.seed, 0)
        _check_int("batches_ahead", self.batches_ahead, 1)
        for name in ("hflip", "os_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be true or false")

    @property
    def eval_resize(self) -> int:
        """The shorter side evaluation resizes to before the centre crop (`eval_resize_size`)."""
        return eval_resize_size(self.img_size, self.crop_pct)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """A config from plain data (e.g. JSON); unknown keys are an error that lists the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown DataConfig field(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) that `from_dict` turns back into this config."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}


def normalize_on_device(
    images: torch.Tensor, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> ImageNet-normalised `dtype` images on `device` (default: where they are).

    The uint8 batch crosses to the device first (4x fewer bytes than float32), the arithmetic happens there.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if device is not None:
        images = images.to(device, non_blocking=True)
    mean, std = _mean_std_255(images.device, dtype)
    return (images.to(dtype) - mean) / std


@functools.cache
def _mean_std_255(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them from Python lists every step would be a synchronising host-to-device
    # copy that stalls the GPU queue.
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1) * 255  # (1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1) * 255
    return mean.to(device), std.to(device)


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from an initialised torch.distributed, else (0, 1)."""
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"rank={rank}, world_size={world_size}: give both or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return rank, world_size


def shard_order(
    num_samples: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    repeats: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """What rank `rank` of `world_size` reads in `epoch`, in reading order: `(indices, copies)`, both uint64.

    shuffle=True (train), repeated augmentation as DeiT's RASampler: one permutation of all samples shared by
    every rank (torch.randperm seeded with seed + epoch, as torch's DistributedSampler), each entry repeated
    `repeats` times in a row (copy 0, 1, ..., repeats - 1), then every world_size-th entry from position `rank`,
    cut to num_samples // world_size per rank so that an epoch is still about one pass's worth of samples (and
    every rank takes the same number of steps). Consecutive copies of a sample land on consecutive ranks, so
    with world_size >= repeats no rank sees one sample twice; with fewer ranks a rank sees its copies in a row.
    An epoch then covers about num_samples / repeats distinct samples. DeiT also rounds the epoch down to a
    multiple of 256 samples; we do not. repeats=1 is exactly DistributedSampler(shuffle=True, seed,
    drop_last=True) after set_epoch(epoch).

    shuffle=False (val): rank, rank + world_size, ... with no padding and no repeats, so the shards are disjoint
    and cover every sample once; copies are all 0.

    A pure function of its arguments: a resumed run reads exactly what an uninterrupted one does.
    """
    if not shuffle:
        indices = np.arange(rank, num_samples, world_size, dtype=np.uint64)
        return indices, np.zeros_like(indices)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    permutation = torch.randperm(num_samples, generator=generator).numpy().astype(np.uint64)
    positions = rank + world_size * np.arange(num_samples // world_size, dtype=np.uint64)  # in the repeated list
    return permutation[positions // np.uint64(repeats)], positions % np.uint64(repeats)


def shard_indices(
    num_samples: int, rank: int, world_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, repeats: int = 1
) -> np.ndarray:
    """The sample indices of `shard_order` (without the copy numbers)."""
    return shard_order(num_samples, rank, world_size, shuffle, seed, epoch, repeats)[0]


class ShardLoader:
    """One rank's batches of one split. Iterating yields `(images, labels)`:

    images uint8 (B, 3, img_size, img_size), contiguous; labels int64 (B,); both on the loader's device and
    both fresh tensors, safe to keep. Each iteration reads epoch `self.epoch` and then advances it;
    `set_epoch` picks the epoch of the next iteration (resume). Train drops the last partial batch (every rank
    then takes the same number of steps); val keeps it.
    """

    def __init__(
        self, config: DataConfig, split: str, class_names: Sequence[str], rank: int, world_size: int, epoch: int
    ) -> None:
        self.config = config
        self.split = split
        self.class_names = list(class_names)
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (before a train epoch's last partial batch is dropped)."""
        n = self._dataset_size()
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return self._shard(self._dataset_size(), epoch)

    def _shard(self, dataset_size: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`shard_order` of this rank: (sample indices, repeated-augmentation copies)."""
        repeats = self.config.repeated_augmentations
        return shard_order(dataset_size, self.rank, self.world_size, self.train, self.config.seed, epoch, repeats)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n, b = self.num_samples, self.config.batch_size
        return n // b if self.train else math.ceil(n / b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _dataset_size(self) -> int:
        raise NotImplementedError

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


# FFCV 1.0.2 mutates numba's interned array types when it builds a Loader (its memory managers set
# `.mutable = False` on `numba.uint8[::1]`), which changes the hash of keys in the overload tables of functions
# compiled earlier; when such a function is garbage-collected, numba's finalizer prints "Exception ignored ...
# KeyError". Loaders are therefore kept for the life of the process (a run builds two; each holds the .beton's
# metadata and compiled pipeline, not its batch buffers).
_FFCV_LOADERS: list[Any] = []


# FFCV hands its decoders only the sample numbers its traversal order yields. To tell a sample's repeated-
# augmentation copies apart, our order yields sample keys, `index | copy << 40`, and our decoders (image and
# label) split them; FFCV's memory scheduler is given the plain indices (see `_schedule_plain_indices`).
_COPY_SHIFT = 40
_INDEX_MASK = (1 << _COPY_SHIFT) - 1


def sample_keys(indices: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """The keys our FFCV order yields: `index | copy << 40` (uint64), the index alone for copy 0."""
    return indices.astype(np.uint64) | (copies.astype(np.uint64) << np.uint64(_COPY_SHIFT))


def _ffcv_order(shard: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> Any:
    """An FFCV traversal order that reads the sample keys of `shard(dataset_size, epoch)` (see `sample_keys`).

    We shard ourselves instead of using FFCV's `distributed=True`, which (1.0.2) takes rank and world size
    only from an initialised torch.distributed (it works on CPU with gloo, but cannot be given them
    explicitly), pads every shard to equal length by repeating samples (so a distributed validation counts
    some images twice) and raises for QUASI_RANDOM. `Loader(order=...)` documents custom TraversalOrders but
    checks `isinstance(order, TraversalOrder)` and then calls `order(loader)`, so a class is rejected; we
    pass an instance whose call binds it to the loader.
    """
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        def __init__(self) -> None:  # bound to a loader in __call__, not here
            pass

        def __call__(self, loader: Loader) -> ShardOrder:
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return sample_keys(*shard(len(self.indices), epoch))  # self.indices: all of the .beton's samples

    return ShardOrder()


def _label_decoder() -> Any:
    """FFCV's IntDecoder (int64 labels) for our sample keys: the label of `key & _INDEX_MASK`."""
    from ffcv.fields.decoders import IntDecoder

    index_mask = np.uint64(_INDEX_MASK)

    class SampleKeyIntDecoder(IntDecoder):
        def generate_code(self) -> Callable:
            def decode(
                keys: np.ndarray, destination: np.ndarray, metadata: np.ndarray, storage_state: tuple
            ) -> np.ndarray:
                for ix in range(len(keys)):
                    destination[ix] = metadata[keys[ix] & index_mask]
                return destination[: len(keys)]

            return decode

    return SampleKeyIntDecoder()


def _schedule_plain_indices(loader: Loader) -> None:
    """Make `loader`'s memory manager plan each epoch's reads from sample indices, not our sample keys.

    With os_cache=False, FFCV 1.0.2's process cache looks each batch's sample numbers up in a defaultdict of
    the pages they live on; a key it does not know (a copy > 0) would get no pages, and the decoder would read
    pages that were never loaded. (With os_cache=True the schedule ignores the sample numbers.)
    """
    manager = loader.memory_manager
    schedule_epoch = manager.schedule_epoch
    index_mask = np.uint64(_INDEX_MASK)

    def schedule_indices(batches: Sequence[np.ndarray]) -> Any:
        return schedule_epoch([np.asarray(batch, dtype=np.uint64) & index_mask for batch in batches])

    manager.schedule_epoch = schedule_indices


def _seeded_crop_decoder(output_size: tuple[int, int], scale: tuple[float, float], seed: int, hflip: bool) -> Any:
    """FFCV's RandomResizedCropRGBImageDecoder with its box and flip from `crop_and_flip(seed, epoch, index, copy)`.

    FFCV 1.0.2 draws the box from numba's per-thread `np.random`, which nothing seeds and which the decoding
    threads share out by scheduling, so no two processes see the same crops. This decoder decodes and crops
    exactly as FFCV's does (full JPEG decode, then OpenCV's crop-and-resize into the batch, in the same parallel
    loop) and then flips in place, so RandomHorizontalFlip (a second pass and buffer) is not needed either.
    It reads our sample keys (`sample_keys`). `set_epoch` must be called before each epoch's reading thread
    starts.
    """
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropRGBImageDecoder(RandomResizedCropRGBImageDecoder):
        def __init__(self) -> None:
            super().__init__(output_size, scale=scale, ratio=CROP_RATIO)
            # Read by the compiled code through its address (see _ffcv_kernels); never reallocated, and kept
            # alive by this decoder, which the loader (kept for the process's life) holds.
            self.epoch = np.zeros(1, dtype=np.int64)

        def set_epoch(self, epoch: int) -> None:
            self.epoch[0] = epoch

        def generate_code(self) -> Callable:
            # ResizedCropRGBImageDecoder.generate_code with the box from crop_and_flip and an in-place flip.
            crop_and_flip_c, load_int64, flip_c = _ffcv_kernels()
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            epoch_address = self.epoch.ctypes.data
            index_mask, copy_shift = np.uint64(_INDEX_MASK), np.uint64(_COPY_SHIFT)
            scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
            ratio_lo, ratio_hi = float(self.ratio[0]), float(self.ratio[1])

            def decode(
                batch_indices: np.ndarray, my_storage: tuple, metadata: np.ndarray, storage_state: tuple
            ) -> np.ndarray:
                destination, temp_storage = my_storage
                epoch = load_int64(epoch_address)  # once per batch, before the parallel loop
                for dst_ix in my_range(len(batch_indices)):
                    key = batch_indices[dst_ix]
                    source_ix = key & index_mask
                    copy = key >> copy_shift
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    top, left, h, w, flip = crop_and_flip_c(
                        seed, epoch, source_ix, copy, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi
                    )
                    resize_crop_c(temp_buffer, top, top + h, left, left + w, destination[dst_ix])
                    if hflip and flip:
                        flip_c(destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True  # FFCV: compile with prange over the batch when num_workers > 1
            return decode

    return SeededRandomResizedCropRGBImageDecoder()


def _eval_decoder(img_size: int, resize_short: int, interpolation: str) -> Any:
    """An FFCV image decoder that yields the evaluation transform of each image (`eval_resize_crop`).

    FFCV's CenterCropRGBImageDecoder cuts a centre square of `ratio` x the shorter side and shrinks it with
    OpenCV's INTER_AREA; the study's transform resizes the whole image with Pillow's antialiased bicubic first
    and then crops. This decoder decodes the stored image in full (as FFCV's does) and runs our numba port of
    Pillow's resampling on the crop window, so both backends give the same pixels from the same stored image.
    """
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.state import State

    class ResizeCenterCropRGBImageDecoder(SimpleRGBImageDecoder):
        def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
            # An output batch and one decoding buffer per sample, as FFCV's ResizedCropRGBImageDecoder.
            largest = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
            shape = (img_size, img_size, 3)
            uint8 = np.dtype("<u1")
            state = replace(previous_state, jit_mode=True, shape=shape, dtype=uint8)
            return state, (AllocationQuery(shape, uint8), AllocationQuery((largest * np.uint64(3),), uint8))

        def generate_code(self) -> Callable:
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_center_crop = _eval_kernel()
            bicubic = interpolation == "bicubic"
            index_mask = np.uint64(_INDEX_MASK)

            def decode(
                batch_indices: np.ndarray, my_storage: tuple, metadata: np.ndarray, storage_state: tuple
            ) -> np.ndarray:
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix] & index_mask]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        image = temp_storage[dst_ix]
                        imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    resize_center_crop(image, destination[dst_ix], resize_short, bicubic)
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ResizeCenterCropRGBImageDecoder()


def check_stored_resolution(beton: Path, heights: np.ndarray, widths: np.ndarray, eval_resize: int) -> None:
    """Refuse a .beton whose images were stored too small for an evaluation that resizes to `eval_resize`.

    `write_beton(max_resolution=m)` shrinks every image to at most m px on its longer side; one stored at m with
    its shorter side below `eval_resize` reaches the model upsampled from fewer pixels than the original had.
    This is an error when m < ceil(4/3 x eval_resize), i.e. even a 4:3 photo (most of ImageNet) is hit (e.g.
    the old default m=256 for an eval at 256), and a warning naming the count otherwise (panoramas wider than
    m / eval_resize). A .beton whose class file does not record max_resolution (written before it did) is
    judged by its largest stored side. max_resolution=None (originals kept) is never refused.
    """
    info = json.loads(classes_path_for(beton).read_text())
    if "max_resolution" in info:
        cap = info["max_resolution"]
        if cap is None:
            return
        origin = f"written with max_resolution={cap}"
    else:
        cap = int(np.maximum(heights, widths).max())
        origin = f"written before write_beton recorded its max_resolution; its longest side is {cap} px"
    shorter, longer = np.minimum(heights, widths), np.maximum(heights, widths)
    shrunk = int(np.count_nonzero((longer >= cap) & (shorter < eval_resize)))
    if not shrunk:
        return
    needed = math.ceil(eval_resize * 4 / 3)
    message = (
        f"{beton} ({origin}): {shrunk} of {len(heights)} images are stored {cap} px long with a shorter side below "
        f"the {eval_resize} px the evaluation resizes to (img_size / crop_pct), so they are evaluated from "
        "upsampled pixels"
    )
    if cap < needed:
        raise ValueError(
            f"{message}; a 4:3 image needs a longer side of at least {needed} px: rewrite it with "
            f"python train/write_beton.py --max-resolution {DEFAULT_MAX_RESOLUTION} (or none)"
        )
    warnings.warn(f"{message} (images wider than {cap / eval_resize:.2f}:1)", stacklevel=4)


def _next_ffcv_batch(iterator: Any) -> Any | None:
    """The next batch of an FFCV epoch iterator, None at the end, an error if its reading thread died.

    FFCV 1.0.2 reads in a thread (the iterator itself) that just dies on an error in the pipeline, printing
    the traceback, while `next()` waits forever on its output queue; we only call `next()` once a batch (or the
    end marker) is queued.
    """
    while iterator.output_queue.empty():
        if not iterator.is_alive():
            raise RuntimeError("FFCV's reading thread stopped with an error; its traceback is printed above")
        time.sleep(0.001)
    return next(iterator, None)


def _stop_ffcv_iterator(iterator: Any) -> None:
    """End an FFCV epoch iterator: its reading thread first (waited for), then its memory context.

    FFCV 1.0.2's `close()` only sets a flag that the thread checks while its output queue stays full, and at the
    end of an epoch the thread blocks forever putting its end marker into a full queue. So we take away the
    batches it has not started (`iter_ixes`) and drain the queue until it returns: at most the batch in flight
    is decoded. Waiting keeps an abandoned epoch's thread from decoding with the next epoch's state, from
    running numba's parallel loops alongside the next epoch's thread, and from reading a closed memory context.
    """
    iterator.iter_ixes = iter(())
    while iterator.is_alive():
        try:
            iterator.output_queue.get_nowait()
        except queue.Empty:
            iterator.join(0.005)
    iterator.close()


class _FFCVShard(ShardLoader):
    def __init__(
        self,
        config: DataConfig,
        split: str,
        rank: int,
        world_size: int,
        epoch: int,
        device: torch.device,
    ) -> None:
        assert config.path is not None
        beton = config.path / f"{split}.beton"
        if not beton.is_file():
            raise FileNotFoundError(
                f"{beton} not found; write it with: python train/write_beton.py --data <image folder> "
                f"--out {config.path}"
            )
        super().__init__(config, split, read_class_names(beton), rank, world_size, epoch)
        _require_ffcv()
        from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

        size = (config.img_size, config.img_size)
        self._decoder: Any = None
        if self.train:
            self._decoder = _seeded_crop_decoder(size, (config.min_crop_scale, 1.0), config.seed, config.hflip)
        else:
            self._decoder = _eval_decoder(config.img_size, config.eval_resize, config.eval_interpolation)
        image_ops: list[Any] = [self._decoder]
        # (B, H, W, 3) uint8 numpy -> torch on the device -> (B, 3, H, W) view. FFCV's own NormalizeImage
        # needs cupy on GPU; normalize_on_device does the same in torch.
        image_ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
        # No Squeeze(): it squeezes a last batch of one to a 0-d tensor, which ToDevice then fails on.
        label_ops = [_label_decoder(), ToTensor(), ToDevice(device, non_blocking=True)]  # (B, 1) int64

        import numba
        from ffcv.loader import Loader

        # FFCV's workers are numba threads; numba refuses more than its NUMBA_NUM_THREADS (the node's cores).
        num_workers = min(config.num_workers, numba.config.NUMBA_NUM_THREADS)
        if num_workers < config.num_workers:
            warnings.warn(
                f"num_workers={config.num_workers}: this node runs at most {num_workers} FFCV threads; using "
                f"{num_workers}",
                stacklevel=3,
            )
        with _keep_torch_threads():
            self._loader = Loader(
                str(beton),
                batch_size=config.batch_size,
                num_workers=num_workers,
                os_cache=config.os_cache,
                order=_ffcv_order(self._shard),
                seed=config.seed,
                pipelines={"image": image_ops, "label": label_ops},
                drop_last=self.train,
                batches_ahead=config.batches_ahead,
            )
        _FFCV_LOADERS.append(self._loader)
        _schedule_plain_indices(self._loader)
        if not self.train:
            images = self._loader.reader.metadata["f0"]  # f0: the image field
            check_stored_resolution(beton, images["height"], images["width"], config.eval_resize)

    def _dataset_size(self) -> int:
        return int(self._loader.reader.num_samples)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with _keep_torch_threads():
            threads = torch.get_num_threads()
            self._loader.next_epoch = epoch  # the epoch FFCV hands to our order's sample_order
            if self.train:
                self._decoder.set_epoch(epoch)  # before iter() starts the reading thread, which reads it
            iterator = iter(self._loader)
            try:
                while (batch := _next_ffcv_batch(iterator)) is not None:
                    images, labels = batch
                    # FFCV's reading thread set the thread count before it queued the first batch.
                    torch.set_num_threads(threads)
                    # FFCV's batches are views into a ring of batches_ahead + 2 buffers that it overwrites as
                    # it reads on; the copy (cheap next to decoding) makes them safe to keep, and contiguous.
                    yield images.clone(memory_format=torch.contiguous_format), labels.reshape(-1).clone()
            finally:
                _stop_ffcv_iterator(iterator)


class _SeededCropFolder(datasets.ImageFolder):
    """An ImageFolder train split read by `(epoch, index, copy)` keys, cropped and flipped by `crop_and_flip`.

    The epoch and the repeated-augmentation copy travel with each key (the sampler makes them), so a sample's
    pixels do not depend on which process reads it or on any state of this object.
    """

    def __init__(self, root: Path, config: DataConfig) -> None:
        super().__init__(root)
        self.size = [config.img_size, config.img_size]
        self.scale = (config.min_crop_scale, 1.0)
        self.seed = config.seed
        self.hflip = config.hflip

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:  # key, not index: see above
        epoch, index, copy = key
        path, label = self.samples[index]
        image = self.loader(path)
        top, left, h, w, flip = crop_and_flip(self.seed, epoch, index, image.height, image.width, self.scale, copy=copy)
        image = transforms.functional.resized_crop(  # what RandomResizedCrop does with its box
            image, top, left, h, w, self.size, interpolation=transforms.InterpolationMode.BICUBIC
        )
        if self.hflip and flip:
            image = transforms.functional.hflip(image)
        return transforms.functional.pil_to_tensor(image), label  # uint8 (3, H, W)


class _ImageFolderShard(ShardLoader):
    def __init__(
        self,
        config: DataConfig,
        split: str,
        rank: int,
        world_size: int,
        epoch: int,
        device: torch.device,
    ) -> None:
        assert config.path is not None
        root = config.path / split
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} not found (expected {root}/<class>/<image>)")
        if split == "train":
            self._dataset: datasets.ImageFolder = _SeededCropFolder(root, config)
        else:
            ops = [
                transforms.Resize(  # on a PIL image: Pillow's antialiased filter, the study's (timm's) eval
                    config.eval_resize, interpolation=transforms.InterpolationMode(config.eval_interpolation)
                ),
                transforms.CenterCrop(config.img_size),
                transforms.PILToTensor(),  # uint8 (3, H, W); normalisation happens on the device
            ]
            self._dataset = datasets.ImageFolder(root, transform=transforms.Compose(ops))
        super().__init__(config, split, self._dataset.classes, rank, world_size, epoch)
        self._device = device
        # The DataLoader draws its workers' base seed from this generator, or else from the process's global
        # torch RNG, which would shift the model's random stream by a draw per epoch. (The augmentation itself
        # uses no RNG.)
        self._generator = torch.Generator()

    def _dataset_size(self) -> int:
        return len(self._dataset)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, copies = self._order(epoch)
        sampler: list[Any] = indices.tolist()
        if self.train:
            sampler = [(epoch, i, c) for i, c in zip(sampler, copies.tolist(), strict=True)]
        self._generator.manual_seed(
            int(np.random.SeedSequence([self.config.seed, epoch, self.rank]).generate_state(1)[0])
        )
        loader = DataLoader(
            self._dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=self._device.type == "cuda",
            drop_last=self.train,
            generator=self._generator,
        )
        for images, labels in loader:
            yield images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)


def build_loader(
    config: DataConfig,
    split: str,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str = "cpu",
    epoch: int = 0,
) -> ShardLoader:
    """The batches of `split` ("train" or "val") that rank `rank` of `world_size` reads, on `device`.

    Args:
        config: backend, data path, sizes and seeds.
        split: "train" (shuffled per epoch, augmented, last partial batch dropped) or "val" (file order,
            centre crop, all samples).
        rank, world_size: this worker's shard; both None takes them from an initialised torch.distributed,
            else (0, 1). No process group is needed when they are given.
        device: where the batches land (uint8 images; see `normalize_on_device`).
        epoch: the epoch of the first iteration (for a resumed run).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {', '.join(SPLITS)}")
    rank, world_size = resolve_rank(rank, world_size)
    shard_cls = _FFCVShard if config.backend == "ffcv" else _ImageFolderShard
    loader = shard_cls(config, split, rank, world_size, epoch, torch.device(device))
    if split == "train" and len(loader) == 0:
        raise ValueError(
            f"batch_size={config.batch_size}: rank {rank} of {world_size} has only {loader.num_samples} training "
            "samples per epoch, not one full batch; lower batch_size or world_size"
        )
    return loader


@dataclass(frozen=True)
class GeneratedData:
    """Size of the generated set the `tiny` training preset and the local sweeps train on (small enough for a
    2-core machine); both entry points share one copy in the tiny preset's data directory."""

    num_classes: int = 4
    train_per_class: int = 64
    val_per_class: int = 16
    image_size: int = 32
    seed: int = 0


def prepare_generated_data(root: Path, spec: GeneratedData = GeneratedData(), progress: bool = False) -> Path:
    """Make `root/train.beton` and `root/val.beton` (FFCV) from a generated set in `root/images`, once.

    Idempotent: when both .beton files and their class lists exist nothing is done, so every trial and every
    rerun of a sweep reuses them (ones written before the class list recorded max_resolution are rewritten).
    Returns `root`, the `data.path` of the training config.
    """
    root = Path(root).expanduser().resolve()
    wanted = [root / f"{split}.beton" for split in ("train", "val")]

    def complete(beton: Path) -> bool:
        classes = classes_path_for(beton)
        return beton.is_file() and classes.is_file() and "max_resolution" in json.loads(classes.read_text())

    if all(complete(path) for path in wanted):
        return root
    images = generate_dataset(
        root / "images",
        num_classes=spec.num_classes,
        train_per_class=spec.train_per_class,
        val_per_class=spec.val_per_class,
        image_size=spec.image_size,
        seed=spec.seed,
    )
    for split, out in zip(("train", "val"), wanted, strict=True):
        write_beton(images, split, out, max_resolution=None, num_workers=1, progress=progress)
    return root
