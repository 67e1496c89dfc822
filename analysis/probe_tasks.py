"""The probe computations on a bank: per layer (norms, local information) and of the last layer (attention maps,
correspondence, neighbours, global information, representation quality). No model is loaded, no image is
forwarded: everything comes from the bank's one pass (analysis/bank.py).

Which images a probe covers is what it covered when each task ran its own pass: the per-layer artifact masks cover
the training images too when `local` runs, the last layer's when `global`, `representation` or `removal` runs
(`auto` detection looks at the whole batch of norms, so this keeps every number as it was).
"""

from __future__ import annotations

import math

import numpy as np

from analysis import probes
from analysis.bank import SPLITS, Bank
from analysis.data import DataSpec, open_splits
from analysis.probe_settings import FINAL_TRAIN_PROBES, ProbeSettings, TaskResult
from analysis.uncertainty import artifact_minus_normal, effect_row, group_values, outlier_share

LAYER_PROBES = ("norms", "local")
FINAL_PROBES = ("attention", "correspondence", "neighbours", "global", "representation")


def layer_splits(probe_names: tuple[str, ...]) -> tuple[str, ...]:
    """The images the per-layer probes' masks cover: the training images too when `local` runs."""
    return SPLITS if "local" in probe_names else ("test",)


def final_splits(probe_names: tuple[str, ...]) -> tuple[str, ...]:
    """The images the last-layer probes cover: the training images too when a probe of FINAL_TRAIN_PROBES runs."""
    return SPLITS if set(probe_names) & set(FINAL_TRAIN_PROBES) else ("test",)


def labels_of(bank: Bank, splits: tuple[str, ...]) -> np.ndarray:
    return bank.load("labels", splits)


def run_layer(
    bank: Bank, layer: int, probe_names: tuple[str, ...], settings: ProbeSettings, result: TaskResult
) -> None:
    """The norms and local-information probes of one layer (`probe_names`: the run's probes)."""
    splits = layer_splits(probe_names)
    norms = bank.load(f"patch_norms.{layer}", splits)  # (B, N)
    flags = bank.is_train(splits)
    test = ~flags
    last = bank.depth - 1

    def norm_probe() -> None:
        # The test images, whichever other probes ran: the removal probe picks its first layer from the same.
        (row,) = probes.norm_distribution(
            norms[test][None], [layer], settings.artifact_method, settings.norm_threshold, settings.top_percent
        )
        cls = bank.load("cls_norms", splits)[test][:, layer]
        registers = bank.load("register_norms", splits)[test][:, layer]
        row["cls_norm_mean"] = float(cls.mean())
        row["register_norm_mean"] = float(registers.mean()) if registers.shape[-1] else math.nan
        row["images"] = int(test.sum())
        result.tables["norms"] = [row]
        result.figures["norm_layers"] = {"layers": [layer], "counts": probes.norm_histograms(norms[test][None])}
        if layer == last:
            last_norms = norms[test]
            result.figures["norm_last"] = {
                "counts": probes.norm_histograms(last_norms[None])[0],
                "outlier_share": outlier_share(settings.detect(last_norms), bank.load("ids", splits)[test]),
            }

    def local_probe() -> None:
        labels = labels_of(bank, splits)
        class_labels = labels if (labels >= 0).all() else None  # stratify the local splits when there are any
        rows, values = probes.local_information(
            bank.sample(layer, splits), settings.detect(norms), bank.grid, int(test.sum()), settings.seeds, class_labels
        )
        result.tables["local"] = [{"layer": layer, **row} for row in rows]
        effect = effect_row("local", "top1 artifact - normal", artifact_minus_normal(values), layer=layer)
        result.tables.setdefault("effects", []).append(effect)

    for probe, run in (("norms", norm_probe), ("local", local_probe)):
        if probe in probe_names:
            result.guard(probe, run)


