"""FFCV .beton writing from an ImageFolder-layout split, the class file next to it, and the check that a .beton
keeps enough resolution for the evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

WRITE_MODES = ("jpg", "proportion", "raw")


# Longest side write_beton keeps by default. The study's evaluation resizes the shorter side to 256 (224 / 0.875)
# from the original JPEG; a .beton must keep at least that: 342 px on the longer side for a 4:3 photo, 512 for
# 2:1. FFCV's own ImageNet recipe stores 500 (most ImageNet photos are 500 px long, so those stay untouched
# either way); 512 also keeps every image up to 2:1 at >= 256 px on its shorter side.
DEFAULT_MAX_RESOLUTION = 512


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

    from train.data.ffcv_backend import _require_ffcv  # here: ffcv_backend imports this module

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
