"""Honest statistics with known answers: per-seed stratified splits, mean/std/n over seeds, bootstrap intervals over
images (against a hand-written numpy oracle and scipy), and the verdict rule from the probes up to summary.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis import probes
from analysis.report import Report
from analysis.specs import parse_model_spec
from analysis.summary import summary_markdown
from analysis.uncertainty import (
    CONTRADICTS,
    INCONCLUSIVE,
    SUPPORTS,
    ImageValues,
    Interval,
    StratificationError,
    artifact_minus_normal,
    bootstrap_effect,
    combined_verdict,
    effect_row,
    group_values,
    seed_split,
    seed_stats,
)

SEEDS = (42, 123, 999)


def token_sample(artifact_signal: float, normal_signal: float, images: int = 200, classes: int = 4, seed: int = 0):
    """Top candidate 0 of each image is its artifact, random candidates are normal; each token carries the image
    class with the given signal strength (one-hot times signal, plus unit noise). Equal signals: the two groups
    hold the same information (identical distributions)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images) % classes  # every class equally often, so every split can be stratified
    rng.shuffle(labels)
    channels = 8
    top_index = np.stack([rng.choice(16, 2, replace=False) for _ in range(images)])
    random_index = np.stack([np.setdiff1d(rng.permutation(16), row)[:3] for row in top_index])
    top = rng.normal(0, 1, (images, 2, channels))
    top[np.arange(images), :, labels] += artifact_signal
    rand = rng.normal(0, 1, (images, 3, channels))
    rand[np.arange(images), :, labels] += normal_signal
    mask = np.zeros((images, 16), dtype=bool)
    mask[np.arange(images), top_index[:, 0]] = True
    return probes.TokenSample(top_index, top, random_index, rand), mask, labels


def global_effect(artifact_signal: float, normal_signal: float, seed: int = 0) -> tuple[list[dict], Interval]:
    sample, mask, labels = token_sample(artifact_signal, normal_signal, seed=seed)
    rows, values = probes.global_information(sample, mask, labels, test_size=50, seeds=SEEDS, max_iter=200)
    return rows, artifact_minus_normal(values)


# ---------------------------------------------------------------- splits and seed summaries


def test_each_seed_draws_its_own_stratified_split_and_a_seed_repeats_its_own():
    labels = np.repeat(np.arange(4), 25)  # 4 classes x 25 images
    splits = {seed: seed_split(100, 20, seed, labels) for seed in SEEDS}
    for is_train in splits.values():
        assert (~is_train).sum() == 20
        assert np.bincount(labels[~is_train], minlength=4).tolist() == [5, 5, 5, 5]  # stratified: 25 x 20 / 100
    assert not np.array_equal(splits[42], splits[123]) and not np.array_equal(splits[123], splits[999])
    np.testing.assert_array_equal(seed_split(100, 20, 42, labels), splits[42])  # reproducible
    unlabelled = seed_split(100, 20, 42)
    assert (~unlabelled).sum() == 20 and not np.array_equal(unlabelled, seed_split(100, 20, 123))


def test_a_class_too_small_to_stratify_is_an_error_not_a_fallback():
    labels = np.array([0, 0, 0, 1, 1, 1, 2])  # class 2 has one image: it cannot be on both sides
    with pytest.raises(StratificationError, match=r"\{2: 1\}"):
        seed_split(7, 3, 42, labels)
    with pytest.raises(StratificationError, match="at least one image per class"):
        seed_split(9, 2, 42, np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))  # 2 test places for 3 classes
    with pytest.raises(StratificationError, match="test_size=0"):
        seed_split(9, 0, 42)
    sample, mask, labels = token_sample(2.0, 0.0, images=41)  # 41 images of 4 classes
    labels[0] = 7  # a fifth class with a single image
    with pytest.raises(StratificationError, match=r"\{7: 1\}"):
        probes.global_information(sample, mask, labels, test_size=10, seeds=SEEDS)


def test_seed_stats_are_mean_and_sample_std_over_finite_seeds():
    assert seed_stats([0.5, 0.7, 0.9], "accuracy") == pytest.approx(
        {"accuracy_mean": 0.7, "accuracy_std": np.std([0.5, 0.7, 0.9], ddof=1)}
    )
    single = seed_stats([0.5, math.nan], "accuracy")
    assert single["accuracy_mean"] == 0.5 and math.isnan(single["accuracy_std"])  # one seed: no spread estimate


