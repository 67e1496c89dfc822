"""Datasets for the probes: CIFAR-10 (python pickle format), ADE20K, a folder of images, and generated images.

Every dataset is read lazily as an `ImageSource`: a list of items that `load(indices, ...)` turns into a batch
of normalised images (resized to the model's resolution) with optional class labels and segmentation masks, so
a 1,900-image pass at 384 px never holds more than one batch of pixels.

Sample sizes and resolutions default to the study's (section 3.2); see `study_protocol`.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitreg.synthetic import planted_images

DATASETS = ("cifar10", "ade20k", "generated", "folder")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
ADE_DIR = "ADEChallengeData2016"
ADE_SPLITS = {"train": "training", "test": "validation"}
ADE_CLASSES = 150
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """A dataset that cannot be read as asked (missing path or files, wrong format, missing labels)."""


@dataclass
class Batch:
    """Normalised images (B, 3, S, S), class labels (B,) or None, masks (B, S, S) uint8 or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    pixels: torch.Tensor  # (B, S, S, 3) in [0, 1], for figures


class ImageSource(Protocol):
    """A dataset split: `len`, optional class labels of every item, and batch loading."""

    labels: np.ndarray | None
    segmentation_classes: int  # 0 when the source has no masks

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int], img_size: int, mean: Sequence[float], std: Sequence[float]) -> Batch: ...


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, S, S, 3) in [0, 1] -> (B, 3, S, S) normalised."""
    images = pixels.permute(0, 3, 1, 2)
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------- CIFAR-10


def cifar10_dir(root: str | Path) -> Path:
    """The `cifar-10-batches-py` folder under `root` (or `root` itself); DataError naming what is missing."""
    root = Path(root).expanduser()
    folder = root / CIFAR_DIR if (root / CIFAR_DIR).is_dir() else root
    missing = [name for name in (*CIFAR_TRAIN_FILES, "test_batch", "batches.meta") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 not found under {root}: missing {', '.join(missing)} in {folder}")
    return folder


def _unpickle(path: Path) -> dict:
    # The dataset's own format is a pickle; only read files the user pointed us to.
    with path.open("rb") as handle:
        return pickle.load(handle, encoding="bytes")


def read_cifar10(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 python batches -> (images uint8 (N, 32, 32, 3), labels int64 (N,), class names).

    Args:
        root: folder holding `cifar-10-batches-py` (or that folder).
        split: `train` (data_batch_1..5) or `test` (test_batch).
    """
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split {split!r}: must be 'train' or 'test'")
    folder = cifar10_dir(root)
    files = CIFAR_TRAIN_FILES if split == "train" else ("test_batch",)
    batches = [_unpickle(folder / name) for name in files]
    data = np.concatenate([batch[b"data"] for batch in batches])  # (N, 3072): 1024 R, 1024 G, 1024 B
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    labels = np.concatenate([np.asarray(batch[b"labels"], dtype=np.int64) for batch in batches])
    classes = [name.decode() for name in _unpickle(folder / "batches.meta")[b"label_names"]]
    return np.ascontiguousarray(images), labels, classes


class ArraySource:
    """In-memory uint8 images (N, h, w, 3) with labels (CIFAR-10); resized bilinearly per batch."""

    segmentation_classes = 0

    def __init__(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices: Sequence[int], img_size: int, mean: Sequence[float], std: Sequence[float]) -> Batch:
        pixels = torch.from_numpy(self.images[list(indices)]).permute(0, 3, 1, 2).float() / 255  # (B, 3, h, w)
        pixels = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear", align_corners=False)
        pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1)  # (B, S, S, 3)
        labels = None if self.labels is None else torch.from_numpy(self.labels[list(indices)])
        return Batch(_normalise(pixels, mean, std), labels, None, pixels)


# ---------------------------------------------------------------- ADE20K and image folders


