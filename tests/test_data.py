"""The data layer on a generated set: layout, FFCV writing with corrupt files, loaders, shards, repeated copies."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from train.data import (
    DataConfig,
    ShardLoader,
    build_loader,
    crop_and_flip,
    generate_dataset,
    read_class_names,
    shard_indices,
    shard_order,
    write_beton,
    writer,
)

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 4, 8, 4, 48
N_TRAIN, N_VAL = NUM_CLASSES * TRAIN_PER_CLASS, NUM_CLASSES * VAL_PER_CLASS
CLASSES = ["c00_circle", "c01_square", "c02_triangle", "c03_ring"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("generated"), NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0
    )


@pytest.fixture(scope="module")
def betons(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[Path]]:
    """train/val .betons of a copy of the generated set with two corrupt .JPEG files planted in train."""
    images = tmp_path_factory.mktemp("with_corrupt")
    shutil.copytree(generated, images, dirs_exist_ok=True)
    good = images / "train" / "c01_square" / "c01_square_00000.JPEG"
    truncated = images / "train" / "c01_square" / "c01_square_truncated.JPEG"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = images / "train" / "c03_ring" / "c03_ring_garbage.JPEG"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not an image")
    out = tmp_path_factory.mktemp("ffcv")
    reports = {s: write_beton(images, s, out / f"{s}.beton", num_workers=2, progress=False) for s in ("train", "val")}
    return out, reports, [truncated, garbage]


def ffcv_config(path: Path, **overrides: object) -> DataConfig:
    values: dict = dict(backend="ffcv", path=path, img_size=32, batch_size=4, num_workers=1)
    return DataConfig(**(values | overrides))


def beton_labels(beton: Path) -> np.ndarray:
    from ffcv.reader import Reader

    return np.asarray(Reader(str(beton)).metadata["f1"])  # f1: the label field, in write order


@pytest.fixture(scope="module")
def train_loaders(betons: tuple[Path, dict, list[Path]]) -> dict[str, ShardLoader]:
    """FFCV train loaders built once (each compiles its pipeline with numba), as name: (seed, rank of 2, threads)."""
    specs = {"a": (3, 1, 2), "b": (3, 1, 1), "rank0": (3, 0, 1), "seed4": (4, 1, 1)}
    return {
        name: build_loader(ffcv_config(betons[0], seed=seed, num_workers=threads), "train", rank=rank, world_size=2)
        for name, (seed, rank, threads) in specs.items()
    }


def ffcv_reference(
    beton: Path, indices: np.ndarray, seed: int, epoch: int, size: int = 32, copies: np.ndarray | None = None
) -> torch.Tensor:
    """What the FFCV train pipeline should yield for `indices` (and their repeated-augmentation `copies`), built
    sample by sample outside it: FFCV's own JPEG decode and crop-resize (libffcv, called from Python) of the box
    and flip `crop_and_flip` gives."""
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    file = np.memmap(beton, dtype=np.uint8, mode="r")
    starts, sizes = reader.alloc_table["ptr"], reader.alloc_table["size"]
    images = []
    copies = np.zeros_like(indices) if copies is None else copies
    for index, copy in zip(indices.tolist(), copies.tolist(), strict=True):
        field = reader.metadata["f0"][index]  # f0: the image field
        assert field["mode"] == 0  # jpg
        start, height, width = int(field["data_ptr"]), int(field["height"]), int(field["width"])
        jpeg = np.array(file[start : start + int(sizes[np.searchsorted(starts, start)])])
        full = np.empty((height, width, 3), dtype=np.uint8)
        imdecode(jpeg, full, height, width, height, width, 0, 0, 1, 1, False, False)
        top, left, h, w, flip = crop_and_flip(seed, epoch, index, height, width, scale=(0.08, 1.0), copy=copy)
        image = np.empty((size, size, 3), dtype=np.uint8)
        resize_crop(full, top, top + h, left, left + w, image)
        images.append(image[:, ::-1] if flip else image)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W)


# --- generated set ---------------------------------------------------------------------------------------------


def test_generated_set_has_imagenet_layout_and_decodes(generated: Path) -> None:
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        assert sorted(p.name for p in (generated / split).iterdir()) == CLASSES
        for name in CLASSES:
            files = sorted((generated / split / name).iterdir())
            assert len(files) == per_class
            for f in files:
                assert f.suffix == ".JPEG" and f.name.startswith(name)
                with Image.open(f) as image:
                    assert image.format == "JPEG"
                    image.load()
                    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_generation_is_deterministic_and_idempotent(generated: Path, tmp_path: Path) -> None:
    some = generated / "val" / "c02_triangle" / "c02_triangle_00001.JPEG"
    stamp = some.stat().st_mtime_ns
    generate_dataset(generated, NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0)  # complete: no-op
    assert some.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="already holds a generated set"):
        generate_dataset(generated, NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=1)

    again = generate_dataset(tmp_path / "a", NUM_CLASSES, 1, 2, SIZE, seed=0)
    other_seed = generate_dataset(tmp_path / "b", NUM_CLASSES, 1, 2, SIZE, seed=1)
    relative = some.relative_to(generated)
    assert (again / relative).read_bytes() == some.read_bytes()  # pixels depend on (seed, split, class, i) only
    assert (other_seed / relative).read_bytes() != some.read_bytes()


def test_generated_classes_are_separable_by_colour(generated: Path) -> None:
    # A nearest-centroid classifier on the hue histogram of saturated pixels: a floor on "learnable".
    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows, labels = [], []
        for label, name in enumerate(CLASSES):
            for f in sorted((generated / split / name).iterdir()):
                hsv = np.asarray(Image.open(f).convert("HSV")).reshape(-1, 3)
                hue = hsv[hsv[:, 1] > 120, 0]
                rows.append(np.histogram(hue, bins=24, range=(0, 256))[0] / max(1, hue.size))
                labels.append(label)
        return np.stack(rows), np.array(labels)

    x_train, y_train = features("train")
    x_val, y_val = features("val")
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(NUM_CLASSES)])
    predicted = np.argmin(((x_val[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y_val).mean() >= 0.9


# --- writing .beton files --------------------------------------------------------------------------------------


def test_write_beton_skips_and_lists_corrupt_images(betons: tuple[Path, dict, list[Path]]) -> None:
    out, reports, corrupt = betons
    train = reports["train"]
    assert train.num_written == N_TRAIN  # exactly the good images
    assert train.per_class == (TRAIN_PER_CLASS,) * NUM_CLASSES
    assert sorted(s.path for s in train.skipped) == sorted(str(p) for p in corrupt)
    assert all(s.reason for s in train.skipped)
    assert train.class_names == tuple(CLASSES)
    assert reports["val"].num_written == N_VAL and reports["val"].skipped == ()
    assert "2 skipped" in train.summary() and str(corrupt[0]) in train.summary()

    assert read_class_names(out / "train.beton") == CLASSES
    sidecar = json.loads((out / "train.classes.json").read_text())
    assert sidecar["num_samples"] == N_TRAIN and len(sidecar["skipped"]) == 2
    # Labels in ImageFolder order: class by class.
    assert beton_labels(out / "train.beton").tolist() == np.repeat(np.arange(NUM_CLASSES), TRAIN_PER_CLASS).tolist()
    assert not list(out.glob("*.partial")) and not list(out.glob("*.failures"))


def test_write_beton_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "train")):
        write_beton(tmp_path / "nowhere", "train", tmp_path / "train.beton", progress=False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        write_beton(tmp_path / "empty", "train", tmp_path / "train.beton", progress=False)


def test_write_beton_fails_cleanly_when_an_image_breaks_during_the_write(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check passes, then the writer's worker cannot decode: an error and no .beton, never a hang.
    images = tmp_path / "images"
    shutil.copytree(generated / "val", images / "val")
    (images / "val" / "c00_circle" / "zz.JPEG").write_bytes(b"garbage")
    monkeypatch.setattr(writer, "check_image", lambda path: None)
    with pytest.raises(RuntimeError, match="zz.JPEG"):
        write_beton(images, "val", tmp_path / "out" / "val.beton", num_workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


# --- loaders ---------------------------------------------------------------------------------------------------


def test_ffcv_val_loader_is_deterministic_in_file_order(betons: tuple[Path, dict, list[Path]]) -> None:
    out, _, _ = betons
    threads = torch.get_num_threads()
    loader = build_loader(ffcv_config(out, batch_size=5), "val")
    assert loader.class_names == CLASSES and loader.num_classes == NUM_CLASSES
    assert len(loader) == 4  # 16 samples: 5 + 5 + 5 + 1, the last partial batch kept
    first = list(loader)
    second = list(loader)
    assert [tuple(x.shape) for x, _ in first] == [(5, 3, 32, 32)] * 3 + [(1, 3, 32, 32)]
    for images, labels in first:
        assert images.dtype == torch.uint8 and images.is_contiguous() and labels.dtype == torch.int64
    labels = torch.cat([y for _, y in first]).tolist()
    assert labels == np.repeat(np.arange(NUM_CLASSES), VAL_PER_CLASS).tolist()  # folder classes, file order
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):  # kept batches were not overwritten by FFCV
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.get_num_threads() == threads  # FFCV would have set it to num_workers


def test_ffcv_train_loader_reads_its_shard_per_epoch(
    betons: tuple[Path, dict, list[Path]], train_loaders: dict[str, ShardLoader]
) -> None:
    out, _, _ = betons
    labels_on_disk = beton_labels(out / "train.beton")
    loader = train_loaders["b"]  # seed 3, rank 1 of 2
    loader.set_epoch(0)
    assert loader.num_samples == N_TRAIN // 2 and len(loader) == N_TRAIN // 2 // 4
    epochs = []
    for epoch in range(2):
        batches = list(loader)
        for images, labels in batches:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < NUM_CLASSES
        got = torch.cat([y for _, y in batches]).tolist()
        assert got == labels_on_disk[shard_indices(N_TRAIN, 1, 2, True, seed=3, epoch=epoch)].tolist()
        epochs.append(got)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    loader.set_epoch(0)  # resume: the same order again
    assert torch.cat([y for _, y in loader]).tolist() == epochs[0]


def test_ffcv_train_augmentation_is_a_function_of_seed_epoch_and_index(
    betons: tuple[Path, dict, list[Path]], train_loaders: dict[str, ShardLoader]
) -> None:
    beton = betons[0] / "train.beton"

    def read(name: str, epoch: int) -> torch.Tensor:
        train_loaders[name].set_epoch(epoch)
        return torch.cat([x for x, _ in train_loaders[name]])

    def expected(seed: int, rank: int, epoch: int) -> torch.Tensor:
        return ffcv_reference(beton, shard_indices(N_TRAIN, rank, 2, True, seed=seed, epoch=epoch), seed, epoch)

    def by_sample(images: torch.Tensor, seed: int, rank: int, epoch: int) -> dict[int, bytes]:
        indices = shard_indices(N_TRAIN, rank, 2, True, seed=seed, epoch=epoch).tolist()
        return {i: x.numpy().tobytes() for i, x in zip(indices, images, strict=True)}

    # Two decoding threads: exactly the crop_and_flip box of each sample, cut by FFCV's decoder; the epoch
    # reaches the compiled code.
    a = [read("a", epoch) for epoch in (0, 1)]
    for epoch in (0, 1):
        assert torch.equal(a[epoch], expected(3, 1, epoch))
    # A loader built separately, with one thread, reading epoch 1 first (as a resumed run does): the same bits.
    assert torch.equal(read("b", 1), a[1]) and torch.equal(read("b", 0), a[0])
    # An epoch left early does not change the next one; its reading thread has ended, also one that had
    # decoded the whole epoch into a full queue (FFCV's would wait forever to queue its end marker).
    for taken in (1, 2):
        batches = iter(train_loaders["a"])
        for _ in range(taken):
            next(batches)
        time.sleep(0.3)  # lets the reading thread fill the queue (4 batches, 2 ahead)
        batches.close()
        assert not [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"]
        assert torch.equal(read("a", 1), a[1])

    # Another epoch, or another seed: other crops of the same samples.
    epoch0, epoch1 = by_sample(a[0], 3, 1, 0), by_sample(a[1], 3, 1, 1)
    common = epoch0.keys() & epoch1.keys()
    assert len(common) >= 4 and all(epoch0[i] != epoch1[i] for i in common)
    seed4 = read("seed4", 0)
    assert torch.equal(seed4, expected(4, 1, 0))
    other = by_sample(seed4, 4, 1, 0)
    common = epoch0.keys() & other.keys()
    assert len(common) >= 4 and all(epoch0[i] != other[i] for i in common)

    # Rank 0 reads the other half of the permutation through the same function: disjoint shards.
    rank0 = read("rank0", 0)
    assert torch.equal(rank0, expected(3, 0, 0))
    assert sorted(by_sample(rank0, 3, 0, 0).keys() | epoch0.keys()) == list(range(N_TRAIN))


def test_two_ranks_read_disjoint_shards_that_cover_the_set(
    betons: tuple[Path, dict, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _, _ = betons
    # Val: every image exactly once across ranks (images identify samples: the centre crop is deterministic).
    shards = [list(build_loader(ffcv_config(out), "val", rank=0, world_size=2))]
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)  # a one-core node: more threads than it has
    with pytest.warns(UserWarning, match="num_workers=2: this node runs at most 1 FFCV threads"):
        shards.append(list(build_loader(ffcv_config(out, num_workers=2), "val", rank=1, world_size=2)))
    keys = [{x.numpy().tobytes() for images, _ in shard for x in images} for shard in shards]
    assert len(keys[0]) == len(keys[1]) == N_VAL // 2 and not keys[0] & keys[1]

    # Train and val index shards, for sizes that do and do not divide.
    for n in (N_TRAIN, 33):
        for epoch in range(3):
            train = [shard_indices(n, r, 2, True, seed=0, epoch=epoch) for r in range(2)]
            assert len(train[0]) == len(train[1]) == n // 2  # equal steps on every rank
            assert not set(train[0].tolist()) & set(train[1].tolist())
            sampler = DistributedSampler(range(n), num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)
            sampler.set_epoch(epoch)
            assert train[1].tolist() == list(sampler)
        val = [shard_indices(n, r, 2, False).tolist() for r in range(2)]
        assert sorted(val[0] + val[1]) == list(range(n))


def test_ffcv_repeated_augmentation_gives_each_copy_its_own_crop(betons: tuple[Path, dict, list[Path]]) -> None:
    beton = betons[0] / "train.beton"
    indices, copies = shard_order(N_TRAIN, 0, 1, True, seed=2, epoch=1, repeats=3)
    assert indices[:3].tolist() == [indices[0]] * 3 and copies[:3].tolist() == [0, 1, 2]  # one rank: in a row
    want = ffcv_reference(beton, indices, seed=2, epoch=1, copies=copies)
    assert len({want[k].numpy().tobytes() for k in range(3)}) == 3  # three crops of one image
    # os_cache=False: FFCV's process cache plans its page reads from the sample indices, not our keys.
    for os_cache in (True, False):
        config = ffcv_config(betons[0], seed=2, repeated_augmentations=3, os_cache=os_cache)
        loader = build_loader(config, "train", epoch=1)
        assert loader.num_samples == N_TRAIN and len(loader) == N_TRAIN // 4
        batches = list(loader)
        assert torch.equal(torch.cat([x for x, _ in batches]), want)
        labels = torch.cat([y for _, y in batches]).tolist()
        assert labels == beton_labels(beton)[indices].tolist()


def test_imagefolder_backend_yields_the_same_batches_shape(generated: Path, betons: tuple) -> None:
    config = DataConfig(backend="imagefolder", path=generated, img_size=32, batch_size=4, num_workers=0)
    val = build_loader(config, "val")
    batches = list(val)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32)] * (N_VAL // 4)
    assert all(x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in batches)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == beton_labels(betons[0] / "val.beton").tolist()  # same index order as the ffcv backend
    assert val.class_names == CLASSES

    train = build_loader(config, "train", rank=0, world_size=2)
    targets = np.array(datasets_targets(generated / "train"))
    got = torch.cat([y for _, y in train]).tolist()
    assert got == targets[shard_indices(N_TRAIN, 0, 2, True, seed=0, epoch=0)].tolist()


def datasets_targets(root: Path) -> list[int]:
    from torchvision.datasets import ImageFolder

    return ImageFolder(root).targets


@pytest.mark.parametrize("repeats", [1, 3])
def test_imagefolder_train_crops_are_crop_and_flip_of_seed_epoch_index_and_copy(generated: Path, repeats: int) -> None:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    samples = ImageFolder(generated / "train").samples

    def expected(epoch: int) -> torch.Tensor:
        images = []
        indices, copies = shard_order(N_TRAIN, 0, 1, True, seed=5, epoch=epoch, repeats=repeats)
        for index, copy in zip(indices.tolist(), copies.tolist(), strict=True):
            image = Image.open(samples[index][0]).convert("RGB")
            top, left, h, w, flip = crop_and_flip(5, epoch, index, image.height, image.width, (0.08, 1.0), copy=copy)
            image = F.resized_crop(image, top, left, h, w, [32, 32], interpolation=InterpolationMode.BICUBIC)
            images.append(F.pil_to_tensor(F.hflip(image) if flip else image))
        return torch.stack(images)

    want = {epoch: expected(epoch) for epoch in (0, 1)}
    for workers in (1, 0):  # a DataLoader worker process, then the main process
        config = DataConfig(
            backend="imagefolder",
            path=generated,
            img_size=32,
            batch_size=8,
            num_workers=workers,
            seed=5,
            repeated_augmentations=repeats,
        )
        loader = build_loader(config, "train", epoch=1)
        assert torch.equal(torch.cat([x for x, _ in loader]), want[1])
        loader.set_epoch(0)
        assert torch.equal(torch.cat([x for x, _ in loader]), want[0])


# --- configuration errors --------------------------------------------------------------------------------------


def test_build_loader_errors(generated: Path, betons: tuple) -> None:
    with pytest.raises(ValueError, match="split='test'"):
        build_loader(ffcv_config(betons[0]), "test")
    with pytest.raises(FileNotFoundError, match=str(generated / "train.beton")):
        build_loader(ffcv_config(generated), "train")  # an image folder holds no .beton
    with pytest.raises(ValueError, match="give both or neither"):
        build_loader(ffcv_config(betons[0]), "val", rank=1)
    folder = DataConfig(backend="imagefolder", path=generated, batch_size=64, num_workers=0)
    with pytest.raises(ValueError, match="batch_size=64"):
        build_loader(folder, "train", rank=0, world_size=2)
