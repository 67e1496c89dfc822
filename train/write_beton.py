"""Write FFCV .beton files from an ImageFolder-layout data set (e.g. ImageNet's train/ and val/).

    python train/write_beton.py --data /data/imagenet --out /data/ffcv [--max-resolution 512] [--jpeg-quality 90]

reads DATA/<split>/<class>/<image> and writes OUT/<split>.beton and OUT/<split>.classes.json for each split,
then prints what was written, how many images of each non-RGB mode were converted (CMYK, grey, 16-bit scaled by
1/256, palette, alpha dropped) and every image that was skipped because it does not decode (empty, not an image,
truncated, float). Files not named like images (README.txt) are ignored, as torchvision's ImageFolder does; a
class folder without images stops it, naming the folder, before any split is written.

--max-resolution (default 512) is the longest side kept; larger images are shrunk. Evaluation resizes the
shorter side to floor(img_size / crop_pct) = 256 px for the study's 224 / 0.875, so a 4:3 photo needs at least
342 px on its longer side and a 2:1 one 512; below that, images are evaluated from upsampled pixels, and the
validation loader refuses such a .beton. FFCV's own ImageNet recipe stores 500; 512 keeps the same ImageNet
photos untouched (most are 500 px long) and every image up to 2:1 at >= 256 px on its shorter side. "none"
keeps the originals (ImageNet's val split: about 6.4 GB).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from train.data import DEFAULT_MAX_RESOLUTION, write_beton
from train.data.writer import find_samples


def max_resolution(text: str) -> int | None:
    """--max-resolution: a positive number of pixels, or "none" to keep the originals."""
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of pixels or none")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="root holding one folder per split")
    parser.add_argument("--out", type=Path, required=True, help="directory for <split>.beton")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to convert")
    parser.add_argument(
        "--max-resolution",
        type=max_resolution,
        default=DEFAULT_MAX_RESOLUTION,
        help=f"longest side kept, in pixels, or none for the originals (default {DEFAULT_MAX_RESOLUTION}: the "
        "evaluation's 256 px shorter side for images up to 2:1; see above)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--write-mode", choices=["jpg", "proportion", "raw"], default="jpg")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    # Check every split before the first (long) write starts.
    missing = [args.data / split for split in args.splits if not (args.data / split).is_dir()]
    if missing:
        parser.error(f"image folder {missing[0]} does not exist (expected {args.data}/<split>/<class>/<image>)")
    for split in args.splits:
        try:
            find_samples(args.data / split)  # no classes, or a class folder without images
        except FileNotFoundError as error:
            parser.error(str(error))
    skipped = 0
    for split in args.splits:
        report = write_beton(
            args.data,
            split,
            args.out / f"{split}.beton",
            max_resolution=args.max_resolution,
            jpeg_quality=args.jpeg_quality,
            num_workers=args.num_workers,
            write_mode=args.write_mode,
        )
        print(report.summary(), flush=True)
        skipped += len(report.skipped)
    if skipped:
        print(f"{skipped} unreadable images skipped in all; see the lists above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
