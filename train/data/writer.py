"""FFCV .beton writing from an ImageFolder-layout split, the class file next to it, and the check that a .beton
keeps enough resolution for the evaluation."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    source_modes: dict[str, int] = field(default_factory=dict)  # Pillow mode -> images written from it

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [
            f"{self.out_path}: {self.num_written} images, {len(self.class_names)} classes "
            f"({min(self.per_class)}-{max(self.per_class)} per class), {len(self.skipped)} skipped",
            f"  class names: {self.classes_path}",
        ]
        if note := mode_note(self.source_modes):
            lines.append(f"  {note}")
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


# Modes that convert("RGB") would get wrong: it clips 16-bit and 32-bit integer values at 255 (a 16-bit PNG of
# value 4660 becomes 255, not 18) and clips floats, so these are scaled here instead (or refused: F has no
# defined range).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, the same way for the .beton writer and the imagefolder backend.

    RGB passes through. 16-bit grey (Pillow's I;16* modes, and I, which Pillow uses for 16-bit PNGs in older
    versions) is scaled by 1/256 (value >> 8: 65535 -> 255, 4660 -> 18), then repeated over R, G, B; an I image
    with values outside 0..65535 is refused, as is F (floats have no defined 8-bit scale). Every other mode
    goes through Pillow's convert("RGB"): L and 1 repeat grey; P looks up its palette; CMYK uses Pillow's
    conversion (Adobe's inverted CMYK JPEGs are un-inverted by the decoder); RGBA, LA and PA lose their alpha
    channel (the colour under transparent pixels is kept, not blended with a background).
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(f"mode {image.mode} with values {low}..{high}: outside the 16-bit range 0..65535")
        return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("mode F (floating point) has no defined 8-bit scale; convert it to 8-bit RGB yourself")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """The image at `path`, decoded completely, as 8-bit RGB (`to_rgb`); an error naming `path` if it fails."""
    try:
        with Image.open(path) as image:
            image.load()  # open() only parses the header; truncated or garbled data fail here
            return to_rgb(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise OSError(f"{path}: {type(error).__name__}: {error}") from error


def check_image(path: str) -> str | None:
    """None if the file at `path` decodes completely to RGB (`load_rgb`), else the reason it does not."""
    try:
        load_rgb(path)
    except OSError as error:
        cause = error.__cause__ or error
        return f"{type(cause).__name__}: {cause}"
    return None


def header_check(path: str) -> tuple[str | None, str]:
    """(None, mode) if `path` opens as an image of a mode `to_rgb` converts, else (the reason, "?" or its mode).

    Reads the header only (cheap): catches empty, non-image and float files without decoding the pixels; a
    truncated file passes (only a full decode, `check_image`, finds it).
    """
    try:
        with Image.open(path) as image:
            if image.mode == "F":
                return "mode F (floating point) has no defined 8-bit scale", image.mode
            return None, image.mode
    except Exception as error:
        return f"{type(error).__name__}: {error}", "?"


def decode_check(path: str) -> tuple[str | None, str]:
    """`check_image`'s reason (a complete decode) and the file's mode."""
    return check_image(path), header_check(path)[1]


def mode_note(modes: dict[str, int]) -> str:
    """A line saying which non-RGB images were converted and how, e.g. for 2 CMYK and 1 RGBA images."""
    parts = []
    for mode, count in sorted(modes.items()):
        if mode == "RGB":
            continue
        how = (
            " (alpha dropped)"
            if mode in ALPHA_MODES
            else " (16-bit, scaled by 1/256)"
            if mode in SIXTEEN_BIT_MODES
            else ""
        )
        parts.append(f"{count} {mode}{how}")
    return "converted to RGB: " + ", ".join(parts) if parts else ""


def find_samples(source: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) pairs of the ImageFolder at `source`, as torchvision's ImageFolder sees them.

    Files whose extension is not in torchvision's IMG_EXTENSIONS (README.txt, ...) are ignored, like ImageFolder
    does. A class folder without any image file is an error naming it: it would still take a label index (and a
    class in the model's head) that no sample ever has, and torchvision's ImageFolder refuses it too.
    """
    class_names, class_to_idx = find_classes(source)  # raises FileNotFoundError naming `source` if no classes
    samples = make_dataset(source, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(class_names))
    empty = [str(source / name) for name, count in zip(class_names, counts, strict=True) if count == 0]
    if empty:
        raise FileNotFoundError(
            f"{len(empty)} class folder(s) without image files ({', '.join(IMG_EXTENSIONS)}): {', '.join(empty)}; "
            "add images or remove the folder"
        )
    return class_names, samples


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
            return np.asarray(load_rgb(path)), label
        except Exception as error:
            # Every file decoded once already; one that fails now changed on disk meanwhile. FFCV 1.0.2's writer
            # waits forever for a worker that raised, so note the failure for the parent and write a stand-in,
            # which the parent throws away with the whole file.
            (self.failure_dir / f"{index}.txt").write_text(f"{error}\n")
            return np.zeros((8, 8, 3), dtype=np.uint8), label


def _check_all(paths: list[str], num_workers: int, progress: bool, desc: str, check: Callable = decode_check) -> list:
    """`check` over `paths` (in a process pool when it pays), with a progress bar."""
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    if num_workers <= 1 or len(paths) < 256:
        results = []
        for path in paths:
            results.append(check(path))
            bar.update()
    else:
        import multiprocessing

        with multiprocessing.get_context().Pool(num_workers) as pool:
            results = []
            for result in pool.imap(check, paths, chunksize=64):
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
    listed in the report (with the reason) instead of crashing the write. Other modes than RGB are converted by
    `to_rgb` (the imagefolder backend reads them the same way) and counted by mode in the report. A class folder
    with no image file, or none that decodes, is an error naming it (before any decoding for the first). The
    class names go to `classes_path_for(out_path)`.

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
    class_names, samples = find_samples(source)  # before any decoding: an empty class folder is an error

    checked = _check_all([p for p, _ in samples], num_workers, progress, f"checking {source}")
    reasons = [reason for reason, _ in checked]
    modes = dict(Counter(mode for reason, mode in checked if reason is None))
    good = [sample for sample, reason in zip(samples, reasons, strict=True) if reason is None]
    skipped = tuple(SkippedImage(p, r) for (p, _), r in zip(samples, reasons, strict=True) if r is not None)
    if not good:
        raise ValueError(f"none of the {len(samples)} images under {source} decodes; first: {skipped[0]}")
    left = np.bincount([label for _, label in good], minlength=len(class_names))
    lost = [str(source / name) for name, count in zip(class_names, left, strict=True) if count == 0]
    if lost:
        raise ValueError(f"no image in class folder(s) {', '.join(lost)} decodes: {[str(s) for s in skipped]}")

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
    import ffcv.writer

    # FFCV's writer draws its own tqdm bar, with no switch: `progress=False` silences it through its module's name.
    ffcv_tqdm = ffcv.writer.tqdm
    ffcv.writer.tqdm = ffcv_tqdm if progress else functools.partial(ffcv_tqdm, disable=True)
    try:
        writer.from_indexed_dataset(_ImageList(good, failure_dir), chunksize=chunksize)
    finally:
        ffcv.writer.tqdm = ffcv_tqdm
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
                "source_modes": modes,
            },
            indent=2,
        )
        + "\n"
    )
    return WriteReport(out_path, classes_path, tuple(class_names), len(good), per_class, skipped, modes)


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
