"""A small generated image-classification set (JPEG files, ImageNet folder layout) and its .betons, so that every
path runs on a laptop without downloads; the `tiny` preset and the local sweeps train on it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from train.data.config import SPLITS
from train.data.writer import classes_path_for, write_beton

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


@dataclass(frozen=True)
class GeneratedData:
    """Size of the generated set the `tiny` training preset and the local sweeps train on (small enough for a
    2-core machine); both entry points share one copy in the tiny preset's data directory."""

    num_classes: int = 4
    train_per_class: int = 64
    val_per_class: int = 16
    image_size: int = 32
    seed: int = 0


def generated_home(root: Path, own: Path) -> bool:
    """Whether the generated set may be written to `root`: it is `own` (a preset's own data folder) or already
    holds a generated set (`root/images/generated.json`). A folder a user named for their own data is never filled
    with generated images; a config then reads it as it is (and names what is missing)."""
    root = Path(root).expanduser().resolve()
    return root == Path(own).expanduser().resolve() or (root / "images" / _MARKER).is_file()


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
