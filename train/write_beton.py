"""Write FFCV .beton files from an ImageFolder-layout data set (e.g. ImageNet's train/ and val/).

    python train/write_beton.py --data /data/imagenet --out /data/ffcv [--max-resolution 256] [--jpeg-quality 90]

reads DATA/<split>/<class>/<image> and writes OUT/<split>.beton and OUT/<split>.classes.json for each split,
then prints what was written and every image that was skipped because it does not decode.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from train.data import write_beton


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="root holding one folder per split")
    parser.add_argument("--out", type=Path, required=True, help="directory for <split>.beton")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to convert")
    parser.add_argument("--max-resolution", type=int, default=256, help="longest side kept, in pixels")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--write-mode", choices=["jpg", "proportion", "raw"], default="jpg")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    # Check every split before the first (long) write starts.
    missing = [args.data / split for split in args.splits if not (args.data / split).is_dir()]
    if missing:
        parser.error(f"image folder {missing[0]} does not exist (expected {args.data}/<split>/<class>/<image>)")
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