def test_seeds_give_different_accuracies_where_the_split_matters_and_repeat_exactly():
    rows, effect = global_effect(1.0, 1.0)
    for row in rows:
        assert row["seeds"] == 3 and row["accuracy_std"] > 0  # three splits, three different test sets
        assert row["test_tokens_mean"] == 50 and row["images"] == 200
    again, effect_again = global_effect(1.0, 1.0)
    assert again == rows and effect_again == effect  # same seeds, same splits, same numbers


def test_local_and_representation_probes_resample_their_splits_per_seed():
    sample, mask, labels = token_sample(2.0, 2.0)
    rows, values = probes.local_information(sample, mask, (4, 4), test_size=50, seeds=SEEDS, labels=labels)
    for row in rows:
        assert row["seeds"] == 3 and row["split"] == "stratified by image class"
        assert {"top1", "top1_std", "mean_distance", "mean_distance_std", "majority_top1"} <= row.keys()
    assert values["artifact"].counts.sum(axis=1).tolist() == [50, 50, 50]  # one artifact per image, 50 test images
    assert rows[1]["count"] == 200  # normal candidates subsampled to the artifact count (per seed)
    rng = np.random.default_rng(3)
    features = {"noisy": np.eye(4)[labels] + rng.normal(0, 1.0, (200, 4))}
    rows, values = probes.representation_quality(features, labels, 50, SEEDS, image_ids=np.arange(200) + 1000)
    assert rows[0]["accuracy_std"] > 0 and rows[0]["test_images"] == 50 and rows[0]["images"] == 200
    assert values["noisy"].ids.min() >= 1000  # per-image outcomes carry the given image ids (to pair models)
    assert values["noisy"].value == pytest.approx(rows[0]["accuracy_mean"])


# ---------------------------------------------------------------- bootstrap against independent computations


def hand_interval(observations_a, observations_b, resamples, seed, paired=True):
    """Percentile interval written out with loops: observations are lists (per replicate) of (image, value)."""

    def group_value(observations, drawn):
        means = []
        for replicate in observations:
            total = count = 0.0
            for image in drawn:
                for where, value in replicate:
                    if where == image:
                        total, count = total + value, count + 1
            if count:
                means.append(total / count)
        return np.mean(means) if means else math.nan

    rng = np.random.default_rng(seed)
    images_a = sorted({i for replicate in observations_a for i, _ in replicate})
    images_b = sorted({i for replicate in observations_b for i, _ in replicate})
    if paired:
        union = sorted(set(images_a) | set(images_b))
        draws = rng.integers(0, len(union), size=(resamples, len(union)))
        pairs = [([union[k] for k in row], [union[k] for k in row]) for row in draws]
    else:
        draws_a = rng.integers(0, len(images_a), size=(resamples, len(images_a)))
        draws_b = rng.integers(0, len(images_b), size=(resamples, len(images_b)))
        pairs = [
            ([images_a[k] for k in ra], [images_b[k] for k in rb]) for ra, rb in zip(draws_a, draws_b, strict=True)
        ]
    effects = [group_value(observations_a, da) - group_value(observations_b, db) for da, db in pairs]
    effects = np.array([e for e in effects if np.isfinite(e)])
    return np.percentile(effects, [2.5, 97.5]), len(effects)


def as_values(observations) -> ImageValues:
    return ImageValues.of(
        [np.array([i for i, _ in replicate]) for replicate in observations],
        [np.array([v for _, v in replicate], dtype=float) for replicate in observations],
    )


@pytest.mark.parametrize("paired", [True, False])
def test_interval_equals_a_hand_computed_percentile_bootstrap(paired):
    # Group a seen in two replicates (seeds) with several tokens per image; b on partly other images.
    a = [[(0, 1), (0, 0), (1, 1), (2, 1), (4, 0)], [(1, 0), (3, 1), (3, 1), (5, 1)]]
    b = [[(0, 0), (1, 1), (1, 0), (3, 0), (4, 1), (6, 0)]]
    interval = bootstrap_effect(as_values(a), as_values(b), paired=paired, resamples=300, seed=7)
    (low, high), kept = hand_interval(a, b, 300, 7, paired)
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)
    assert interval.resamples == kept
    by_hand = np.mean([3 / 5, 3 / 4]) - 2 / 6  # mean over replicates of each replicate's mean, minus b's mean
    assert interval.estimate == pytest.approx(by_hand)
    assert interval.images == (7 if paired else 6 + 5)  # union of 0-6, or 6 images of a and 5 of b


