"""Data-layer units that need no data set: the train crop of (seed, epoch, index, copy) and the shard order with
repeated augmentation (DeiT's RASampler) against hand-written oracles, config validation, normalisation, FFCV's
reading thread."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from train import data
from train.data import DataConfig, crop_and_flip, ffcv_backend, normalize_on_device, shard_order


def test_crop_and_flip_is_a_pure_function_shared_by_both_backends() -> None:
    jitted = ffcv_backend._ffcv_kernels()[0]  # the numba build FFCV's decoder calls
    boxes: dict[tuple, list] = {}
    for height, width, scale in ((48, 48, (0.08, 1.0)), (256, 171, (0.35, 1.0)), (10, 300, (0.08, 1.0))):
        for seed, epoch, index, copy in np.ndindex(2, 2, 50, 3):
            box = crop_and_flip(seed, epoch, index, height, width, scale, copy=copy)
            args = (np.uint64(index), np.uint64(copy), np.uint32(height), np.uint32(width), *scale, *data.CROP_RATIO)
            assert jitted(seed, epoch, *args) == box  # the same bits compiled (fastmath around it) and in Python
            top, left, h, w, _ = box
            assert 0 <= top < top + h <= height and 0 <= left < left + w <= width
            boxes.setdefault((height, width), []).append(box)
    # 600 draws per size (seed x epoch x index x copy): distinct boxes (so every copy of a sample gets its own),
    # fair flips, areas in range, and as torchvision would crop.
    square, portrait = boxes[(48, 48)], boxes[(256, 171)]
    assert len(set(square)) > 580 and len(set(portrait)) > 580
    assert crop_and_flip(1, 1, 7, 256, 171) == crop_and_flip(1, 1, 7, 256, 171, copy=0)
    assert 0.45 < np.mean([flip for *_, flip in square + portrait]) < 0.55
    assert all(0.08 * 0.9 < h * w / 48**2 <= 1 for _, _, h, w, _ in square)  # rounding: a little below 0.08
    assert all(0.35 * 0.97 < h * w / (256 * 171) <= 1 for _, _, h, w, _ in portrait)
    # 30:1 has no box with a ratio in [3/4, 4/3] and >= 8% of the area: torchvision's centre-crop fallback.
    assert {box[:4] for box in boxes[(10, 300)]} == {(0, 143, 10, 13)}


def rasampler_oracle(n: int, rank: int, world: int, repeats: int, seed: int, epoch: int) -> tuple[list, list]:
    """DeiT's RASampler written out with lists (without its rounding to 256): permute (torch, seed + epoch),
    repeat every entry `repeats` times in a row, deal the list out to the ranks, keep n // world per rank."""
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    repeated = [(index, copy) for index in permutation for copy in range(repeats)]
    dealt = repeated[rank::world][: n // world]
    return [index for index, _ in dealt], [copy for _, copy in dealt]


@pytest.mark.parametrize(
    ("n", "world", "repeats"), [(32, 1, 3), (32, 2, 3), (33, 4, 3), (100, 3, 3), (50, 8, 2), (33, 2, 1)]
)
def test_repeated_augmentation_order_is_deits_rasampler(n: int, world: int, repeats: int) -> None:
    orders = []
    for epoch in range(2):
        shards = [shard_order(n, r, world, True, seed=5, epoch=epoch, repeats=repeats) for r in range(world)]
        for rank, (indices, copies) in enumerate(shards):
            assert indices.dtype == copies.dtype == np.uint64
            assert (indices.tolist(), copies.tolist()) == rasampler_oracle(n, rank, world, repeats, 5, epoch)
            again = shard_order(n, rank, world, True, seed=5, epoch=epoch, repeats=repeats)  # a pure function
            assert np.array_equal(again[0], indices) and np.array_equal(again[1], copies)
            if world >= repeats:  # the copies of a sample go to different ranks
                assert len(set(indices.tolist())) == len(indices)
        pairs = [pair for indices, copies in shards for pair in zip(indices.tolist(), copies.tolist(), strict=True)]
        assert len(pairs) == n // world * world  # an epoch is still about one pass of samples
        assert len(set(pairs)) == len(pairs)  # no (sample, copy) twice
        counts = np.bincount([index for index, _ in pairs], minlength=n)
        assert counts.max() == repeats and np.count_nonzero((counts > 0) & (counts < repeats)) <= 1  # cut once
        assert np.count_nonzero(counts) == -(-len(pairs) // repeats)  # about n / repeats distinct samples
        orders.append(pairs)
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_normalize_on_device() -> None:
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize_on_device(images, "cpu")
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(images.float())


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"backend": "tfrecord"}, ["backend", "'tfrecord'", "ffcv", "imagefolder"]),
        ({"path": None}, ["path", "required"]),
        ({"path": "/no/such/dir"}, ["path", "/no/such/dir", "no such directory"]),
        ({"img_size": 0}, ["img_size=0", ">= 8"]),
        ({"batch_size": "8"}, ["batch_size='8'", "integer"]),
        ({"num_workers": 0}, ["num_workers=0", ">= 1"]),
        ({"min_crop_scale": 1.5}, ["min_crop_scale=1.5", "(0, 1]"]),
        ({"crop_pct": 0.0}, ["crop_pct=0.0", "(0, 1]"]),
        ({"crop_pct": 1.2}, ["crop_pct=1.2", "(0, 1]"]),
        ({"eval_interpolation": "nearest"}, ["eval_interpolation='nearest'", "bicubic", "bilinear"]),
        ({"repeated_augmentations": 0}, ["repeated_augmentations=0", ">= 1"]),
        ({"hflip": "yes"}, ["hflip='yes'", "true or false"]),
    ],
)
def test_bad_config_names_field_value_and_allowed(tmp_path: Path, overrides: dict, words: list[str]) -> None:
    values = {"backend": "ffcv", "path": tmp_path} | overrides
    with pytest.raises(ValueError) as error:
        DataConfig(**values)
    for word in words:
        assert word in str(error.value)


def test_config_round_trips_and_rejects_unknown_keys(tmp_path: Path) -> None:
    config = DataConfig(backend="imagefolder", path=str(tmp_path), num_workers=0)
    assert config.path == tmp_path
    assert DataConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown DataConfig field\(s\) img_sz; allowed: backend, path"):
        DataConfig.from_dict({"path": str(tmp_path), "img_sz": 32})


def test_a_dead_ffcv_reading_thread_is_an_error_not_a_hang() -> None:
    # FFCV's reading thread dies on a pipeline error without queueing anything; next() would wait forever.
    class DeadReader(threading.Thread):
        def __init__(self) -> None:
            super().__init__(daemon=True)
            self.output_queue: queue.Queue = queue.Queue()

    reader = DeadReader()
    reader.start()
    reader.join()
    with pytest.raises(RuntimeError, match="reading thread"):
        ffcv_backend._next_ffcv_batch(reader)
