"""Which samples each rank reads per epoch (`shard_order`, DeiT's repeated augmentation included) and the
loader interface both backends implement (`ShardLoader`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from train.data.config import DataConfig


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
