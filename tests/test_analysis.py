"""Probes against known answers (synthetic arrays, the planted-artifact model), readers on files in the real formats,
config errors, and the Ray runner end to end on tiny models and generated images."""

from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import probes
from analysis.bank import batch_ranges
from analysis.data import (
    ArraySource,
    DataError,
    DataSpec,
    PathSource,
    ade20k_pairs,
    generated_images,
    image_folder,
    open_splits,
    read_cifar10,
    study_protocol,
)
from analysis.extract import figure_queries, query_attention, sample_tokens
from analysis.runner import AnalysisConfig, AnalysisConfigError, plan_banks
from analysis.segmentation import (
    IGNORE_INDEX,
    HeadSettings,
    LastBlockSegmenter,
    LinearSegmenter,
    evaluate_segmenter,
    mean_iou,
    to_targets,
    train_segmenter,
)
from analysis.specs import ModelSpecError, load_model, parse_model_spec
from analysis.tasks import ProbeSettings, ProbeTask, run_task
from vitreg import ArtifactRemoval, detect_artifacts, run_taps
from vitreg.synthetic import planted_artifact_vit, planted_images

ARTIFACTS = [(0, 0), (0, 7), (7, 7)]  # background patches of the default 8 x 8 planted grid
GRID = (8, 8)
FAST = ProbeSettings(
    batch_size=8,
    max_iter=200,
    seg_head=HeadSettings(epochs=2),
    seg_block=HeadSettings(epochs=1),
    seg_registers=(0, 1),
)


@pytest.fixture(scope="module")
def planted():
    """The planted model, images with artifacts at ARTIFACTS, and one tapped pass over them."""
    model = planted_artifact_vit()
    images = planted_images(ARTIFACTS, batch=4)
    taps = run_taps(model, images, attention_layers=None, keep_patch_embedding=True, full_attention_layers=(3, 5))
    return model, images, taps


def flat(positions: list[tuple[int, int]]) -> list[int]:
    return sorted(row * GRID[1] + col for row, col in positions)


# ---------------------------------------------------------------- 1. norms


def test_norm_probe_finds_planted_outliers_from_plant_block(planted):
    _, _, taps = planted
    norms = taps.patch_norms.numpy()  # (6, 4, 64)
    rows = probes.norm_distribution(norms, taps.layers)
    fractions = [row["outlier_fraction"] for row in rows]
    assert fractions[:2] == [0.0, 0.0]
    assert fractions[2:] == pytest.approx([len(ARTIFACTS) / 64] * 4)
    assert probes.first_outlier_layer(taps.layers, fractions) == 2
    assert rows[-1]["max_median_ratio"] > 20 and rows[0]["max_median_ratio"] < 5
    mask = detect_artifacts(taps.patch_norms[-1]).mask
    assert all(np.flatnonzero(image).tolist() == flat(ARTIFACTS) for image in mask.numpy())
    counts = probes.norm_histograms(norms)
    assert counts.shape == (6, len(probes.NORM_BIN_EDGES) - 1)
    assert (counts.sum(axis=1) == 4 * 64).all()
    high_bins = probes.NORM_BIN_EDGES[1:] > 20
    assert counts[-1, high_bins].sum() == 4 * len(ARTIFACTS) and counts[0, high_bins].sum() == 0


def test_first_outlier_layer_none_without_outliers():
    assert probes.first_outlier_layer([3, 1, 2], [0.0, 0.0, 0.0]) is None
    assert probes.first_outlier_layer([3, 1, 2], [0.1, 0.0, 0.2]) == 2


# ---------------------------------------------------------------- 2. attention maps