def ade20k_dir(root: str | Path) -> Path:
    """The `ADEChallengeData2016` folder under `root` (or `root` itself); DataError naming what is missing."""
    root = Path(root).expanduser()
    folder = root / ADE_DIR if (root / ADE_DIR).is_dir() else root
    needed = [f"{kind}/{split}" for kind in ("images", "annotations") for split in ADE_SPLITS.values()]
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise DataError(f"ADE20K not found under {root}: missing folders {', '.join(missing)} in {folder}")
    return folder


def ade20k_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image .jpg, annotation .png) pairs of an ADE20K split (`train` = training, `test` = validation)."""
    if split not in ADE_SPLITS:
        raise DataError(f"ADE20K split {split!r}: must be 'train' or 'test'")
    folder = ade20k_dir(root)
    images = sorted((folder / "images" / ADE_SPLITS[split]).glob("*.jpg"))
    if not images:
        raise DataError(f"ADE20K: no .jpg images in {folder / 'images' / ADE_SPLITS[split]}")
    pairs = [(image, folder / "annotations" / ADE_SPLITS[split] / f"{image.stem}.png") for image in images]
    missing = [str(annotation) for _, annotation in pairs if not annotation.is_file()]
    if missing:
        raise DataError(f"ADE20K: {len(missing)} annotations missing, e.g. {missing[0]}")
    return pairs


def read_ade20k_pair(image: Path, annotation: Path, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ADE20K pair resized to a square: (uint8 RGB (S, S, 3), uint8 labels (S, S): 0 other, 1..150)."""
    with Image.open(image) as picture:
        pixels = np.asarray(picture.convert("RGB").resize((img_size, img_size), Image.BILINEAR))
    with Image.open(annotation) as labels:
        # NEAREST keeps class ids intact; ADE annotations are single-channel class indices.
        mask = np.asarray(labels.resize((img_size, img_size), Image.NEAREST))
    if mask.ndim != 2:
        raise DataError(f"ADE20K annotation {annotation} is not a single-channel label image")
    return pixels, mask


class PathSource:
    """Images on disk (ADE20K pairs or a folder), decoded and resized per batch."""

    def __init__(
        self, images: list[Path], labels: np.ndarray | None = None, annotations: list[Path] | None = None
    ) -> None:
        self.images, self.labels, self.annotations = images, labels, annotations
        self.segmentation_classes = ADE_CLASSES if annotations is not None else 0

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices: Sequence[int], img_size: int, mean: Sequence[float], std: Sequence[float]) -> Batch:
        pictures, masks = [], []
        for index in indices:
            if self.annotations is not None:
                picture, mask = read_ade20k_pair(self.images[index], self.annotations[index], img_size)
                masks.append(mask)
            else:
                with Image.open(self.images[index]) as image:
                    picture = np.asarray(image.convert("RGB").resize((img_size, img_size), Image.BILINEAR))
            pictures.append(picture)
        pixels = torch.from_numpy(np.stack(pictures)).float() / 255  # (B, S, S, 3)
        labels = None if self.labels is None else torch.from_numpy(self.labels[list(indices)])
        mask_tensor = torch.from_numpy(np.stack(masks)) if masks else None
        return Batch(_normalise(pixels, mean, std), labels, mask_tensor, pixels)


