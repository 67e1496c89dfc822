"""Honest statistics for the probes: a fresh stratified split per seed, mean/std/n over seeds, and bootstrap
intervals over images behind every verdict of the summary. Pure numpy and sklearn: no model, no I/O.

Why: refitting a deterministic classifier on one fixed split under three seeds gives the same number three times
("± 0.0"), and the sign of a mean difference says nothing about whether it would survive other images. Here each
seed draws its own stratified train/test split (so the spread over seeds measures how much the split matters), and
an effect (e.g. artifact-token minus normal-token accuracy) supports a claim only when its 95% bootstrap interval
over images excludes zero in the claimed direction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
SUPPORTS, CONTRADICTS, INCONCLUSIVE = "supports", "contradicts", "inconclusive"


class StratificationError(ValueError):
    """A split that cannot be stratified as asked (a class with too few members, too few test or train places)."""


# ---------------------------------------------------------------- splits and seed summaries


def seed_split(images: int, test_size: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """A train/test split of `images` items drawn by `seed`: (images,) bool, True for train.

    With `labels`, sklearn's `StratifiedShuffleSplit(test_size=test_size, random_state=seed)`: every class keeps its
    share on both sides. Without labels (a dataset with none), `ShuffleSplit` (plain random). The same seed gives the
    same split; another seed, another split.

    Raises:
        StratificationError: a class with fewer than 2 members (it cannot be on both sides), or fewer test or
            train places than classes. Nothing falls back silently to an unstratified split.
    """
    if not 0 < test_size < images:
        raise StratificationError(f"test_size={test_size}: must be between 1 and images - 1 = {images - 1}")
    if labels is None:
        splitter = ShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train, _ = next(splitter.split(np.zeros(images)))
    else:
        if len(labels) != images:
            raise StratificationError(f"labels: {len(labels)} given for {images} images")
        classes, counts = np.unique(labels, return_counts=True)
        few = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < 2}
        if few:
            raise StratificationError(
                f"cannot stratify the train/test split by class: members per class {few} (class: count); each class "
                "needs at least 2 (one per side). Use more images, or fewer classes"
            )
        if test_size < len(classes) or images - test_size < len(classes):
            raise StratificationError(
                f"cannot stratify {images} images of {len(classes)} classes into {images - test_size} train / "
                f"{test_size} test: each side needs at least one image per class"
            )
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train, _ = next(splitter.split(np.zeros(images), labels))
    is_train = np.zeros(images, dtype=bool)
    is_train[train] = True
    return is_train


def seed_stats(values: Sequence[float], name: str) -> dict[str, float]:
    """`{name}_mean`, `{name}_std` over the seeds with a finite value.

    std is the sample standard deviation (ddof=1) over seeds: the spread from drawing other splits (and token
    picks); nan with a single seed, where it cannot be estimated. The count of seeds goes in the row's `seeds`.
    """
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    return {
        f"{name}_mean": float(finite.mean()) if finite.size else math.nan,
        f"{name}_std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
    }


def mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def seed_columns(per_seed: list[dict[str, float]], mean_suffix: str = "_mean") -> dict[str, float]:
    """Each key's mean (`{key}{mean_suffix}`) and std (`{key}_std`, see `seed_stats`) over seeds, and `seeds`: how
    many seeds gave a number."""
    columns: dict[str, float] = {}
    for key in per_seed[0]:
        stats = seed_stats([values[key] for values in per_seed], key)
        columns |= {f"{key}{mean_suffix}": stats[f"{key}_mean"], f"{key}_std": stats[f"{key}_std"]}
    first = next(iter(per_seed[0]))
    columns["seeds"] = sum(not math.isnan(values[first]) for values in per_seed)
    return columns


# ---------------------------------------------------------------- per-image values


@dataclass(frozen=True)
class ImageValues:
    """Observations of one group (e.g. correct/incorrect of each artifact test token), summed per image.

    `sums[s, i]` and `counts[s, i]` are the sum and number of observations of image `ids[i]` in replicate `s` (a
    seed, whose split and token picks differ; one replicate for quantities without seeds). The group's value is the
    mean over replicates of sum(sums[s]) / sum(counts[s]): per seed, the mean over all its observations (an image with
    three tokens weighs three times), then averaged over the seeds that observed anything; so it equals the table's
    mean over seeds. Keeping observations per image lets the bootstrap resample images, not tokens.
    """

    ids: np.ndarray  # (n,) int64, sorted, unique
    sums: np.ndarray  # (S, n) float64
    counts: np.ndarray  # (S, n) float64

    @staticmethod
    def of(image_ids: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> ImageValues:
        """From one (image id per observation, value per observation) pair per replicate."""
        ids = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in image_ids] or [np.zeros(0, int)]))
        sums = np.zeros((len(values), len(ids)))
        counts = np.zeros((len(values), len(ids)))
        for replicate, (where, value) in enumerate(zip(image_ids, values, strict=True)):
            column = np.searchsorted(ids, np.asarray(where, dtype=np.int64))
            np.add.at(sums[replicate], column, np.asarray(value, dtype=float))
            np.add.at(counts[replicate], column, 1.0)
        return ImageValues(ids, sums, counts)

    @property
    def images(self) -> int:
        """Images with at least one observation."""
        return int((self.counts.sum(axis=0) > 0).sum())

    @property
    def value(self) -> float:
        return float(_replicate_mean(self.sums.sum(axis=1)[None], self.counts.sum(axis=1)[None])[0])

    def aligned(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sums, counts) laid out over `ids`, a superset of this group's ids (zeros where it has no observation)."""
        sums = np.zeros((len(self.sums), len(ids)))
        counts = np.zeros_like(sums)
        column = np.searchsorted(ids, self.ids)
        sums[:, column], counts[:, column] = self.sums, self.counts
        return sums, counts


