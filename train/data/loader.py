"""`build_loader`: one rank's batches of a split from either backend."""

from __future__ import annotations

import torch

from train.data.config import SPLITS, DataConfig
from train.data.ffcv_backend import _FFCVShard
from train.data.imagefolder_backend import _ImageFolderShard
from train.data.sharding import ShardLoader, resolve_rank


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
