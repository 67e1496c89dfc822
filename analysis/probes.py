"""The study's probes as pure functions of arrays: no model, no I/O, no Ray, no MLflow.

Conventions: patch axes are row-major over the patch grid `(rows, cols)`; `(B, N)` arrays are per image and patch;
`mask` arrays mark artifact (outlier) patches. Every probe returns plain numbers or table rows (lists of dicts),
so the runner can concatenate them across models and layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.uncertainty import ImageValues, Interval, bootstrap_effect, mean_or_nan, seed_columns, seed_split
from vitreg.artifacts import detect_artifacts, top_percent_mask

# Fixed log-spaced bins (1e-2 .. 1e4): histograms of different layers, chunks and models add up and line up.
NORM_BIN_EDGES = np.logspace(-2, 4, 121)
STUDY_SEEDS = (42, 123, 999)


# ---------------------------------------------------------------- 1. norms


def norm_histograms(patch_norms: np.ndarray) -> np.ndarray:
    """Counts of patch norms over `NORM_BIN_EDGES` per layer: (L, B, N) -> (L, bins); out-of-range values clip."""
    clipped = np.clip(patch_norms, NORM_BIN_EDGES[0], NORM_BIN_EDGES[-1] * 0.999)
    return np.stack([np.histogram(layer, bins=NORM_BIN_EDGES)[0] for layer in clipped])


def norm_distribution(
    patch_norms: np.ndarray,
    layers: Sequence[int],
    method: str = "auto",
    threshold: float = 100.0,
    top_percent: float = 5.0,
) -> list[dict]:
    """One row per layer: norm quantiles, max/median ratio and outliers found by `vitreg.detect_artifacts`.

    Args:
        patch_norms: (L, B, N) pre-norm L2 norms of patch tokens, one slice per entry of `layers`.
        layers: block index of each slice.
        method, threshold, top_percent: artifact detection (see `vitreg.detect_artifacts`).
    """
    rows = []
    for layer, norms in zip(layers, patch_norms, strict=True):
        report = detect_artifacts(torch.tensor(norms), method, threshold, top_percent)
        rows.append(
            {
                "layer": int(layer),
                "median": float(np.median(norms)),
                "p99": float(np.quantile(norms, 0.99)),
                "max": float(norms.max()),
                "max_median_ratio": report.max_median_ratio,
                "outlier_threshold": report.threshold,
                "outlier_fraction": report.outlier_fraction,
                "images_with_outliers": float(report.mask.any(dim=1).float().mean()),
            }
        )
    return rows


def first_outlier_layer(layers: Sequence[int], outlier_fractions: Sequence[float]) -> int | None:
    """The first layer whose outlier fraction is above zero, or None when no layer has outliers."""
    found = [layer for layer, fraction in sorted(zip(layers, outlier_fractions, strict=True)) if fraction > 0]
    return found[0] if found else None


# ---------------------------------------------------------------- 2. attention maps


def head_mean_map(rows: np.ndarray, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """Attention rows (..., H, T) over all tokens -> head-mean map over the patches (..., rows, cols)."""
    patches = rows.mean(axis=-2)[..., prefix:]  # (..., N)
    return patches.reshape(*patches.shape[:-1], *grid)


def log_attention(maps: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    """log10 of attention maps; the floor keeps exact zeros finite."""
    return np.log10(np.maximum(maps, floor))


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each (rows, cols) map to sum 1, so maps with different mass on prefix tokens compare."""
    total = maps.sum(axis=(-2, -1), keepdims=True)
    return maps / np.where(total > 0, total, 1.0)


def total_variation(maps: np.ndarray) -> np.ndarray:
    """Roughness of (..., rows, cols) maps: sum of |a - b| over 4-neighbour pairs of the sum-normalised map.

    0 for a flat map; a single spike holding mass m on an interior patch adds about 4m, so values run from 0 to 4.
    This is the smoothness measure of the removal probe: lower is smoother.
    """
    p = normalise_maps(maps)
    vertical = np.abs(np.diff(p, axis=-2)).sum(axis=(-2, -1))
    horizontal = np.abs(np.diff(p, axis=-1)).sum(axis=(-2, -1))
    return vertical + horizontal