def _replicate_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(R, S) weighted sums and counts -> (R,) mean over replicates with a count of the per-replicate means."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-empty rows: nan, dropped by the caller
        return np.nanmean(np.where(counts > 0, sums / counts, np.nan), axis=1)


# ---------------------------------------------------------------- bootstrap intervals and verdicts


@dataclass(frozen=True)
class Interval:
    """An effect (a difference of group values, or one group's value) and its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    images: int  # images resampled (the union of both groups' images when paired)
    resamples: int  # bootstrap resamples in which the effect was defined
    confidence: float = CONFIDENCE

    def verdict(self, direction: int, threshold: float = 0.0) -> str:
        """`supports` when the whole interval lies on the claimed side of `threshold` (direction +1: above, -1:
        below), `contradicts` when it lies wholly on the other side, else (or when undefined) `inconclusive`."""
        if direction not in (1, -1):
            raise ValueError(f"direction={direction}: must be +1 (claim: effect > threshold) or -1 (effect < it)")
        if math.isnan(self.low) or math.isnan(self.high):
            return INCONCLUSIVE
        above, below = self.low > threshold, self.high < threshold
        if above or below:
            return SUPPORTS if (above and direction > 0) or (below and direction < 0) else CONTRADICTS
        return INCONCLUSIVE

    def text(self, scale: float = 1.0, unit: str = "") -> str:
        """`+12.3 points [95% CI +5.0, +19.0 points], 200 images` (values times `scale`, here 100, and `unit`)."""
        if math.isnan(self.estimate):
            return f"n/a (too few images: {self.images})"
        numbers = [f"{scale * value:+.3g}" for value in (self.estimate, self.low, self.high)]
        level = f"{100 * self.confidence:g}%"
        return f"{numbers[0]}{unit} [{level} CI {numbers[1]}, {numbers[2]}{unit}], {self.images} images"

    def as_row(self) -> dict[str, float]:
        return {("ci_" + key if key in ("low", "high") else key): value for key, value in asdict(self).items()}

    @staticmethod
    def from_row(row: dict) -> Interval:
        return Interval(
            float(row["estimate"]),
            float(row["ci_low"]),
            float(row["ci_high"]),
            int(row["images"]),
            int(row["resamples"]),
            float(row.get("confidence", CONFIDENCE)),
        )


def resample_weights(images: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, images) multiplicities of images drawn with replacement: row r counts the draws of
    `rng.integers(0, images, size=(resamples, images))[r]`."""
    draws = rng.integers(0, images, size=(resamples, images))
    flat = (draws + images * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * images).reshape(resamples, images).astype(float)


