"""The imagefolder backend: plain torchvision over `<path>/<split>/<class>/<image>`, for users without FFCV.

Files are those torchvision's ImageFolder sees (its IMG_EXTENSIONS: README.txt and the like are ignored) and are
read with `load_rgb`, the .beton writer's reader, so every mode (CMYK, grey, 16-bit, RGBA, palette) gives the
same pixels on both paths. Before any compute the folder is checked: a class folder without images, and files
that do not open as images (empty, not an image, float mode), are refused with an error listing them all. This
backend refuses rather than skips: skipping would change the data set (and its indices) silently on every run,
while `write_beton` skips once and records the list. Only the header is read up front (decoding all of
ImageNet at every start would take minutes on every rank); a file truncated after its header fails when it is
first read, with an error naming it (`check_image_folder(..., decode=True)` finds those up front).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from train.data import writer
from train.data.crops import crop_and_flip
from train.data.sharding import ShardLoader
from train.data.writer import find_samples, load_rgb, mode_note

if TYPE_CHECKING:
    from train.data.config import DataConfig


def check_image_folder(root: Path, num_workers: int = 1, decode: bool = False) -> None:
    """Refuse `root` (one folder per class) if a class folder has no image file or an image file does not open.

    The error names every bad file with its reason. decode=False reads headers only (empty, non-image and
    float-mode files); decode=True decodes every image completely, as write_beton does (truncated files too).
    A warning counts the images of each other mode than RGB, which `load_rgb` converts (RGBA: alpha dropped).
    """
    _, samples = find_samples(root)  # an error naming each class folder without images
    paths = [path for path, _ in samples]
    check = writer.decode_check if decode else writer.header_check
    checked = writer._check_all(paths, num_workers, False, "", check)
    problems = [(path, reason) for path, (reason, _) in zip(paths, checked, strict=True) if reason]
    if problems:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        raise ValueError(
            f"{len(problems)} of {len(paths)} image files under {root} are not readable images; remove or "
            f"replace them (python train/write_beton.py skips and lists such files):\n{listing}"
        )
    if note := mode_note(dict(Counter(mode for _, mode in checked))):
        warnings.warn(f"{root}: {note}", stacklevel=2)  # e.g. that RGBA images lose their alpha channel


class _SeededCropFolder(datasets.ImageFolder):
    """An ImageFolder train split read by `(epoch, index, copy)` keys, cropped and flipped by `crop_and_flip`.

    The epoch and the repeated-augmentation copy travel with each key (the sampler makes them), so a sample's
    pixels do not depend on which process reads it or on any state of this object.
    """

    def __init__(self, root: Path, config: DataConfig) -> None:
        super().__init__(root, loader=load_rgb)
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
        check_image_folder(root, num_workers=max(1, config.num_workers))
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
            self._dataset = datasets.ImageFolder(root, transform=transforms.Compose(ops), loader=load_rgb)
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