def attention_entropy(maps: np.ndarray) -> np.ndarray:
    """Entropy of each sum-normalised map divided by log(N): 1 for uniform attention, 0 for a single patch."""
    p = normalise_maps(maps).reshape(*maps.shape[:-2], -1)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)
    return entropy / math.log(p.shape[-1])


def attention_stats(maps: np.ndarray, artifact_mask: np.ndarray | None = None) -> dict[str, float]:
    """Summary of (B, rows, cols) attention maps: roughness, entropy, peak share and mass on artifact patches."""
    p = normalise_maps(maps)
    stats = {
        "total_variation": float(total_variation(maps).mean()),
        "entropy": float(attention_entropy(maps).mean()),
        "peak_share": float(p.reshape(p.shape[0], -1).max(axis=1).mean()),
    }
    if artifact_mask is not None:
        stats["artifact_mass"] = float((p * artifact_mask.reshape(p.shape)).sum(axis=(-2, -1)).mean())
    return stats


# ---------------------------------------------------------------- 3. norm / attention correspondence


def norm_attention_overlap(norms: np.ndarray, attention: np.ndarray, percent: float = 5.0) -> dict[str, np.ndarray]:
    """Per image overlap of the top `percent` tokens by norm and by attention (both (B, N)).

    precision: share of top-attention tokens that are top-norm; recall: share of top-norm tokens that are
    top-attention; iou: intersection over union. With equal percentages precision equals recall.
    """
    by_norm = top_percent_mask(torch.tensor(norms), percent).numpy()
    by_attention = top_percent_mask(torch.tensor(attention), percent).numpy()
    both = (by_norm & by_attention).sum(axis=1)
    return {
        "precision": both / by_attention.sum(axis=1),
        "recall": both / by_norm.sum(axis=1),
        "iou": both / (by_norm | by_attention).sum(axis=1),
    }


# ---------------------------------------------------------------- 4. neighbours


