"""One unit of work: one model, one group of probes (and a layer chunk), one pass over the data.

A task loads its model once and runs the probes of its group from a single `vitreg.run_taps` pass. Groups:
- `layers`: per-layer probes (norms, local information, attention progression) for one chunk of the blocks;
- `final`: probes of the last layer (attention maps, correspondence, neighbours, global information,
  representation quality) and artifact removal (one more pass, with the edit);
- `segmentation`: frozen features of ADE20K-style data, then every segmentation head.
A probe that fails is recorded in `TaskResult.errors` and the others still report. Nothing here knows Ray.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis import probes
from analysis.data import DataSpec, Split, open_splits
from analysis.extract import batches, figure_queries, query_attention, sample_tokens
from analysis.segmentation import (
    HeadSettings,
    LastBlockSegmenter,
    LinearSegmenter,
    evaluate_segmenter,
    train_segmenter,
)
from analysis.specs import ModelSpec, load_model, model_info
from analysis.uncertainty import artifact_minus_normal, effect_row, group_values, outlier_share, seed_stats
from vitreg import DETECTION_METHODS, ArtifactRemoval, detect_artifacts, run_taps

PROBE_GROUPS: dict[str, tuple[str, ...]] = {
    "norms": ("layers",),
    "attention": ("layers", "final"),
    "correspondence": ("final",),
    "neighbours": ("final",),
    "global": ("final",),
    "local": ("layers",),
    "representation": ("final",),
    "segmentation": ("segmentation",),
    "removal": ("final",),
}
PROBES = tuple(PROBE_GROUPS)
GROUPS = ("layers", "final", "segmentation")
NEEDS_LABELS = ("global", "representation")
NEEDS_MASKS = ("segmentation",)
REMOVAL_FIRST_OUTLIER = "first-outlier"


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes run; defaults follow the study (section 3.4).

    Args:
        batch_size: images per forward pass.
        img_size: resolution for every model (None: the dataset protocol's, else the model's own).
        artifact_method, norm_threshold, top_percent: artifact detection (`vitreg.detect_artifacts`).
        seeds, max_iter: logistic-regression seeds and iteration limit.
        figure_images: test images shown in the map figures.
        top_tokens, random_tokens: candidates kept per image and layer for the token probes.
        sample_seed: which random tokens are kept.
        removal_layers: blocks where artifacts are removed (negative: from the end; never the last block);
            empty: from `removal_from` on.
        removal_from: with no `removal_layers`, remove at this block and every later one but the last:
            `first-outlier` (the first block with outliers in the norms probe's detection on the test images, the
            middle block when none has any; the study's choice) or a block index.
        removal_percent: top percent by norm and by attention that removal intersects.
        seg_head, seg_block: training of the linear head and of the last-block variant.
        seg_registers: registers of the last-block variants (for models without registers of their own).
    """

    batch_size: int = 16
    img_size: int | None = None
    artifact_method: str = "auto"
    norm_threshold: float = 100.0
    top_percent: float = 5.0
    seeds: tuple[int, ...] = probes.STUDY_SEEDS
    max_iter: int = 1000
    figure_images: int = 2
    top_tokens: int = 4
    random_tokens: int = 4
    sample_seed: int = 0
    removal_layers: tuple[int, ...] = ()
    removal_from: str = REMOVAL_FIRST_OUTLIER
    removal_percent: float = 5.0
    seg_head: HeadSettings = field(default_factory=lambda: HeadSettings(epochs=20))
    seg_block: HeadSettings = field(default_factory=lambda: HeadSettings(epochs=50))
    seg_registers: tuple[int, ...] = (0, 1, 2, 4)

    def __post_init__(self) -> None:
        problems = []
        if self.artifact_method not in DETECTION_METHODS:
            problems.append(f"artifact_method={self.artifact_method!r} (allowed: {', '.join(DETECTION_METHODS)})")
        for name in ("batch_size", "max_iter", "figure_images", "top_tokens", "random_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be at least 1)")
        for name in ("top_percent", "removal_percent"):
            if not 0 < getattr(self, name) <= 100:
                problems.append(f"{name}={getattr(self, name)} (must be in (0, 100])")
        if self.img_size is not None and self.img_size < 1:
            problems.append(f"img_size={self.img_size} (must be positive)")
        if not self.seeds:
            problems.append("seeds=() (give at least one seed)")
        if self.removal_from != REMOVAL_FIRST_OUTLIER and not _is_int(self.removal_from):
            problems.append(f"removal_from={self.removal_from!r} (allowed: {REMOVAL_FIRST_OUTLIER} or a block index)")
        if len(set(self.removal_layers)) != len(self.removal_layers):
            problems.append(f"removal_layers={self.removal_layers} (each block at most once)")
        if any(count < 0 for count in self.seg_registers):
            problems.append(f"seg_registers={self.seg_registers} (counts must be 0 or more)")
        if problems:
            raise ValueError(f"probe settings: {'; '.join(problems)}")

    def detect(self, norms: np.ndarray) -> np.ndarray:
        """Artifact mask of (B, N) norms under these settings."""
        report = detect_artifacts(torch.from_numpy(norms), self.artifact_method, self.norm_threshold, self.top_percent)
        return report.mask.numpy()