def image_folder(root: str | Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """Images under `root`: labelled by sub-folder (`root/<class>/*.jpg`) or unlabelled (`root/*.jpg`)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    is_image = lambda path: path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and any(map(is_image, d.iterdir())))
    if classes:
        items = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).iterdir())]
        items = [(path, label) for path, label in items if is_image(path)]
        return [path for path, _ in items], np.array([label for _, label in items], dtype=np.int64), classes
    images = sorted(path for path in root.iterdir() if is_image(path))
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its sub-folders")
    return images, None, []


# ---------------------------------------------------------------- generated images


GENERATED_SIZE, GENERATED_PATCH, GENERATED_CLASSES = 64, 8, 4


def generated_images(count: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Images in the planted-artifact model's colour space, with a known class and segmentation per image.

    Each 64 px image (8 x 8 patches of 8 px) has a flat background, a textured object (a random 3-5 patch box)
    whose blue channel carries the class (blue never reaches the planted detector), and 1-2 flat trigger
    patches at random background positions, which the planted model turns into artifacts.
    Masks: 1 background, 2 + class on the object, 0 ("other", ignored) on the triggers.

    Returns:
        images (count, 3, 64, 64) already normalised, labels (count,), masks (count, 64, 64) uint8.
    """
    grid, patch = GENERATED_SIZE // GENERATED_PATCH, GENERATED_PATCH
    rng = np.random.default_rng(seed)
    images, labels, masks = [], [], []
    for index in range(count):
        label = int(rng.integers(GENERATED_CLASSES))
        height, width = rng.integers(3, 6, size=2)
        row0, col0 = int(rng.integers(0, grid - height + 1)), int(rng.integers(0, grid - width + 1))
        box = (row0, col0, row0 + int(height), col0 + int(width))
        background = [
            (r, c) for r in range(grid) for c in range(grid) if not (box[0] <= r < box[2] and box[1] <= c < box[3])
        ]
        picks = rng.choice(len(background), size=int(rng.integers(1, 3)), replace=False)
        triggers = [background[i] for i in picks]
        image = planted_images(
            triggers, batch=1, img_size=GENERATED_SIZE, patch_size=patch, object_box=box, seed=seed * 100_003 + index
        )[0]
        pixels = np.s_[box[0] * patch : box[2] * patch, box[1] * patch : box[3] * patch]
        image[2][pixels] += 1.5 * label - 2.25  # class in the object's blue channel
        mask = np.ones((GENERATED_SIZE, GENERATED_SIZE), dtype=np.uint8)
        mask[pixels] = 2 + label
        for row, col in triggers:
            mask[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = 0
        images.append(image)
        labels.append(label)
        masks.append(mask)
    return torch.stack(images), np.array(labels, dtype=np.int64), torch.from_numpy(np.stack(masks))


class GeneratedSource:
    """Generated images (see `generated_images`); resized with nearest so flat colours stay exact."""

    segmentation_classes = GENERATED_CLASSES + 1

    def __init__(self, count: int, seed: int) -> None:
        self.images, self.labels, self.masks = generated_images(count, seed)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices: Sequence[int], img_size: int, mean: Sequence[float], std: Sequence[float]) -> Batch:
        # Already in the planted model's normalised colour space: `mean` and `std` do not apply.
        images = F.interpolate(self.images[list(indices)], size=(img_size, img_size), mode="nearest")
        masks = F.interpolate(self.masks[list(indices)][:, None].float(), size=(img_size, img_size), mode="nearest")
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        pixels = ((images - low) / (high - low).clamp_min(1e-6)).permute(0, 2, 3, 1)
        return Batch(images, torch.from_numpy(self.labels[list(indices)]), masks[:, 0].to(torch.uint8), pixels)


# ---------------------------------------------------------------- specs and splits


@dataclass(frozen=True)
class Protocol:
    """Sample sizes and resolution of one probe pass."""

    train_images: int
    test_images: int
    img_size: int | None  # None: the model's own


def study_protocol(model_name: str, dataset: str) -> Protocol:
    """The study's sample sizes and resolutions (section 3.2) for a model family and dataset.

    CIFAR-10: DINOv2 800 train / 200 test at 196 px; DeiT-III 1500 / 400 at 384 px (the study's logistic
    regression; its position probe used 1000 / 10, we use one pass for both). ADE20K: DINOv2 518 px, DeiT-III
    224 px; the study used the full splits, the default here is 500 / 200 images (override with sizes).
    """
    family = "dinov2" if "dinov2" in model_name else "deit3" if "deit3" in model_name else "other"
    if dataset == "cifar10":
        return {
            "dinov2": Protocol(800, 200, 196),
            "deit3": Protocol(1500, 400, 384),
            "other": Protocol(800, 200, None),
        }[family]
    if dataset == "ade20k":
        return Protocol(500, 200, {"dinov2": 518, "deit3": 224}.get(family))
    if dataset == "generated":
        return Protocol(48, 16, None)
    return Protocol(0, 0, None)  # folder: all images, split 80 / 20


@dataclass(frozen=True)
class DataSpec:
    """Which dataset a run reads, and how many images.

    Args:
        kind: one of `DATASETS` (`folder` is a directory of images, labelled by sub-folder if it has them).
        root: dataset location (not used by `generated`).
        train_images, test_images: sample sizes (None: `study_protocol`).
        seed: which images are sampled.
    """

    kind: str
    root: str | None = None
    train_images: int | None = None
    test_images: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DATASETS:
            raise DataError(f"unknown dataset {self.kind!r}; allowed: {', '.join(DATASETS)}")
        if self.kind != "generated" and not self.root:
            raise DataError(f"dataset {self.kind!r} needs a path (data root)")
        if self.root:  # absolute, so Ray workers with another working directory find it too
            object.__setattr__(self, "root", str(Path(self.root).expanduser().resolve()))
        for name in ("train_images", "test_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"{name}={value}: must be at least 1")

    def check(self) -> None:
        """Fail now, naming the path or file, if the data are not there (cheap: no images decoded)."""
        if self.kind == "cifar10":
            cifar10_dir(self.root)
        elif self.kind == "ade20k":
            ade20k_pairs(self.root, "train")
            ade20k_pairs(self.root, "test")
        elif self.kind == "folder":
            image_folder(self.root)

    @property
    def has_masks(self) -> bool:
        return self.kind in ("ade20k", "generated")

    @property
    def has_labels(self) -> bool:
        if self.kind == "folder":
            return image_folder(self.root)[1] is not None
        return self.kind in ("cifar10", "generated")


@dataclass
class Split:
    """A sampled split: the source and the indices of the items used."""

    source: ImageSource
    indices: list[int]


def _ade20k_source(root: str | Path, split: str) -> PathSource:
    pairs = ade20k_pairs(root, split)
    return PathSource([image for image, _ in pairs], None, [annotation for _, annotation in pairs])


def _sample(total: int, count: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).permutation(total)[: min(count, total)].tolist())


def open_splits(spec: DataSpec, model_name: str) -> tuple[Split, Split, Protocol]:
    """The train and test splits of `spec` for a model, sampled by the spec's seed, and the protocol used."""
    protocol = study_protocol(model_name, spec.kind)
    n_train = spec.train_images or protocol.train_images
    n_test = spec.test_images or protocol.test_images
    if spec.kind == "cifar10":
        train, test = (ArraySource(*read_cifar10(spec.root, split)[:2]) for split in ("train", "test"))
    elif spec.kind == "ade20k":
        train, test = (_ade20k_source(spec.root, split) for split in ("train", "test"))
    elif spec.kind == "generated":
        train, test = GeneratedSource(n_train, spec.seed), GeneratedSource(n_test, spec.seed + 1)
    else:
        paths, labels, _ = image_folder(spec.root)
        order = np.random.default_rng(spec.seed).permutation(len(paths))
        cut = len(paths) * 4 // 5  # 80 / 20, disjoint
        source = PathSource(paths, labels)
        train_order, test_order = order[: min(spec.train_images or cut, cut)], order[cut:][: spec.test_images]
        used = Protocol(len(train_order), len(test_order), None)
        return Split(source, sorted(train_order.tolist())), Split(source, sorted(test_order.tolist())), used
    used = Protocol(n_train, n_test, protocol.img_size)
    return (
        Split(train, _sample(len(train), n_train, spec.seed)),
        Split(test, _sample(len(test), n_test, spec.seed)),
        used,
    )