def test_interval_agrees_with_scipy_bootstrap_on_a_paired_mean_difference():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.3, 1, 150), rng.normal(0.0, 1, 150)
    ids = np.arange(150)
    ours = bootstrap_effect(ImageValues.of([ids], [a]), ImageValues.of([ids], [b]), resamples=20_000)
    theirs = scipy_stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
        paired=True,
        n_resamples=20_000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    assert ours.estimate == pytest.approx(a.mean() - b.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.01) and ours.high == pytest.approx(theirs.high, abs=0.01)


def clustered(true_a: float, true_b: float, images: int, seed: int) -> tuple[ImageValues, ImageValues]:
    """1-4 tokens per image, correct with an image-level probability shared by both groups (so tokens of one
    image are correlated, and the groups are paired); the true difference is true_a - true_b."""
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-0.2, 0.2, images)
    groups = []
    for truth in (true_a, true_b):
        tokens = rng.integers(1, 5, images)
        image = np.repeat(np.arange(images), tokens)
        groups.append(ImageValues.of([image], [rng.random(image.size) < (truth + shift)[image]]))
    return groups[0], groups[1]


def test_identical_distributions_are_inconclusive_at_about_the_nominal_rate():
    verdicts = [bootstrap_effect(*clustered(0.6, 0.6, 120, seed), resamples=1000).verdict(+1) for seed in range(40)]
    assert verdicts.count(INCONCLUSIVE) >= 35  # a 95% interval: about 2 of 40 exclude 0 by chance


def test_interval_covers_the_true_difference_on_planted_data():
    intervals = [bootstrap_effect(*clustered(0.7, 0.5, 120, seed), resamples=1000) for seed in range(40)]
    covered = sum(interval.low <= 0.2 <= interval.high for interval in intervals)
    assert covered >= 34  # nominal 38 of 40
    assert sum(interval.verdict(+1) == SUPPORTS for interval in intervals) >= 38  # the effect is clear at n=120


def test_verdict_rule():
    above, straddles = Interval(0.2, 0.1, 0.3, 100, 2000), Interval(0.05, -0.05, 0.15, 100, 2000)
    assert above.verdict(+1) == SUPPORTS and above.verdict(-1) == CONTRADICTS
    assert straddles.verdict(+1) == straddles.verdict(-1) == INCONCLUSIVE
    assert Interval(math.nan, math.nan, math.nan, 1, 0).verdict(+1) == INCONCLUSIVE
    small_loss = Interval(-0.004, -0.008, -0.001, 100, 2000)  # "does not hurt" with a 1-point margin
    assert small_loss.verdict(+1, threshold=-0.01) == SUPPORTS and small_loss.verdict(+1) == CONTRADICTS
    assert combined_verdict([SUPPORTS, SUPPORTS]) == SUPPORTS
    assert combined_verdict([SUPPORTS, CONTRADICTS]) == combined_verdict([]) == INCONCLUSIVE
    assert "[95% CI +10, +30]" in above.text(100)
    with pytest.raises(ValueError, match="direction=0"):
        above.verdict(0)


def test_too_few_images_give_no_interval():
    single = ImageValues.of([np.array([3, 3])], [np.array([1.0, 0.0])])
    interval = bootstrap_effect(single, ImageValues.of([np.arange(10)], [np.ones(10)]))
    assert math.isnan(interval.low) and interval.verdict(+1) == INCONCLUSIVE


# ---------------------------------------------------------------- verdicts from the probes


@pytest.mark.parametrize("data_seed", range(4))
def test_probe_on_identical_token_distributions_is_inconclusive(data_seed):
    _, effect = global_effect(1.0, 1.0, seed=data_seed)
    assert effect.verdict(+1) == INCONCLUSIVE
    assert effect.low < 0 < effect.high


def test_probe_planted_effect_supports_and_reversed_contradicts():
    rows, effect = global_effect(3.0, 0.0)
    accuracy = {row["tokens"]: row["accuracy_mean"] for row in rows}
    assert effect.estimate == pytest.approx(accuracy["artifact"] - accuracy["normal"])  # the table's difference
    assert effect.verdict(+1) == SUPPORTS and effect.low > 0.3
    _, reversed_effect = global_effect(0.0, 3.0)
    assert reversed_effect.verdict(+1) == CONTRADICTS


def test_neighbour_effect_over_images_follows_the_planted_difference():
    rng = np.random.default_rng(0)
    mask = np.zeros((60, 16), dtype=bool)
    mask[:, :2] = True
    same = rng.normal(0.5, 0.1, (60, 16))
    assert artifact_minus_normal(group_values(same, mask)).verdict(+1) == INCONCLUSIVE
    planted = same + 0.1 * mask
    effect = artifact_minus_normal(group_values(planted, mask))
    assert effect.verdict(+1) == SUPPORTS and effect.low <= 0.1 <= effect.high and effect.images == 60