@dataclass(frozen=True)
class ProbeTask:
    """What one Ray task does: `probes` of `group` on `model`, for layer chunk `chunk` of `chunks`."""

    model: ModelSpec
    group: str
    probes: tuple[str, ...]
    data: DataSpec
    settings: ProbeSettings
    chunk: int = 0
    chunks: int = 1


@dataclass
class TaskResult:
    """Table rows per probe, arrays for figures, and the errors of probes that failed."""

    model: str
    group: str
    chunk: int
    info: dict = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    figures: dict[str, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def add_error(self, probe: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.errors.append(
            {"model": self.model, "probe": probe, "group": self.group, "chunk": self.chunk, "error": text}
        )

    def guard(self, probe: str, run: Callable[[], None]) -> None:
        """Run one probe; a failure becomes an error row, not a lost task."""
        try:
            run()
        except Exception as error:
            self.add_error(probe, error)
            self.errors[-1]["traceback"] = traceback.format_exc(limit=4)


@dataclass
class Context:
    """The loaded model and data a task works on."""

    model: torch.nn.Module
    mean: tuple
    std: tuple
    img_size: int
    train: Split
    test: Split
    settings: ProbeSettings
    device: torch.device

    @property
    def prefix(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def passes(self, with_train: bool):
        """(is_train, source indices, batch) over the test split, after the train split when asked."""
        splits = [(True, self.train), (False, self.test)] if with_train else [(False, self.test)]
        for is_train, split in splits:
            for ids, batch in batches(split, self.settings.batch_size, self.img_size, self.mean, self.std):
                batch.images = batch.images.to(self.device)
                yield is_train, ids + (0 if is_train else 10**9), batch  # ids stay distinct across splits


def run_task(task: ProbeTask) -> TaskResult:
    """Load the model and data of `task`, run its probes; never raises (errors are in the result)."""
    start = time.perf_counter()
    result = TaskResult(model=task.model.label, group=task.group, chunk=task.chunk)
    try:
        train, test, protocol = open_splits(task.data, task.model.name)
        model, mean, std = load_model(task.model, task.settings.img_size or protocol.img_size)
        result.info = {**model_info(model), "train_images": len(train.indices), "test_images": len(test.indices)}
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        context = Context(
            model.to(device), mean, std, model.patch_embed.img_size[0], train, test, task.settings, device
        )
        GROUP_RUNNERS[task.group](context, task, result)
    except Exception as error:  # the model or the pass failed: every probe of the task reports it
        failed = {row["probe"] for row in result.errors}
        for probe in task.probes:
            if probe not in result.tables and probe not in failed:
                result.add_error(probe, error)
    result.seconds = time.perf_counter() - start
    return result


def run_task_in_worker(task: ProbeTask, threads: int) -> TaskResult:
    """`run_task` in a Ray worker. It lives here, not in the runner, so workers never import MLflow or matplotlib."""
    torch.set_num_threads(threads)  # as many as the task's CPUs, so tasks on one node do not oversubscribe
    return run_task(task)


def _np(tensor: torch.Tensor) -> np.ndarray:
    """A tapped tensor as a float32 (or integer) array on the host."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


# ---------------------------------------------------------------- group: layers


@torch.no_grad()
def _run_layers(ctx: Context, task: ProbeTask, result: TaskResult) -> None:
    layers = np.array_split(np.arange(ctx.depth), task.chunks)[task.chunk].tolist()
    if not layers:
        return
    last = ctx.depth - 1
    tapped = sorted({*layers, last})
    want_local = "local" in task.probes
    settings = ctx.settings
    norms, cls_norms, register_norms, is_train, image_ids, labels = [], [], [], [], [], []
    samples: dict[int, list[probes.TokenSample]] = {layer: [] for layer in layers}
    for train_flag, ids, batch in ctx.passes(with_train=want_local):
        taps = run_taps(
            ctx.model, batch.images, layers=tapped, attention_layers=(), keep_block_outputs=layers if want_local else ()
        )
        norms.append(_np(taps.patch_norms))  # (Lt, B, N)
        cls_norms.append(_np(taps.cls_norms))
        register_norms.append(_np(taps.register_norms))
        is_train.append(np.full(len(ids), train_flag))
        image_ids.append(ids)
        labels.append(batch.labels.numpy() if batch.labels is not None else np.full(len(ids), -1))
        for layer in layers if want_local else ():
            patches = taps.block_outputs[layer][:, ctx.prefix :]
            norm = taps.patch_norms[tapped.index(layer)]
            samples[layer].append(
                sample_tokens(patches, norm, ids, settings.top_tokens, settings.random_tokens, settings.sample_seed)
            )
    all_norms = np.concatenate(norms, axis=1)  # (Lt, B, N)
    chunk_norms = all_norms[[tapped.index(layer) for layer in layers]]
    masks = {layer: settings.detect(all_norms[tapped.index(layer)]) for layer in tapped}
    flags = np.concatenate(is_train)
    all_labels = np.concatenate(labels)
    class_labels = all_labels if (all_labels >= 0).all() else None  # stratify the local splits when there are any
    grid = _grid(ctx)

    def norm_probe() -> None:
        # The test images, whichever other probes ran: the removal probe picks its first layer from the same.
        test = ~flags
        rows = probes.norm_distribution(
            chunk_norms[:, test], layers, settings.artifact_method, settings.norm_threshold, settings.top_percent
        )
        cls = np.concatenate(cls_norms, axis=1)[:, test]
        registers = np.concatenate(register_norms, axis=1)[:, test]
        for row in rows:
            index = tapped.index(row["layer"])
            row["cls_norm_mean"] = float(cls[index].mean())
            row["register_norm_mean"] = float(registers[index].mean()) if registers.shape[-1] else math.nan
            row["images"] = int(test.sum())
        result.tables["norms"] = rows
        result.figures["norm_layers"] = {"layers": layers, "counts": probes.norm_histograms(chunk_norms[:, test])}
        if last in layers:
            last_norms = all_norms[-1][test]
            result.figures["norm_last"] = {
                "counts": probes.norm_histograms(last_norms[None])[0],
                "outlier_share": outlier_share(settings.detect(last_norms), np.concatenate(image_ids)[test]),
            }

    def local_probe() -> None:
        rows, effects = [], []
        for layer in layers:
            sample = probes.TokenSample.concatenate(samples[layer])
            test_size = int((~flags).sum())
            layer_rows, values = probes.local_information(
                sample, masks[layer], grid, test_size, settings.seeds, class_labels
            )
            rows += [{"layer": layer, **row} for row in layer_rows]
            effects.append(effect_row("local", "top1 artifact - normal", artifact_minus_normal(values), layer=layer))
        result.tables["local"] = rows
        result.tables.setdefault("effects", []).extend(effects)

    def progression_probe() -> None:
        _attention_progression(ctx, layers, all_norms[-1][~flags], masks[last][~flags], grid, result)

    for probe, run in (("norms", norm_probe), ("local", local_probe), ("attention", progression_probe)):
        if probe in task.probes:
            result.guard(probe, run)


def _attention_progression(
    ctx: Context, layers: list[int], last_norms: np.ndarray, last_mask: np.ndarray, grid: tuple, result: TaskResult
) -> None:
    """Attention of CLS, registers, a normal and the highest-norm patch, per layer, on the figure images."""
    count = min(ctx.settings.figure_images, len(ctx.test.indices))
    batch = ctx.test.source.load(ctx.test.indices[:count], ctx.img_size, ctx.mean, ctx.std)
    queries, names = figure_queries(torch.from_numpy(last_norms[:count]), ctx.prefix, ctx.settings.sample_seed)
    rows = _np(query_attention(ctx.model, batch.images.to(ctx.device), layers, queries))  # (L, B, H, Q, T)
    maps = probes.head_mean_map(rows.transpose(0, 1, 3, 2, 4), ctx.prefix, grid)  # (L, B, Q, rows, cols)
    table = []
    for index, layer in enumerate(layers):
        for q, name in enumerate(names):
            stats = probes.attention_stats(maps[index, :, q], last_mask[:count])
            table.append({"layer": layer, "query": name, **stats})
    result.tables.setdefault("attention", []).extend(table)
    result.figures["attention_progression"] = {
        "layers": layers,
        "maps": maps[:, 0],  # first image: (L, Q, rows, cols)
        "names": names,
        "tokens": (queries[0] - ctx.prefix).tolist(),
        "grid": grid,
    }


# ---------------------------------------------------------------- group: final (last layer)


@dataclass
class FinalPass:
    """What the final group keeps from its pass: per image, last layer only (and all-layer norms for removal)."""

    norms: list = field(default_factory=list)  # (B, N) last-layer patch norms
    layer_norms: list = field(default_factory=list)  # (L, B, N), only when removal picks its layer
    attention: list = field(default_factory=list)  # (B, N) head-mean CLS attention over patches
    registers: list = field(default_factory=list)  # (B, R, N) head-mean register attention over patches
    cosines: list = field(default_factory=list)  # (B, N) neighbour similarity of the patch embedding
    samples: list = field(default_factory=list)  # TokenSample of the last layer
    cls: list = field(default_factory=list)  # (B, C) normalised CLS
    mean_patch: list = field(default_factory=list)  # (B, C) mean of normalised patches
    predictions: list = field(default_factory=list)  # (B,) model head top-1
    labels: list = field(default_factory=list)
    is_train: list = field(default_factory=list)
    ids: list = field(default_factory=list)  # source index of each image (test ones offset), equal across models

    def stacked(self, name: str) -> np.ndarray:
        values = getattr(self, name)
        return np.concatenate(values, axis=1 if name == "layer_norms" else 0)


@torch.no_grad()
def _final_pass(ctx: Context, want: set[str]) -> FinalPass:
    settings, prefix, last = ctx.settings, ctx.prefix, ctx.depth - 1
    grid = _grid(ctx)
    needs_train = bool(want & {"global", "representation", "removal"})
    all_layers = "removal" in want and not settings.removal_layers and settings.removal_from == REMOVAL_FIRST_OUTLIER
    kept = FinalPass()
    for train_flag, ids, batch in ctx.passes(with_train=needs_train):
        taps = run_taps(
            ctx.model,
            batch.images,
            layers=None if all_layers else [last],
            attention_layers=(last,),
            keep_patch_embedding="neighbours" in want,
            keep_block_outputs=(last,),
        )
        norms = taps.patch_norms[-1]  # (B, N)
        output = taps.block_outputs[last]  # (B, T, C) pre-norm
        normalised = ctx.model.norm(output)
        kept.norms.append(_np(norms))
        if all_layers:
            kept.layer_norms.append(_np(taps.patch_norms))
        kept.attention.append(_np(taps.cls_attention_map(last).reshape(len(ids), -1)))
        register_rows = taps.register_attention[0].mean(dim=2)[..., prefix:]  # (B, R, N)
        kept.registers.append(_np(register_rows))
        if "neighbours" in want:
            kept.cosines.append(probes.neighbour_cosine(_np(taps.patch_embedding), grid))
        if "global" in want:
            sample = sample_tokens(
                output[:, prefix:], norms, ids, settings.top_tokens, settings.random_tokens, settings.sample_seed
            )
            kept.samples.append(sample)
        kept.cls.append(_np(normalised[:, 0]))
        kept.mean_patch.append(_np(normalised[:, prefix:].mean(dim=1)))
        kept.predictions.append(_np(taps.logits.argmax(dim=-1)))
        kept.labels.append(batch.labels.numpy() if batch.labels is not None else np.full(len(ids), -1))
        kept.is_train.append(np.full(len(ids), train_flag))
        kept.ids.append(ids)
    return kept


def _grid(ctx: Context) -> tuple[int, int]:
    patch = ctx.model.patch_embed.patch_size
    return ctx.img_size // patch[0], ctx.img_size // patch[1]


def _run_final(ctx: Context, task: ProbeTask, result: TaskResult) -> None:
    want = set(task.probes)
    settings, grid = ctx.settings, _grid(ctx)
    kept = _final_pass(ctx, want)
    norms, attention, is_train = kept.stacked("norms"), kept.stacked("attention"), kept.stacked("is_train")
    labels = kept.stacked("labels")
    mask = settings.detect(norms)
    test = ~is_train
    shown = np.flatnonzero(test)[: settings.figure_images]

    def attention_probe() -> None:
        maps = attention[test].reshape(-1, *grid)
        rows = [{"layer": ctx.depth - 1, "query": "cls", **probes.attention_stats(maps, mask[test])}]
        registers = kept.stacked("registers")[test]  # (B, R, N)
        for r in range(registers.shape[1]):
            stats = probes.attention_stats(registers[:, r].reshape(-1, *grid), mask[test])
            rows.append({"layer": ctx.depth - 1, "query": f"register {r}", **stats})
        result.tables.setdefault("attention", []).extend(rows)
        pixels = ctx.test.source.load(ctx.test.indices[: len(shown)], ctx.img_size, ctx.mean, ctx.std).pixels
        result.figures["attention_maps"] = {
            "pixels": pixels.numpy(),
            "maps": attention[shown].reshape(-1, *grid),
            "registers": kept.stacked("registers")[shown].reshape(len(shown), -1, *grid),
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
        cosines = kept.stacked("cosines")
        result.tables["neighbours"] = [probes.neighbour_similarity(cosines, mask)]
        effect = artifact_minus_normal(group_values(cosines, mask))
        result.tables.setdefault("effects", []).append(effect_row("neighbours", "cosine artifact - normal", effect))
        result.figures["neighbours"] = {"artifact": cosines[mask], "normal": cosines[~mask]}

    def global_probe() -> None:
        sample = probes.TokenSample.concatenate(kept.samples)
        rows, values = probes.global_information(
            sample, mask, labels, int(test.sum()), settings.seeds, settings.max_iter
        )
        result.tables["global"] = rows
        effect = artifact_minus_normal(values)
        result.tables.setdefault("effects", []).append(effect_row("global", "accuracy artifact - normal", effect))

    def representation_probe() -> None:
        features = {"cls": kept.stacked("cls"), "mean_patch": kept.stacked("mean_patch")}
        rows, values = probes.representation_quality(
            features, labels, int(test.sum()), settings.seeds, settings.max_iter, kept.stacked("ids")
        )
        result.tables["representation"] = rows
        result.figures["representation_images"] = values  # per image, for with/without-register intervals

    def removal_probe() -> None:
        _removal(ctx, kept, mask, result)

    runs = {
        "attention": attention_probe,
        "correspondence": correspondence_probe,
        "neighbours": neighbours_probe,
        "global": global_probe,
        "representation": representation_probe,
        "removal": removal_probe,
    }
    for probe, run in runs.items():
        if probe in want:
            result.guard(probe, run)


def _removal_layers(ctx: Context, kept: FinalPass) -> tuple[list[int], str]:
    """The blocks to remove artifacts at, in forward order, and why: asked for, or from a block on.

    The last block is never edited: an edit there reaches neither its CLS attention nor the logits, and the
    last layer's norms must show whether the artifacts come back.
    """
    depth, settings = ctx.depth, ctx.settings
    if depth < 2:
        raise ValueError(f"removal needs a model of at least 2 blocks (the last is never edited); it has {depth}")
    allowed = f"blocks 0..{depth - 2}, or -{depth}..-2 from the end (the last block is never edited)"
    if settings.removal_layers:
        blocks = [_editable_block(layer, depth) for layer in settings.removal_layers]
        if None in blocks or len(set(blocks)) != len(blocks):
            raise ValueError(
                f"removal_layers={list(settings.removal_layers)}: a model of depth {depth} takes {allowed}"
            )
        return sorted(blocks), "asked"
    if settings.removal_from != REMOVAL_FIRST_OUTLIER:
        start = _editable_block(int(settings.removal_from), depth)
        if start is None:
            raise ValueError(f"removal_from={settings.removal_from}: a model of depth {depth} takes {allowed}")
        return list(range(start, depth - 1)), f"from block {start} on (asked)"
    test = ~kept.stacked("is_train")
    fractions = [settings.detect(norms[test]).mean() for norms in kept.stacked("layer_norms")]  # as the norms probe
    first = probes.first_outlier_layer(range(depth), fractions)
    if first is None:
        return list(range(min(depth // 2, depth - 2), depth - 1)), "from the middle block on (no outliers found)"
    return list(range(min(first, depth - 2), depth - 1)), f"from the first block with outliers ({first}) on"


def _editable_block(layer: int, depth: int) -> int | None:
    """`layer` (negative: from the end) as a block removal may edit (any but the last), or None."""
    block = layer + depth if layer < 0 else layer
    return block if 0 <= block <= depth - 2 else None


@torch.no_grad()
def _removal(ctx: Context, kept: FinalPass, mask: np.ndarray, result: TaskResult) -> None:
    """The study's inference-time removal at its blocks (each edit feeds the later blocks), scored on the test
    images. `layer` in the row is the first edited block, `layers` all of them; a token counts as removed when
    it is replaced at any of them.

    With class labels the edited pass also covers the training images: the CLS linear probe draws a new
    train/test split per seed, so any image may be a test image.
    """
    layers, reason = _removal_layers(ctx, kept)
    layer = layers[0]
    last, grid, settings = ctx.depth - 1, _grid(ctx), ctx.settings
    removal = ArtifactRemoval(layers, settings.removal_percent, settings.removal_percent)
    labels = kept.stacked("labels")
    with_labels = bool((labels >= 0).all())
    maps, cls, predictions, norms, removed, flags = [], [], [], [], [], []
    for train_flag, ids, batch in ctx.passes(with_train=with_labels):
        taps = run_taps(
            ctx.model,
            batch.images,
            layers=[last],
            attention_layers=(last,),
            keep_block_outputs=(last,),
            token_edit=removal,
        )
        maps.append(_np(taps.cls_attention_map(last)))
        cls.append(_np(ctx.model.norm(taps.block_outputs[last])[:, 0]))
        predictions.append(_np(taps.logits.argmax(dim=-1)))
        norms.append(_np(taps.patch_norms[-1]))
        removed.append(np.any([_np(removal.removed[edited]) for edited in layers], axis=0))  # (B, N)
        flags.append(np.full(len(ids), train_flag))
    on_test = ~np.concatenate(flags)  # of this pass
    test = ~kept.stacked("is_train")  # of the clean pass
    clean_maps = kept.stacked("attention")[test].reshape(-1, *grid)
    edited_maps = np.concatenate(maps)[on_test]
    removed_test = np.concatenate(removed)[on_test]
    row = {
        "layer": layer,
        "layers": " ".join(map(str, layers)),
        "layer_choice": reason,
        "removed_per_image": float(removed_test.sum(1).mean()),
    }
    effect, smoothing = probes.removal_effect(
        clean_maps, edited_maps, kept.stacked("predictions")[test], np.concatenate(predictions)[on_test]
    )
    row |= effect
    row["outlier_fraction_clean"] = float(mask[test].mean())
    row["outlier_fraction_removed"] = float(settings.detect(np.concatenate(norms)[on_test]).mean())  # come back?
    effects = [effect_row("removal", "total variation removed - clean", smoothing, layer=layer)]
    if with_labels:
        accuracy, change = probes.removal_accuracy(
            kept.stacked("cls"), np.concatenate(cls), labels, int(test.sum()), settings.seeds, settings.max_iter
        )
        row |= accuracy
        effects.append(effect_row("removal", "CLS accuracy removed - clean", change, layer=layer))
    result.tables["removal"] = [row]
    result.tables.setdefault("effects", []).extend(effects)
    shown = min(settings.figure_images, len(edited_maps))
    result.figures["removal"] = {
        "layer": layer,
        "clean": clean_maps[:shown],
        "removed": edited_maps[:shown],
        "removed_mask": removed_test[:shown].reshape(-1, *grid),
    }


# ---------------------------------------------------------------- group: segmentation


@torch.no_grad()
def _segmentation_features(ctx: Context, block_inputs: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One pass over both splits: (train, test) normalised patch features, masks and, if asked, the last block's
    inputs. Cached in float16 on the host (half the memory); heads upcast each minibatch on the device."""
    last = ctx.depth - 1
    kept = (last - 1, last) if block_inputs else (last,)
    parts: dict[str, dict[bool, list]] = {"patches": {True: [], False: []}, "masks": {True: [], False: []}}
    if block_inputs:
        parts["block_inputs"] = {True: [], False: []}
    for train_flag, _, batch in ctx.passes(with_train=True):
        taps = run_taps(ctx.model, batch.images, layers=[last], attention_layers=(), keep_block_outputs=kept)
        parts["patches"][train_flag].append(ctx.model.norm(taps.block_outputs[last])[:, ctx.prefix :].half().cpu())
        parts["masks"][train_flag].append(batch.masks)
        if block_inputs:
            parts["block_inputs"][train_flag].append(taps.block_outputs[last - 1].half().cpu())
    return {name: (torch.cat(split[True]), torch.cat(split[False])) for name, split in parts.items()}


def _run_segmentation(ctx: Context, task: ProbeTask, result: TaskResult) -> None:
    """A linear head on frozen features; for register-free models also the last block + new registers variants."""
    settings, last, grid = ctx.settings, ctx.depth - 1, _grid(ctx)
    classes = ctx.train.source.segmentation_classes
    if not classes:
        raise ValueError("segmentation needs a dataset with masks (ade20k or generated)")
    register_variants = settings.seg_registers if ctx.depth >= 2 and ctx.prefix == 1 else ()
    cached = _segmentation_features(ctx, block_inputs=bool(register_variants))
    masks_train, masks_test = cached["masks"]

    def linear() -> torch.nn.Module:
        return LinearSegmenter(cached["patches"][0].shape[-1], classes).to(ctx.device)

    variants = [("linear", ctx.prefix - 1, linear, "patches", settings.seg_head)]
    for registers in register_variants:
        make = lambda r=registers: LastBlockSegmenter(
            ctx.model.blocks[last], ctx.model.norm, ctx.prefix, r, classes
        ).to(ctx.device)
        variants.append((f"last_block+reg{registers}", registers, make, "block_inputs", settings.seg_block))
    rows = []
    for name, registers, make, inputs, head in variants:
        train_x, test_x = cached[inputs]
        scores = []
        for seed in settings.seeds:
            torch.manual_seed(seed)  # the head's (and new registers') initial weights
            segmenter = train_segmenter(make(), train_x, masks_train, grid, head, seed)
            scores.append(evaluate_segmenter(segmenter, test_x, masks_test, grid, classes)[0])
        rows.append(
            {
                "variant": name,
                "registers": registers,
                "trains": "head" if name == "linear" else "head + last block + norm + registers",
                "epochs": head.epochs,
                "classes": classes,
                **seed_stats(scores, "miou"),  # mean and sample std over seeds, as the other probes
                "seeds": int(np.isfinite(scores).sum()),
            }
        )
    result.tables["segmentation"] = rows


GROUP_RUNNERS: dict[str, Callable[[Context, ProbeTask, TaskResult], None]] = {
    "layers": _run_layers,
    "final": _run_final,
    "segmentation": _run_segmentation,
}