def test_map_measures_have_known_values():
    flat_map = np.ones((1, 4, 4))
    spike = np.zeros((1, 4, 4))
    spike[0, 1, 2] = 5.0  # interior patch: 4 neighbours
    assert probes.total_variation(flat_map) == pytest.approx([0.0])
    assert probes.total_variation(spike) == pytest.approx([4.0])
    assert probes.attention_entropy(flat_map) == pytest.approx([1.0])
    assert probes.attention_entropy(spike) == pytest.approx([0.0])
    stats = probes.attention_stats(spike, artifact_mask=spike > 0)
    assert stats["peak_share"] == pytest.approx(1.0) and stats["artifact_mass"] == pytest.approx(1.0)
    rows = np.zeros((2, 1 + 2 + 4))  # (H, T): CLS, 2 registers, 4 patches on a 2 x 2 grid
    rows[0, 3:] = [0.1, 0.2, 0.3, 0.4]
    rows[1, 3:] = [0.3, 0.2, 0.1, 0.0]
    np.testing.assert_allclose(probes.head_mean_map(rows, prefix=3, grid=(2, 2)), [[0.2, 0.2], [0.2, 0.2]])
    assert probes.log_attention(np.array([0.0, 0.01])) == pytest.approx([-8.0, -2.0])


def test_query_attention_matches_full_attention_rows(planted):
    model, images, taps = planted
    queries = torch.tensor([[0, 1, 1 + 7], [0, 1 + 63, 1 + 20], [0, 5, 6], [0, 1, 2]])  # CLS and patches
    rows = query_attention(model, images, [3, 5], queries)  # (2, B, H, 3, T)
    for index, layer in enumerate((3, 5)):
        full = taps.full_attention[layer]  # (B, H, T, T)
        expected = torch.stack([full[b][:, queries[b]] for b in range(4)])  # (B, H, 3, T)
        torch.testing.assert_close(rows[index], expected, rtol=1e-4, atol=1e-6)


def test_attention_progression_shows_artifacts_drawing_attention_after_plant(planted):
    model, images, taps = planted
    queries, names = figure_queries(taps.patch_norms[-1], prefix=1, seed=0)
    assert names == ["cls", "normal patch", "highest-norm patch"]
    assert all(int(q) - 1 in flat(ARTIFACTS) for q in queries[:, 2])  # the highest-norm patch is an artifact
    maps = probes.head_mean_map(
        query_attention(model, images, range(6), queries).numpy().transpose(0, 1, 3, 2, 4), 1, GRID
    )
    mask = np.zeros(GRID, dtype=bool)
    mask.flat[flat(ARTIFACTS)] = True
    mass = [
        probes.attention_stats(maps[layer, :, 0], np.broadcast_to(mask, (4, *GRID)))["artifact_mass"]
        for layer in range(6)
    ]
    assert max(mass[:3]) < 0.1 and min(mass[3:]) > 0.5  # CLS attends to artifacts from block plant_block + 1


# ---------------------------------------------------------------- 3. correspondence


def test_overlap_of_top_norm_and_top_attention():
    norms = np.array([[9.0, 1, 1, 1, 8, 1, 1, 1, 1, 1]])
    attention = np.array([[0.5, 0.0, 0.3, 0, 0, 0, 0, 0, 0, 0.2]])
    same = probes.norm_attention_overlap(norms, norms, percent=20)
    assert same["precision"] == pytest.approx([1.0]) and same["iou"] == pytest.approx([1.0])
    half = probes.norm_attention_overlap(norms, attention, percent=20)  # top 2: {0, 4} vs {0, 2}
    assert half["precision"] == pytest.approx([0.5]) and half["recall"] == pytest.approx([0.5])
    assert half["iou"] == pytest.approx([1 / 3])


def test_planted_high_norm_tokens_are_high_attention_tokens(planted):
    _, _, taps = planted
    attention = taps.cls_attention_map(5).reshape(4, -1).numpy()
    overlap = probes.norm_attention_overlap(taps.patch_norms[-1].numpy(), attention, percent=5)  # top 4 of 64
    assert overlap["precision"] == pytest.approx([0.75] * 4)  # the 3 artifacts; the 4th pick of each is noise


# ---------------------------------------------------------------- 4. neighbours


def test_neighbour_cosine_known_values_and_no_wrap():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    embedding = np.stack([a] * 9).reshape(1, 9, 2)
    embedding[0, 0] = b  # top-left corner orthogonal to everything
    cosine = probes.neighbour_cosine(embedding, (3, 3)).reshape(3, 3)
    assert cosine[0, 0] == pytest.approx(0.0)
    assert cosine[0, 1] == pytest.approx(2 / 3)  # 3 neighbours, one of them the corner
    assert cosine[1, 1] == pytest.approx(1.0)
    assert cosine[0, 2] == pytest.approx(1.0)  # would see the corner if rows wrapped around
    assert cosine[2, 2] == pytest.approx(1.0)
    stats = probes.neighbour_similarity(cosine.reshape(1, 9), (cosine < 0.5).reshape(1, 9))
    assert stats["artifact_mean"] == 0.0 and stats["artifact_count"] == 1 and stats["normal_count"] == 8