def run_final(
    bank: Bank, probe_names: tuple[str, ...], settings: ProbeSettings, data: DataSpec, result: TaskResult
) -> None:
    """The last layer's probes (`probe_names`: the run's probes; those of FINAL_PROBES among them run here)."""
    want = set(probe_names)
    splits = final_splits(probe_names)
    grid, last = bank.grid, bank.depth - 1
    norms, attention = bank.load(f"patch_norms.{last}", splits), bank.load("attention", splits)
    is_train, labels = bank.is_train(splits), labels_of(bank, splits)
    mask = settings.detect(norms)
    test = ~is_train
    shown = np.flatnonzero(test)[: settings.figure_images]

    def attention_probe() -> None:
        maps = attention[test].reshape(-1, *grid)
        rows = [{"layer": last, "query": "cls", **probes.attention_stats(maps, mask[test])}]
        registers = bank.load("registers", splits)  # (B, R, N)
        for r in range(registers.shape[1]):
            stats = probes.attention_stats(registers[test][:, r].reshape(-1, *grid), mask[test])
            rows.append({"layer": last, "query": f"register {r}", **stats})
        result.tables.setdefault("attention", []).extend(rows)
        _, test_split, _ = open_splits(data, bank.manifest["key"]["model"]["name"])  # pixels only, no pass
        img_size = bank.info["img_size"]
        pixels = test_split.source.load(test_split.indices[: len(shown)], img_size, *_normalisation(bank)).pixels
        result.figures["attention_maps"] = {
            "pixels": pixels.numpy(),
            "maps": attention[shown].reshape(-1, *grid),
            "registers": registers[shown].reshape(len(shown), -1, *grid),
        }

    def correspondence_probe() -> None:
        overlap = probes.norm_attention_overlap(norms[test], attention[test], settings.top_percent)
        row = {key: float(values.mean()) for key, values in overlap.items()}
        attention_of = lambda selected: float(attention[test][selected].mean()) if selected.any() else math.nan
        row["attention_artifact_mean"] = attention_of(mask[test])
        row["attention_normal_mean"] = attention_of(~mask[test])
        result.tables["correspondence"] = [{"percent": settings.top_percent, **row}]
        effect = artifact_minus_normal(group_values(attention[test], mask[test]))
        result.tables.setdefault("effects", []).append(
            effect_row("correspondence", "CLS attention artifact - normal", effect)
        )
        result.figures["correspondence"] = {
            "norms": norms[shown].reshape(-1, *grid),
            "attention": attention[shown].reshape(-1, *grid),
            "percent": settings.top_percent,
        }

    def neighbours_probe() -> None:
        cosines = bank.load("cosines", splits)
        result.tables["neighbours"] = [probes.neighbour_similarity(cosines, mask)]
        effect = artifact_minus_normal(group_values(cosines, mask))
        result.tables.setdefault("effects", []).append(effect_row("neighbours", "cosine artifact - normal", effect))
        result.figures["neighbours"] = {"artifact": cosines[mask], "normal": cosines[~mask]}

    def global_probe() -> None:
        sample = bank.sample(last, splits)
        rows, values = probes.global_information(
            sample, mask, labels, int(test.sum()), settings.seeds, settings.max_iter
        )
        result.tables["global"] = rows
        effect = artifact_minus_normal(values)
        result.tables.setdefault("effects", []).append(effect_row("global", "accuracy artifact - normal", effect))

    def representation_probe() -> None:
        features = {"cls": bank.load("cls", splits), "mean_patch": bank.load("mean_patch", splits)}
        rows, values = probes.representation_quality(
            features, labels, int(test.sum()), settings.seeds, settings.max_iter, bank.load("ids", splits)
        )
        result.tables["representation"] = rows
        result.figures["representation_images"] = values  # per image, for with/without-register intervals

    runs = {
        "attention": attention_probe,
        "correspondence": correspondence_probe,
        "neighbours": neighbours_probe,
        "global": global_probe,
        "representation": representation_probe,
    }
    for probe, run in runs.items():
        if probe in want:
            result.guard(probe, run)


def _normalisation(bank: Bank) -> tuple[tuple, tuple]:
    return tuple(bank.manifest["mean"]), tuple(bank.manifest["std"])