def test_removal_accuracy_unchanged_features_give_zero_change():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 30)
    clean = np.eye(3)[labels] + rng.normal(0, 0.7, (90, 3))
    row, change = probes.removal_accuracy(clean, clean.copy(), labels, 30, SEEDS, max_iter=200)
    assert row["cls_accuracy_clean_mean"] == row["cls_accuracy_removed_mean"] and row["seeds"] == 3
    assert (change.estimate, change.low, change.high) == (0, 0, 0) and change.verdict(+1) == INCONCLUSIVE
    _, hurt = probes.removal_accuracy(clean, rng.normal(0, 0.7, (90, 3)), labels, 30, SEEDS, max_iter=200)
    assert hurt.verdict(+1) == CONTRADICTS  # edited features carry no class: accuracy drops


# ---------------------------------------------------------------- summary.md


def report_with(global_effect_interval: Interval, representation_gap: float) -> Report:
    base = parse_model_spec("vit_tiny_patch16_224:random")
    registers = parse_model_spec("vit_tiny_patch16_224:random:registers=2")
    report = Report(models=[base, registers])
    report.info = {base.label: {"registers": 0}, registers.label: {"registers": 2}}
    ids = np.arange(100)
    rng = np.random.default_rng(0)
    correct = rng.random((3, 100)) < 0.8
    report.figure_data["norm_last"] = {
        base.label: {"outlier_share": ImageValues.of([ids], [np.where(ids % 2 == 0, 0.04, 0.0)])},
        registers.label: {"outlier_share": ImageValues.of([ids], [np.zeros(100)])},
    }
    report.figure_data["representation_images"] = {
        base.label: {"cls": ImageValues.of([ids] * 3, list(correct))},
        registers.label: {
            "cls": ImageValues.of([ids] * 3, list(correct & (rng.random((3, 100)) > representation_gap)))
        },
    }
    norms = {"layer": 11, "outlier_fraction": 0.02, "outlier_threshold": 10.0, "max_median_ratio": 20.0}
    global_rows = [
        {"tokens": "artifact", "accuracy_mean": 0.9, "accuracy_std": 0.02, "seeds": 3, "test_tokens_mean": 50},
        {"tokens": "normal", "accuracy_mean": 0.4, "accuracy_std": 0.03, "seeds": 3, "test_tokens_mean": 50},
    ]
    report.tables = {
        "norms": [{"model": m.label, **norms} for m in (base, registers)],
        "global": [{"model": base.label, **row} for row in global_rows],
        "effects": [
            {"model": base.label, **effect_row("global", "accuracy artifact - normal", global_effect_interval)}
        ],
        "representation": [
            {"model": m.label, "features": "cls", "accuracy_mean": 0.8, "accuracy_std": 0.01, "seeds": 3}
            for m in (base, registers)
        ],
    }
    return report


def test_summary_prints_mean_std_n_and_each_verdict_with_its_interval():
    text = summary_markdown(report_with(Interval(0.5, 0.4, 0.6, 100, 2000), representation_gap=0.0), "t")
    claim3 = text.split("## Claim 3")[1].split("## Claim 4")[0]
    assert "artifact 90.0% ± 2.0% (3 seeds, 50 test tokens per seed)" in claim3
    assert "artifact - normal +50 points [95% CI +40, +60 points], 100 images: supports" in claim3
    assert "**Verdict: supports**" in claim3
    claim5 = text.split("## Claim 5")[1]
    assert "outlier share 0.0% vs 2.0%" in claim5 and "100 images: supports" in claim5  # paired, same ids
    assert "representation cls" in claim5 and "**Verdict: supports**" in claim5  # identical: within the margin
    assert "How to read" in text and "2000 resamples of images" in text

    straddling = summary_markdown(report_with(Interval(0.02, -0.05, 0.09, 100, 2000), 0.0), "t")
    assert "**Verdict: inconclusive**" in straddling.split("## Claim 3")[1].split("## Claim 4")[0]
    hurt = summary_markdown(report_with(Interval(0.5, 0.4, 0.6, 100, 2000), representation_gap=0.5), "t")
    claim5 = hurt.split("## Claim 5")[1]
    assert "representation cls" in claim5 and ": contradicts" in claim5
    assert "**Verdict: inconclusive**" in claim5  # fewer outliers (supports) but hurt (contradicts): mixed