def test_planted_artifact_neighbours_are_the_flat_background(planted):
    _, _, taps = planted
    cosine = probes.neighbour_cosine(taps.patch_embedding.numpy(), GRID).reshape(4, *GRID)
    embedding = taps.patch_embedding[0].reshape(*GRID, -1)
    trigger, background = embedding[0, 0], embedding[1, 0]
    expected = torch.nn.functional.cosine_similarity(trigger, background, dim=0).item()
    assert cosine[0, 0, 0] == pytest.approx(expected, abs=1e-5)  # the corner trigger sees two background patches
    assert cosine[0, 0, 3] == pytest.approx(1.0, abs=1e-5)  # flat background among flat background
    assert cosine[0, 0, 1] == pytest.approx((1 + 1 + expected) / 3, abs=1e-5)  # background next to the trigger
    # The trigger colour differs from the background, so the planted model's artifacts are *less* similar to
    # their neighbours than background patches are: claim 4 is not built into it, and the probe must say so.
    assert cosine[0, 0, 0] < 0.9


# ---------------------------------------------------------------- 5-7. linear probes


def synthetic_sample(images: int = 240, classes: int = 4, channels: int = 16, seed: int = 0):
    """Top candidate 0 of each image carries its class (an 'artifact' with global information); the random
    candidates carry their patch position (one-hot in the first 16 channels); everything else is noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(classes, size=images)
    top_index = np.stack([rng.choice(16, 2, replace=False) for _ in range(images)])
    random_index = np.stack([np.setdiff1d(rng.permutation(16), row)[:4] for row in top_index])
    top = rng.normal(0, 0.3, (images, 2, channels))
    top[np.arange(images), 0, labels] += 3.0
    rand = rng.normal(0, 0.3, (images, 4, channels))
    rand[np.arange(images)[:, None], np.arange(4)[None], random_index] += 3.0
    mask = np.zeros((images, 16), dtype=bool)
    mask[np.arange(images), top_index[:, 0]] = True  # only candidate 0 is an artifact
    sample = probes.TokenSample(top_index, top, random_index, rand)
    return sample, mask, labels, np.arange(images) < images * 3 // 4


def test_pick_per_image_picks_only_valid_candidates():
    valid = np.array([[False, True, False], [False, False, False], [True, True, True]])
    picks = probes.pick_per_image(valid, np.random.default_rng(0))
    assert picks[0] == 1 and picks[1] == -1 and picks[2] in (0, 1, 2)


def test_global_information_artifact_token_holds_the_class():
    sample, mask, labels, is_train = synthetic_sample()
    rows, _ = probes.global_information(sample, mask, labels, int((~is_train).sum()))
    rows = {row["tokens"]: row for row in rows}
    assert rows["artifact"]["accuracy_mean"] > 0.9
    assert rows["normal"]["accuracy_mean"] < 0.5  # 4 classes: chance is 0.25
    assert rows["artifact"]["seeds"] == 3 and rows["artifact"]["test_tokens_mean"] == 60


def test_local_information_normal_tokens_know_where_they_are():
    sample, mask, _, is_train = synthetic_sample()
    rows, _ = probes.local_information(sample, mask, (4, 4), int((~is_train).sum()))
    rows = {row["tokens"]: row for row in rows}
    assert rows["normal"]["top1"] > 0.9 and rows["normal"]["mean_distance"] < 0.2
    assert rows["artifact"]["top1"] < 0.3 and rows["artifact"]["mean_distance"] > 1.0
    assert rows["artifact"]["count"] == rows["normal"]["count"] == 240  # normal subsampled to the artifact count


def test_representation_quality_separates_informative_from_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(3, size=150)
    informative = np.eye(3)[labels] * 2 + rng.normal(0, 0.3, (150, 3))
    rows, _ = probes.representation_quality({"cls": informative, "mean_patch": rng.normal(size=(150, 3))}, labels, 50)
    accuracy = {row["features"]: row["accuracy_mean"] for row in rows}
    assert accuracy["cls"] > 0.9 and accuracy["mean_patch"] < 0.6


def test_sample_tokens_keeps_top_norm_and_stable_random_picks():
    patches = torch.arange(2 * 10 * 3, dtype=torch.float).reshape(2, 10, 3)
    norms = torch.tensor([[0, 9, 0, 0, 8, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0, 0, 6]], dtype=torch.float)
    sample = sample_tokens(patches, norms, np.array([7, 8]), top=2, random=3, seed=0)
    assert sample.top_index.tolist() == [[1, 4], [9, 0]]
    np.testing.assert_array_equal(sample.top_features[0, 0], patches[0, 1].numpy())
    assert not set(sample.random_index[0]) & {1, 4}
    again = sample_tokens(patches[1:], norms[1:], np.array([8]), top=2, random=3, seed=0)
    assert again.random_index[0].tolist() == sample.random_index[1].tolist()  # same image id, same picks


# ---------------------------------------------------------------- 8. segmentation


def test_miou_ignores_other_and_classes_absent_everywhere():
    # ADE-style labels: 0 = other. Classes 1..4 -> targets 0..3; class 4 appears nowhere.
    labels = torch.tensor([[1, 1, 2], [2, 0, 3]])
    predicted = torch.tensor([[0, 0, 0], [1, 3, 1]])  # the "other" pixel is predicted 3: must not count
    targets = to_targets(labels)
    assert targets[1, 1] == IGNORE_INDEX
    miou, iou = mean_iou(predicted, targets, num_classes=4)
    # class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1, FP 1 -> 1/3; class 3: TP 0, FN 1 -> 0; class 4: absent
    np.testing.assert_allclose(iou[:3], [2 / 3, 1 / 3, 0.0])
    assert math.isnan(iou[3])
    assert miou == pytest.approx(1 / 3)


def test_linear_head_learns_separable_patches():
    torch.manual_seed(0)
    classes, grid = 3, (2, 2)
    labels = torch.randint(1, classes + 1, (40, 2, 2))  # one class per patch, 8 px patches at 16 px
    pixels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2).to(torch.uint8)  # (40, 16, 16)
    features = torch.eye(classes)[labels.reshape(40, 4) - 1] * 3 + 0.1 * torch.randn(40, 4, classes)
    segmenter = train_segmenter(
        LinearSegmenter(classes, classes),
        features[:30],
        pixels[:30],
        grid,
        HeadSettings(epochs=60, lr=0.05, batch_size=10),
        seed=0,
    )
    miou, _ = evaluate_segmenter(segmenter, features[30:], pixels[30:], grid, classes)
    assert miou > 0.6  # bilinear upsampling blurs patch borders; chance is about 0.2


def test_last_block_segmenter_inserts_registers_before_the_block():
    model = planted_artifact_vit()
    tokens = torch.randn(2, 1 + 64, 64)
    segmenter = LastBlockSegmenter(model.blocks[-1], model.norm, prefix=1, registers=3, classes=5)
    assert segmenter(tokens).shape == (2, 64, 5)
    assert segmenter.block is not model.blocks[-1]  # a trained copy; the frozen model is untouched
    with torch.no_grad():
        plain = LastBlockSegmenter(model.blocks[-1], model.norm, prefix=1, registers=0, classes=5)
        plain.head.load_state_dict(segmenter.head.state_dict())
        expected = plain.head(model.norm(model.blocks[-1](tokens))[:, 1:])
        torch.testing.assert_close(plain(tokens), expected)


# ---------------------------------------------------------------- 9. removal


def test_removal_after_plant_smooths_attention_and_artifacts_do_not_return(planted):
    model, images, taps = planted
    removal = ArtifactRemoval([3])
    edited = run_taps(model, images, token_edit=removal)
    assert all(np.flatnonzero(row).tolist() == flat(ARTIFACTS) for row in removal.removed[3].numpy())
    effect, _ = probes.removal_effect(
        taps.cls_attention_map(5).numpy(), edited.cls_attention_map(5).numpy(), np.zeros(4), np.zeros(4)
    )
    assert effect["total_variation_removed"] < effect["total_variation_clean"] / 5
    assert effect["smoother_fraction"] == 1.0
    assert detect_artifacts(edited.patch_norms[-1]).count == 0


def test_removal_task_removes_from_the_first_outlier_block_on():
    spec = parse_model_spec("planted")
    result = run_task(
        ProbeTask(spec, "final", ("removal",), DataSpec("generated", train_images=16, test_images=8), FAST)
    )
    assert not result.errors
    (row,) = result.tables["removal"]
    # As the study: from the plant block (2) on, every block but the last (5) of the 6.
    assert row["layers"] == "2 3 4" and row["layer"] == 2 and row["removed_per_image"] >= 1
    assert row["outlier_fraction_clean"] > 0 and row["outlier_fraction_removed"] == 0
    assert row["total_variation_removed"] < row["total_variation_clean"]


def test_failing_probe_is_recorded_and_others_still_report(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("neighbour probe broke")

    monkeypatch.setattr(probes, "neighbour_similarity", broken)
    task = ProbeTask(
        parse_model_spec("planted"),
        "final",
        ("neighbours", "correspondence"),
        DataSpec("generated", train_images=8, test_images=8),
        FAST,
    )
    result = run_task(task)
    assert [(e["probe"], e["error"]) for e in result.errors] == [("neighbours", "RuntimeError: neighbour probe broke")]
    assert result.tables["correspondence"][0]["attention_artifact_mean"] > 0.2


# ---------------------------------------------------------------- data readers


def write_cifar(root, per_batch: int = 3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(10, size=per_batch).tolist(), b"data": data}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)
    names = [
        n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, handle)
    return folder


def test_cifar10_reader_keeps_the_pickle_layout(tmp_path):
    folder = write_cifar(tmp_path)
    images, labels, classes = read_cifar10(tmp_path, "train")
    assert images.shape == (15, 32, 32, 3) and labels.shape == (15,) and classes[3] == "cat"
    with (folder / "data_batch_2").open("rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    row = raw[b"data"][1]  # 1024 red, 1024 green, 1024 blue values, row-major
    assert images[4, 0, 5].tolist() == [row[5], row[1024 + 5], row[2048 + 5]]
    assert labels[4] == raw[b"labels"][1]
    test_images, _, _ = read_cifar10(folder, "test")
    assert len(test_images) == 3
    batch = ArraySource(images, labels).load([4], img_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert batch.images.shape == (1, 3, 64, 64)
    assert batch.images.min() >= -2.0 - 1e-6 and batch.images.max() <= 2.0 + 1e-6


def test_cifar10_missing_files_are_named(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar10(tmp_path, "train")


def test_study_protocol_defaults():
    assert study_protocol("vit_large_patch14_dinov2.lvd142m", "cifar10").__dict__ == {
        "train_images": 800,
        "test_images": 200,
        "img_size": 196,
    }
    assert study_protocol("deit3_small_patch16_224.fb_in22k_ft_in1k", "cifar10").__dict__ == {
        "train_images": 1500,
        "test_images": 400,
        "img_size": 384,
    }
    assert study_protocol("deit3_small_patch16_224", "ade20k").img_size == 224


def write_ade20k(root, images: int = 2):
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for index in range(images):
            stem = f"ADE_{split}_{index:08d}"
            Image.fromarray(np.full((40, 60, 3), 90, dtype=np.uint8)).save(base / "images" / split / f"{stem}.jpg")
            labels = np.zeros((40, 60), dtype=np.uint8)
            labels[:, 30:] = 150  # left half "other", right half the last class
            labels[:20, :30] = 7
            Image.fromarray(labels).save(base / "annotations" / split / f"{stem}.png")
    return base


def test_ade20k_reader_pairs_and_nearest_resized_labels(tmp_path):
    write_ade20k(tmp_path)
    pairs = ade20k_pairs(tmp_path, "test")
    assert (
        [p[0].stem for p in pairs]
        == [p[1].stem for p in pairs]
        == ["ADE_validation_00000000", "ADE_validation_00000001"]
    )
    train, test, protocol = open_splits(
        DataSpec("ade20k", str(tmp_path), train_images=2, test_images=1), "deit3_small_patch16_224"
    )
    assert protocol.img_size == 224 and len(train.indices) == 2 and len(test.indices) == 1
    assert test.source.segmentation_classes == 150
    batch = test.source.load(test.indices, 32, (0.5,) * 3, (0.5,) * 3)
    assert batch.masks.shape == (1, 32, 32) and set(batch.masks.unique().tolist()) == {0, 7, 150}
    assert batch.masks[0, 0, 0] == 7 and batch.masks[0, -1, -1] == 150 and batch.masks[0, -1, 0] == 0
    assert batch.labels is None


def test_ade20k_missing_annotation_is_named(tmp_path):
    base = write_ade20k(tmp_path)
    (base / "annotations" / "training" / "ADE_training_00000001.png").unlink()
    with pytest.raises(DataError, match="ADE_training_00000001.png"):
        DataSpec("ade20k", str(tmp_path)).check()


def test_image_folder_labels_from_subfolders(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / name / "a.png")
    paths, labels, classes = image_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 1] and len(paths) == 2
    batch = PathSource(paths, labels).load([1], 16, (0.0,) * 3, (1.0,) * 3)
    assert batch.images.shape == (1, 3, 16, 16) and batch.labels.tolist() == [1]


def test_generated_images_have_classes_masks_and_triggers():
    images, labels, masks = generated_images(6, seed=3)
    assert images.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64)
    for image, label, mask in zip(images, labels, masks, strict=True):
        assert set(mask.unique().tolist()) == {0, 1, 2 + int(label)}  # triggers, background, object
        trigger = mask == 0
        assert torch.allclose(image[:, trigger], torch.tensor([2.0, -2.0, 0.0])[:, None])
    model = planted_artifact_vit()
    mask = detect_artifacts(run_taps(model, images).patch_norms[-1]).mask.reshape(6, 8, 8)
    triggers = masks[:, 4::8, 4::8] == 0  # patch centres
    assert torch.equal(mask, triggers)  # the planted model turns exactly the triggers into artifacts


# ---------------------------------------------------------------- specs and config errors


def test_model_spec_parsing_and_errors(tmp_path):
    spec = parse_model_spec("vit_tiny_patch16_224:random:img_size=64:registers=2")
    assert (spec.name, spec.pretrained, spec.img_size, spec.registers) == ("vit_tiny_patch16_224", False, 64, 2)
    assert spec.label == "vit_tiny_patch16_224+reg2" and spec.family == "vit_tiny_patch16_224"
    assert parse_model_spec("vit_large_patch14_reg4_dinov2.lvd142m").family == "vit_large_patch14_dinov2"
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"")
    assert parse_model_spec(f"deit3_small_patch16_224={checkpoint}:label=mine").checkpoint == str(checkpoint)
    with pytest.raises(ModelSpecError, match="not_a_model"):
        parse_model_spec("not_a_model")
    with pytest.raises(ModelSpecError, match="bad option 'regs=2'"):
        parse_model_spec("planted:regs=2")
    with pytest.raises(ModelSpecError, match="not found"):
        parse_model_spec(f"deit3_small_patch16_224={tmp_path / 'missing.pth'}")


def test_random_models_are_identical_in_every_task():
    spec = parse_model_spec("vit_tiny_patch16_224:random:img_size=32:registers=2")
    first, _, _ = load_model(spec)
    second, _, _ = load_model(spec)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def config(tmp_path, **changes) -> AnalysisConfig:
    fields = {
        "models": (parse_model_spec("planted"),),
        "probes": ("norms",),
        "data": DataSpec("generated", train_images=8, test_images=4),
        "out_dir": str(tmp_path / "out"),
        "settings": FAST,
    }
    return AnalysisConfig(**(fields | changes))


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(AnalysisConfigError, match=r"unknown \['norm', 'atention'\]; allowed: norms, attention"):
        config(tmp_path, probes=("norm", "atention"))
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        config(tmp_path, data=DataSpec("cifar10", str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="needs a path"):
        DataSpec("ade20k")
    write_cifar(tmp_path)
    with pytest.raises(AnalysisConfigError, match="segmentation.*need segmentation masks"):
        config(tmp_path, probes=("segmentation",), data=DataSpec("cifar10", str(tmp_path)))
    with pytest.raises(AnalysisConfigError, match="duplicate labels"):
        config(tmp_path, models=(parse_model_spec("planted"), parse_model_spec("planted")))
    with pytest.raises(ValueError, match="artifact_method='otsu'"):
        ProbeSettings(artifact_method="otsu")


def test_entry_script_rejects_unknown_probe_before_any_work(tmp_path, monkeypatch, capsys):
    from analysis import run_probes

    argv = [
        "run_probes.py",
        "--models",
        "planted",
        "--probes",
        "norms",
        "nonsense",
        "--dataset",
        "generated",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_probes.main()
    assert exit_info.value.code == 2
    assert "unknown ['nonsense']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_plan_shards_the_bank_to_fill_the_workers(tmp_path):
    tiny = parse_model_spec("vit_tiny_patch16_224:random:img_size=64")
    run = config(
        tmp_path,
        models=(tiny,),
        probes=("norms", "neighbours"),
        data=DataSpec("generated", train_images=48, test_images=16),
    )
    (plan,), failed = plan_banks(run, workers=4)
    assert not failed and plan.shards == 2  # at most one shard per test batch (16 test images, batches of 8)
    assert plan.build == "no bank yet" and not plan.contents.train  # norms and neighbours read only test images
    assert [(len(r), r.start) for r in batch_ranges(48, 8, plan.shards)] == [(3, 0), (3, 3)]
    planted_plans, _ = plan_banks(config(tmp_path, shards=3), workers=16)
    assert [p.shards for p in planted_plans] == [1]  # 4 test images: one batch


# ---------------------------------------------------------------- Ray runner end to end


@pytest.mark.slow
def test_runner_end_to_end(tmp_path, monkeypatch, ray_local):
    import mlflow

    from analysis.runner import run_analysis
    from analysis.tasks import PROBES

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    models = (
        parse_model_spec("planted"),
        parse_model_spec("vit_tiny_patch16_224:random:img_size=64:registers=2"),
        parse_model_spec(f"vit_tiny_patch16_224={broken}:img_size=64:label=broken"),
    )
    run_config = config(
        tmp_path, models=models, probes=PROBES, data=DataSpec("generated", train_images=12, test_images=8), shards=2
    )
    outcome = run_analysis(run_config)
    out = outcome.out_dir

    norms = outcome.report.rows("norms")
    assert [r["layer"] for r in norms if r["model"] == "planted"] == list(range(6))  # one task per layer, in order
    assert [r["layer"] for r in norms if r["model"] == "vit_tiny_patch16_224+reg2"] == list(range(12))
    planted_rows = {r["layer"]: r["outlier_fraction"] for r in norms if r["model"] == "planted"}
    assert planted_rows[1] == 0 and planted_rows[2] > 0
    for probe in PROBES:
        text = (out / f"{probe}.csv").read_text()
        assert "planted" in text and "vit_tiny_patch16_224+reg2" in text, probe
        assert "broken" in text and "cannot read checkpoint" in text, probe  # the failure is in the table
    assert {e["model"] for e in outcome.report.errors} == {"broken"}
    for name in (
        "norms_planted",
        "norms_last_layer",
        "attention_layers_planted",
        "attention_vit_tiny_patch16_224_reg2",
        "correspondence_planted",
        "neighbours",
        "removal_planted",
        "global",
        "local",
        "representation",
        "segmentation",
    ):
        assert (out / f"{name}.png").stat().st_size > 10_000, name

    summary = outcome.summary.read_text()
    for number in range(1, 6):
        assert f"## Claim {number}:" in summary
    assert "Outliers found in `planted`" in summary
    assert "`planted`: 0.317 M parameters, artifacts from layer 2 of 6" in summary

    run = mlflow.MlflowClient(tracking_uri=uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["models"] == "planted,vit_tiny_patch16_224+reg2,broken"
    assert run.data.metrics["planted.first_outlier_layer"] == 2
    logged = {item.path for item in mlflow.MlflowClient(tracking_uri=uri).list_artifacts(outcome.run_id)}
    assert {"summary.md", "norms.csv", "errors.csv", "neighbours.png", "config.json"} <= logged
    assert str(tmp_path) in run.info.artifact_uri  # artifacts next to the database, not in the cwd