def neighbour_cosine(embedding: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean cosine similarity of each patch with its 4 edge neighbours (no wrap-around): (B, N, C) -> (B, N).

    Border patches average over the 3 (edges) or 2 (corners) neighbours they have.
    """
    rows, cols = grid
    unit = embedding / np.maximum(np.linalg.norm(embedding, axis=-1, keepdims=True), 1e-12)
    unit = unit.reshape(unit.shape[0], rows, cols, -1)  # (B, rows, cols, C)
    total = np.zeros(unit.shape[:3])
    count = np.zeros(unit.shape[:3])
    down = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # (B, rows-1, cols): pair (r, r+1)
    right = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)  # (B, rows, cols-1): pair (c, c+1)
    for similarity, here, there in (
        (down, np.s_[:, :-1], np.s_[:, 1:]),
        (right, np.s_[:, :, :-1], np.s_[:, :, 1:]),
    ):
        total[here] += similarity
        total[there] += similarity
        count[here] += 1
        count[there] += 1
    return (total / np.maximum(count, 1)).reshape(unit.shape[0], -1)


def neighbour_similarity(cosines: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Neighbour similarity of artifact vs normal patches ((B, N) cosines and mask); nan for an empty group."""
    artifact, normal = cosines[mask], cosines[~mask]
    return {
        "artifact_mean": float(artifact.mean()) if artifact.size else math.nan,
        "artifact_std": float(artifact.std()) if artifact.size else math.nan,
        "normal_mean": float(normal.mean()) if normal.size else math.nan,
        "normal_std": float(normal.std()) if normal.size else math.nan,
        "artifact_count": int(artifact.size),
        "normal_count": int(normal.size),
    }


# ---------------------------------------------------------------- token samples (for probes 5 and 6)


@dataclass
class TokenSample:
    """Candidate patch tokens of one layer for every image, kept instead of all B x N embeddings.

    `top_*` are each image's highest-norm patches (the artifact candidates), `random_*` random other patches
    (the normal candidates). Which candidates really are artifacts is decided afterwards from the layer's mask.
    """

    top_index: np.ndarray  # (B, K) patch index
    top_features: np.ndarray  # (B, K, C)
    random_index: np.ndarray  # (B, M)
    random_features: np.ndarray  # (B, M, C)

    def flags(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top candidates that are artifacts (B, K), random candidates that are normal (B, M)) under `mask`."""
        return (
            np.take_along_axis(mask, self.top_index, axis=1),
            ~np.take_along_axis(mask, self.random_index, axis=1),
        )

    @staticmethod
    def concatenate(samples: Sequence[TokenSample]) -> TokenSample:
        return TokenSample(*(np.concatenate([getattr(s, f) for s in samples]) for f in TokenSample.__annotations__))


def pick_per_image(valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random valid candidate per image: (B, K) bool -> (B,) candidate index, -1 where none is valid."""
    if valid.shape[1] == 0:  # no candidates at all (e.g. every patch is a top candidate): nothing to pick
        return np.full(valid.shape[0], -1)
    scores = np.where(valid, rng.random(valid.shape), -1.0)
    return np.where(valid.any(axis=1), scores.argmax(axis=1), -1)


def _group_tokens(features: np.ndarray, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features of the picked candidate of each image that has one: ((n, C), image index (n,))."""
    images = np.flatnonzero(picks >= 0)
    return features[images, picks[images]], images


# ---------------------------------------------------------------- linear probes (a fresh stratified split per seed)


def logistic_correct(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int, max_iter: int = 1000
) -> tuple[np.ndarray, bool]:
    """Which test items a logistic regression (standardised features) classifies correctly, and whether lbfgs
    converged. Fewer than 2 training classes: nothing can be learned, so no test item is scored (empty array).

    Standardising keeps lbfgs within `max_iter` on features whose norms differ by 100x (artifacts vs normal).
    """
    if len(np.unique(train_y)) < 2 or len(test_y) == 0:
        return np.zeros(0, dtype=bool), True
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through `converged` instead
        model.fit(train_x, train_y)
    return model.predict(test_x) == test_y, bool(np.all(model[-1].n_iter_ < max_iter))


def global_information(
    sample: TokenSample,
    mask: np.ndarray,
    labels: np.ndarray,
    test_size: int,
    seeds: Sequence[int] = STUDY_SEEDS,
    max_iter: int = 1000,
) -> tuple[list[dict], dict[str, ImageValues]]:
    """Image class from one token's embedding: artifact token vs normal token, a logistic regression per seed.

    For each seed: a stratified train/test split of all B images by class (`statistics.seed_split`, `test_size`
    test images), one random artifact token of each image that has one and one random normal token of each image
    (picks drawn by the seed); each group's classifier is fit on its training images and scored on its test images.

    Returns:
        rows per group: `accuracy_mean` and `accuracy_std` over seeds, `seeds`, `images` (with a token of the group),
            `test_tokens_mean` / `_std` (test tokens per seed), `converged`;
        per group, correct (1) / wrong (0) of each test token per seed, by image, for `artifact_minus_normal`.
    """
    artifact_valid, normal_valid = sample.flags(mask)
    groups = {"artifact": (sample.top_features, artifact_valid), "normal": (sample.random_features, normal_valid)}
    per_seed: dict[str, list[dict]] = {group: [] for group in groups}
    outcomes: dict[str, tuple[list, list]] = {group: ([], []) for group in groups}
    converged = True
    for seed in seeds:
        is_train = seed_split(len(labels), test_size, seed, labels)
        rng = np.random.default_rng(seed)
        for group, (features, valid) in groups.items():
            x, image = _group_tokens(features, pick_per_image(valid, rng))
            train, y = is_train[image], labels[image]
            correct, ok = logistic_correct(x[train], y[train], x[~train], y[~train], seed, max_iter)
            converged &= ok
            per_seed[group].append({"accuracy": mean_or_nan(correct), "test_tokens": float(correct.size)})
            outcomes[group][0].append(image[~train] if correct.size else np.zeros(0, int))
            outcomes[group][1].append(correct)
    rows = [
        {
            "tokens": group,
            **seed_columns(per_seed[group]),
            "images": int(valid.any(axis=1).sum()),
            "converged": converged,
        }
        for group, (_, valid) in groups.items()
    ]
    return rows, {group: ImageValues.of(*outcomes[group]) for group in groups}


def position_accuracy(
    train_x: np.ndarray,
    train_position: np.ndarray,
    test_x: np.ndarray,
    test_position: np.ndarray,
    grid: tuple[int, int],
) -> tuple[dict[str, float], np.ndarray]:
    """Predict a token's patch index linearly (ridge one-vs-rest on standardised features).

    Returns top-1 accuracy, mean Euclidean distance in patches between predicted and true cell, and the top-1
    accuracy of always predicting the most common training position (a group whose tokens sit at few positions
    scores well on that prior alone, so compare against it); and which test tokens were placed exactly (empty when
    nothing could be fit).
    """
    if len(np.unique(train_position)) < 2 or len(test_position) == 0:
        return {"top1": math.nan, "mean_distance": math.nan, "majority_top1": math.nan}, np.zeros(0, dtype=bool)
    model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0)).fit(train_x, train_position)
    predicted = model.predict(test_x)
    cols = grid[1]
    distance = np.hypot(predicted // cols - test_position // cols, predicted % cols - test_position % cols)
    majority = np.bincount(train_position).argmax()
    correct = predicted == test_position
    stats = {
        "top1": float(correct.mean()),
        "mean_distance": float(distance.mean()),
        "majority_top1": float((test_position == majority).mean()),
    }
    return stats, correct


def candidates_by_group(sample: TokenSample, mask: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """All valid candidates of each group: {group: (features (n, C), patch index (n,), image index (n,))}."""
    artifact_valid, normal_valid = sample.flags(mask)
    return {
        "artifact": (
            sample.top_features[artifact_valid],
            sample.top_index[artifact_valid],
            artifact_valid.nonzero()[0],
        ),
        "normal": (sample.random_features[normal_valid], sample.random_index[normal_valid], normal_valid.nonzero()[0]),
    }


def local_information(
    sample: TokenSample,
    mask: np.ndarray,
    grid: tuple[int, int],
    test_size: int,
    seeds: Sequence[int] = STUDY_SEEDS,
    labels: np.ndarray | None = None,
) -> tuple[list[dict], dict[str, ImageValues]]:
    """Patch position from the token's embedding, artifact vs normal tokens (one layer).

    Each group gets its own classifier (as in the study). For each seed the B images are split anew into train and
    test (`test_size` test images; stratified by image class when `labels` are given, else a plain random split,
    recorded in the `split` column); a token is on its image's side, so no image feeds both sides. All artifact
    candidates are used; the normal candidates are subsampled (by the seed) to the artifact group's size, so neither
    group wins by having more data.

    Returns:
        rows per group: `top1`, `mean_distance`, `majority_top1` (means over seeds) with their `_std`, `seeds`,
            `count` (tokens per seed), `split`;
        per group, placed exactly (1) or not (0) for each test token per seed, by image.
    """
    groups = candidates_by_group(sample, mask)
    artifacts = len(groups["artifact"][1])
    per_seed: dict[str, list[dict]] = {name: [] for name in groups}
    outcomes: dict[str, tuple[list, list]] = {name: ([], []) for name in groups}
    counts = {}
    for seed in seeds:
        is_train = seed_split(len(mask), test_size, seed, labels)
        for name, (x, position, image) in groups.items():
            keep = np.arange(len(position))
            if name == "normal" and 0 < artifacts < len(position):
                keep = np.sort(np.random.default_rng(seed).choice(len(position), artifacts, replace=False))
            x_kept, position_kept, image_kept = x[keep], position[keep], image[keep]
            train = is_train[image_kept]
            stats, correct = position_accuracy(
                x_kept[train], position_kept[train], x_kept[~train], position_kept[~train], grid
            )
            per_seed[name].append(stats)
            outcomes[name][0].append(image_kept[~train] if correct.size else np.zeros(0, int))
            outcomes[name][1].append(correct)
            counts[name] = len(keep)
    split = "stratified by image class" if labels is not None else "random (no class labels)"
    rows = [  # means keep their plain names (`top1`, `mean_distance`): the local figure reads them
        {"tokens": name, **seed_columns(per_seed[name], mean_suffix=""), "count": counts[name], "split": split}
        for name in groups
    ]
    return rows, {name: ImageValues.of(*outcomes[name]) for name in groups}


def representation_quality(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    test_size: int,
    seeds: Sequence[int] = STUDY_SEEDS,
    max_iter: int = 1000,
    image_ids: np.ndarray | None = None,
) -> tuple[list[dict], dict[str, ImageValues]]:
    """Logistic-regression accuracy of image-level features (e.g. `cls`, `mean_patch`, each (B, C)), one stratified
    train/test split per seed (`test_size` test images).

    Returns rows (`accuracy_mean` and `accuracy_std` over seeds, `seeds`, `images`, `test_images`, `converged`) and,
    per feature, correct/wrong of each test image per seed by `image_ids` (default: position), so two models probed
    on the same images can be compared with a paired bootstrap.
    """
    ids = np.arange(len(labels)) if image_ids is None else np.asarray(image_ids)
    splits = [seed_split(len(labels), test_size, seed, labels) for seed in seeds]
    rows, values = [], {}
    for name, x in features.items():
        outcomes: tuple[list, list] = ([], [])
        per_seed, converged = [], True
        for seed, is_train in zip(seeds, splits, strict=True):
            correct, ok = logistic_correct(
                x[is_train], labels[is_train], x[~is_train], labels[~is_train], seed, max_iter
            )
            converged &= ok
            per_seed.append({"accuracy": mean_or_nan(correct)})
            outcomes[0].append(ids[~is_train] if correct.size else np.zeros(0, int))
            outcomes[1].append(correct)
        rows.append(
            {
                "features": name,
                **seed_columns(per_seed),
                "images": len(labels),
                "test_images": test_size,
                "converged": converged,
            }
        )
        values[name] = ImageValues.of(*outcomes)
    return rows, values


# ---------------------------------------------------------------- 9. artifact removal


def removal_effect(
    clean_maps: np.ndarray,
    edited_maps: np.ndarray,
    clean_predictions: np.ndarray,
    edited_predictions: np.ndarray,
) -> tuple[dict[str, float], Interval]:
    """Change made by removing artifacts: roughness of the (B, rows, cols) CLS maps and head agreement.

    `*_predictions` are the model head's top-1 classes (B,) without and with the edit. The interval is of the
    total-variation change (removed minus clean; below 0: smoother), resampling the B images.
    """
    clean_tv, edited_tv = total_variation(clean_maps), total_variation(edited_maps)
    row = {
        "total_variation_clean": float(clean_tv.mean()),
        "total_variation_removed": float(edited_tv.mean()),
        "smoother_fraction": float((edited_tv < clean_tv).mean()),
        "head_agreement": float((clean_predictions == edited_predictions).mean()),
    }
    return row, bootstrap_effect(ImageValues.of([np.arange(len(clean_tv))], [edited_tv - clean_tv]))


def removal_accuracy(
    clean: np.ndarray,
    edited: np.ndarray,
    labels: np.ndarray,
    test_size: int,
    seeds: Sequence[int] = STUDY_SEEDS,
    max_iter: int = 1000,
) -> tuple[dict[str, float], Interval]:
    """CLS linear-probe accuracy on clean vs artifact-removed test features (B, C); the probe is fit on clean
    features. One stratified train/test split per seed (`test_size` test images).

    Returns `cls_accuracy_clean_mean` / `cls_accuracy_removed_mean` with their `_std` and `seeds`, and the
    interval of removed minus clean accuracy (paired: the same test images, resampled together).
    """
    per_seed, outcomes = [], {"clean": ([], []), "removed": ([], [])}
    for seed in seeds:
        is_train = seed_split(len(labels), test_size, seed, labels)
        scores = {}
        for name, test_x in (("clean", clean), ("removed", edited)):
            correct, _ = logistic_correct(
                clean[is_train], labels[is_train], test_x[~is_train], labels[~is_train], seed, max_iter
            )
            scores[f"cls_accuracy_{name}"] = mean_or_nan(correct)
            outcomes[name][0].append(np.flatnonzero(~is_train) if correct.size else np.zeros(0, int))
            outcomes[name][1].append(correct)
        per_seed.append(scores)
    effect = bootstrap_effect(ImageValues.of(*outcomes["removed"]), ImageValues.of(*outcomes["clean"]))
    return seed_columns(per_seed), effect
