"""The data layer on a generated set: layout, FFCV writing with corrupt files, loaders, sharding, config errors."""

from __future__ import annotations

import json
import queue
import shutil
import threading
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from train import data
from train.data import (
    DataConfig,
    build_loader,
    generate_dataset,
    normalize_on_device,
    read_class_names,
    shard_indices,
    write_beton,
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
    monkeypatch.setattr(data, "check_image", lambda path: None)
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


def test_ffcv_train_loader_reads_its_shard_per_epoch(betons: tuple[Path, dict, list[Path]]) -> None:
    out, _, _ = betons
    labels_on_disk = beton_labels(out / "train.beton")
    loader = build_loader(ffcv_config(out, seed=3), "train", rank=1, world_size=2)
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


def test_imagefolder_augmentation_is_seeded_per_epoch(generated: Path) -> None:
    config = DataConfig(backend="imagefolder", path=generated, img_size=32, batch_size=8, num_workers=1)
    loader = build_loader(config, "train")
    first = torch.cat([x for x, _ in loader])
    loader.set_epoch(0)
    again = torch.cat([x for x, _ in loader])
    assert torch.equal(first, again)


def test_normalize_on_device() -> None:
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize_on_device(images, "cpu")
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(images.float())


# --- configuration errors --------------------------------------------------------------------------------------


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
        ({"hflip": "yes"}, ["hflip='yes'", "true or false"]),
    ],
)
def test_bad_config_names_field_value_and_allowed(generated: Path, overrides: dict, words: list[str]) -> None:
    values = {"backend": "ffcv", "path": generated} | overrides
    with pytest.raises(ValueError) as error:
        DataConfig(**values)
    for word in words:
        assert word in str(error.value)


def test_config_round_trips_and_rejects_unknown_keys(generated: Path) -> None:
    config = DataConfig(backend="imagefolder", path=str(generated), num_workers=0)
    assert config.path == generated
    assert DataConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown DataConfig field\(s\) img_sz; allowed: backend, path"):
        DataConfig.from_dict({"path": str(generated), "img_sz": 32})


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
        data._next_ffcv_batch(reader)