def bootstrap_effect(
    a: ImageValues,
    b: ImageValues | None = None,
    paired: bool = True,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Interval:
    """value(a) - value(b) (or value(a) alone) with a percentile bootstrap interval over images.

    What is resampled: images, with replacement, `resamples` times; an image drawn k times counts k times with all
    its observations (every token, every seed in which it was a test image), so tokens of one image never count as
    independent. Paired (both groups measured on one image set: two token groups of one model, or two models on the
    same images): the images are the union of both groups' ids and one draw serves both groups, so the interval
    reflects the pairing. Unpaired (two models on different images): each group's images are drawn on their own.
    Draws: `rng = np.random.default_rng(seed)`, then `rng.integers(0, n, size=(resamples, n))` over the union
    (paired), or over a's images then b's (unpaired). The interval is the (1 - confidence) / 2 and
    (1 + confidence) / 2 percentiles (numpy's linear interpolation) of the resampled effects; resamples in which a
    group has no observation are undefined and dropped. A group with fewer than 2 images gives a nan interval.
    """
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"confidence={confidence}, resamples={resamples}: need 0 < confidence < 1, resamples >= 1")
    groups = [a] if b is None else [a, b]
    estimate = a.value - (b.value if b is not None else 0.0)
    images = len(np.union1d(a.ids, b.ids)) if b is not None and paired else sum(g.images for g in groups)
    if any(group.images < 2 for group in groups):
        return Interval(estimate if all(g.images for g in groups) else math.nan, math.nan, math.nan, images, 0)
    rng = np.random.default_rng(seed)
    if paired:
        ids = groups[0].ids if b is None else np.union1d(a.ids, b.ids)
        weights = [resample_weights(len(ids), resamples, rng)] * len(groups)
        layouts = [group.aligned(ids) for group in groups]
    else:
        weights = [resample_weights(len(group.ids), resamples, rng) for group in groups]
        layouts = [(group.sums, group.counts) for group in groups]
    values = [_replicate_mean(w @ sums.T, w @ counts.T) for w, (sums, counts) in zip(weights, layouts, strict=True)]
    effects = values[0] - (values[1] if b is not None else 0.0)
    effects = effects[np.isfinite(effects)]
    if effects.size == 0:
        return Interval(estimate, math.nan, math.nan, images, 0, confidence)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(effects, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), images, int(effects.size), confidence)


def combined_verdict(verdicts: Sequence[str]) -> str:
    """One verdict from several effects of one claim: supports (contradicts) only when every one does."""
    if verdicts and all(v == SUPPORTS for v in verdicts):
        return SUPPORTS
    if verdicts and all(v == CONTRADICTS for v in verdicts):
        return CONTRADICTS
    return INCONCLUSIVE


# ---------------------------------------------------------------- per-image groups of artifact and normal patches


def group_values(values: np.ndarray, mask: np.ndarray, image_ids: np.ndarray | None = None) -> dict[str, ImageValues]:
    """(B, N) per-patch `values` (e.g. CLS attention, neighbour cosine) of artifact (`mask`) and normal patches,
    summed per image: the groups a bootstrap over images compares (`artifact_minus_normal`)."""
    ids = np.arange(len(values)) if image_ids is None else np.asarray(image_ids)
    image = np.broadcast_to(ids[:, None], values.shape)
    return {
        "artifact": ImageValues.of([image[mask]], [values[mask]]),
        "normal": ImageValues.of([image[~mask]], [values[~mask]]),
    }


def artifact_minus_normal(groups: dict[str, ImageValues]) -> Interval:
    """Artifact minus normal group value, with its bootstrap interval over images (paired: one image set)."""
    return bootstrap_effect(groups["artifact"], groups["normal"])


def outlier_share(mask: np.ndarray, image_ids: np.ndarray) -> ImageValues:
    """Share of each image's patches flagged in the (B, N) `mask`: one value per image, for intervals over images."""
    return ImageValues.of([image_ids], [mask.mean(axis=1)])


def effect_row(probe: str, effect: str, interval: Interval, **keys: object) -> dict:
    """One row of the `effects` table: which probe, what difference, its estimate and interval."""
    return {"probe": probe, **keys, "effect": effect, **interval.as_row()}
