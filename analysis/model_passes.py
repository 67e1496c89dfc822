"""The probe work that needs the model again, reading the clean pass from the bank.

- `run_removal`: the study's removal needs a second, *edited* forward by its nature (the one extra pass over the
  images, counted apart from the bank's); the clean side (detection, CLS features, maps, predictions) is the bank's.
- `run_progression`: the attention-progression figure: attention rows of queries chosen from the last layer's norms
  (a random normal patch, the highest-norm patch) at every layer, so it forwards the `figure_images` test images
  (default 2) once more; counted apart too.
- `run_segmentation`: the heads train on the bank's features; the last-block variants copy the model's last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis import probes
from analysis.bank import SPLITS, TEST_ID_OFFSET, Bank, BankError, autocast_for, precision_of
from analysis.data import DataSpec, Split, open_splits
from analysis.extract import batches, figure_queries, query_attention
from analysis.probe_settings import REMOVAL_FIRST_OUTLIER, ProbeSettings, TaskResult
from analysis.probe_tasks import final_splits, layer_splits
from analysis.seg_heads import segmentation_rows
from analysis.segmentation import has_last_block_variants
from analysis.specs import ModelSpec, load_model
from analysis.uncertainty import effect_row
from vitreg import ArtifactRemoval, run_taps


@dataclass
class Context:
    """The loaded model and data a model pass works on."""

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

    @property
    def grid(self) -> tuple[int, int]:
        patch = self.model.patch_embed.patch_size
        return self.img_size // patch[0], self.img_size // patch[1]

    def passes(self, with_train: bool):
        """(is_train, image ids, batch) over the test split, after the train split when asked (the bank's order)."""
        splits = [(True, self.train), (False, self.test)] if with_train else [(False, self.test)]
        for is_train, split in splits:
            for ids, batch in batches(split, self.settings.batch_size, self.img_size, self.mean, self.std):
                batch.images = batch.images.to(self.device)
                yield is_train, ids + (0 if is_train else TEST_ID_OFFSET), batch


def open_context(spec: ModelSpec, data: DataSpec, settings: ProbeSettings) -> Context:
    train, test, protocol = open_splits(data, spec.name)
    model, mean, std = load_model(spec, settings.img_size or protocol.img_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES
    return Context(model.to(device), mean, std, model.patch_embed.img_size[0], train, test, settings, device)


def _np(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


# ---------------------------------------------------------------- attention progression (figure images)


@torch.no_grad()
def run_progression(ctx: Context, bank: Bank, probe_names: tuple[str, ...], result: TaskResult) -> None:
    """Attention of CLS, registers, a normal and the highest-norm patch, per layer, on the figure images."""
    splits, last = layer_splits(probe_names), ctx.depth - 1
    flags = bank.is_train(splits)
    last_norms = bank.load(f"patch_norms.{last}", splits)
    last_mask = ctx.settings.detect(last_norms)[~flags]
    last_norms = last_norms[~flags]
    layers, grid = list(range(ctx.depth)), ctx.grid
    count = min(ctx.settings.figure_images, len(ctx.test.indices))
    batch = ctx.test.source.load(ctx.test.indices[:count], ctx.img_size, ctx.mean, ctx.std)
    queries, names = figure_queries(torch.from_numpy(last_norms[:count]), ctx.prefix, ctx.settings.sample_seed)
    with torch.inference_mode(), autocast_for(ctx.device):  # as the bank's pass, whose norms chose the queries
        rows = _np(query_attention(ctx.model, batch.images.to(ctx.device), layers, queries))  # (L, B, H, Q, T)
    result.passes["figure"] = result.passes.get("figure", 0) + count
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


# ---------------------------------------------------------------- removal (an edited pass)


@dataclass
class CleanPass:
    """The bank's clean pass over the images the last-layer probes cover (the training images first)."""

    is_train: np.ndarray  # (B,)
    labels: np.ndarray  # (B,), -1 without class labels
    attention: np.ndarray  # (B, N) head-mean CLS attention of the last block
    predictions: np.ndarray  # (B,)
    cls: np.ndarray  # (B, C)
    layer_norms: list[np.ndarray]  # per layer (B, N); only read when removal starts at the first outlier block

    @classmethod
    def of(cls, bank: Bank, splits: tuple[str, ...], all_layers: bool) -> CleanPass:
        layers = range(bank.depth) if all_layers else ()
        return cls(
            is_train=bank.is_train(splits),
            labels=bank.load("labels", splits),
            attention=bank.load("attention", splits),
            predictions=bank.load("predictions", splits),
            cls=bank.load("cls", splits),
            layer_norms=[bank.load(f"patch_norms.{layer}", splits) for layer in layers],
        )


def run_removal(ctx: Context, bank: Bank, probe_names: tuple[str, ...], result: TaskResult) -> None:
    """The removal probe: clean results from the bank, the edited pass here."""
    splits, settings = final_splits(probe_names), ctx.settings
    if bank.precision != precision_of(ctx.device):  # clean and edited passes must compute alike to compare
        raise BankError(
            f"the bank's pass ran in {bank.precision}; removal here would run in {precision_of(ctx.device)}"
        )
    all_layers = not settings.removal_layers and settings.removal_from == REMOVAL_FIRST_OUTLIER
    kept = CleanPass.of(bank, splits, all_layers)
    mask = settings.detect(bank.load(f"patch_norms.{ctx.depth - 1}", splits))
    result.guard("removal", lambda: _removal(ctx, kept, mask, result))


def _removal_layers(ctx: Context, kept: CleanPass) -> tuple[list[int], str]:
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
    test = ~kept.is_train
    fractions = [settings.detect(norms[test]).mean() for norms in kept.layer_norms]  # as the norms probe
    first = probes.first_outlier_layer(range(depth), fractions)
    if first is None:
        return list(range(min(depth // 2, depth - 2), depth - 1)), "from the middle block on (no outliers found)"
    return list(range(min(first, depth - 2), depth - 1)), f"from the first block with outliers ({first}) on"


def _editable_block(layer: int, depth: int) -> int | None:
    """`layer` (negative: from the end) as a block removal may edit (any but the last), or None."""
    block = layer + depth if layer < 0 else layer
    return block if 0 <= block <= depth - 2 else None


@torch.no_grad()
def _removal(ctx: Context, kept: CleanPass, mask: np.ndarray, result: TaskResult) -> None:
    """The study's inference-time removal at its blocks (each edit feeds the later blocks), scored on the test
    images. `layer` in the row is the first edited block, `layers` all of them; a token counts as removed when
    it is replaced at any of them.

    With class labels the edited pass also covers the training images: the CLS linear probe draws a new
    train/test split per seed, so any image may be a test image.
    """
    layers, reason = _removal_layers(ctx, kept)
    layer = layers[0]
    last, grid, settings = ctx.depth - 1, ctx.grid, ctx.settings
    removal = ArtifactRemoval(layers, settings.removal_percent, settings.removal_percent)
    labels = kept.labels
    with_labels = bool((labels >= 0).all())
    maps, cls, predictions, norms, removed, flags = [], [], [], [], [], []
    for train_flag, ids, batch in ctx.passes(with_train=with_labels):
        with torch.inference_mode(), autocast_for(ctx.device):  # as the bank's clean pass
            taps = run_taps(
                ctx.model,
                batch.images,
                layers=[last],
                attention_layers=(last,),
                keep_block_outputs=(last,),
                token_edit=removal,
            )
            edited_cls = ctx.model.norm(taps.block_outputs[last])[:, 0]
        maps.append(_np(taps.cls_attention_map(last)))
        cls.append(_np(edited_cls))
        predictions.append(_np(taps.logits.argmax(dim=-1)))
        norms.append(_np(taps.patch_norms[-1]))
        removed.append(np.any([_np(removal.removed[edited]) for edited in layers], axis=0))  # (B, N)
        flags.append(np.full(len(ids), train_flag))
        result.passes["removal"] = result.passes.get("removal", 0) + len(ids)
    on_test = ~np.concatenate(flags)  # of this pass
    test = ~kept.is_train  # of the clean pass
    clean_maps = kept.attention[test].reshape(-1, *grid)
    edited_maps = np.concatenate(maps)[on_test]
    removed_test = np.concatenate(removed)[on_test]
    row = {
        "layer": layer,
        "layers": " ".join(map(str, layers)),
        "layer_choice": reason,
        "removed_per_image": float(removed_test.sum(1).mean()),
    }
    effect, smoothing = probes.removal_effect(
        clean_maps, edited_maps, kept.predictions[test], np.concatenate(predictions)[on_test]
    )
    row |= effect
    row["outlier_fraction_clean"] = float(mask[test].mean())
    row["outlier_fraction_removed"] = float(settings.detect(np.concatenate(norms)[on_test]).mean())  # come back?
    effects = [effect_row("removal", "total variation removed - clean", smoothing, layer=layer)]
    if with_labels:
        accuracy, change = probes.removal_accuracy(
            kept.cls, np.concatenate(cls), labels, int(test.sum()), settings.seeds, settings.max_iter
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


# ---------------------------------------------------------------- segmentation heads on the bank's features


def segmentation_cached(bank: Bank, block_inputs: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The bank's segmentation features as `_segmentation_features` cached them: name -> (train, test) tensors of
    the normalised patches (float16), the masks and, if asked, the last block's inputs (float16)."""
    names = ["patches", "masks"] + (["block_inputs"] if block_inputs else [])
    return {name: tuple(torch.from_numpy(bank.load(f"seg.{name}", (split,))) for split in SPLITS) for name in names}


def run_segmentation(ctx: Context, bank: Bank, result: TaskResult) -> None:
    """A linear head on frozen features; for register-free models also the last block + new registers variants."""
    settings, grid = ctx.settings, ctx.grid
    classes = ctx.train.source.segmentation_classes
    if not classes:
        raise ValueError("segmentation needs a dataset with masks (ade20k or generated)")
    register_variants = settings.seg_registers if has_last_block_variants(ctx.depth, ctx.prefix) else ()
    cached = segmentation_cached(bank, block_inputs=bool(register_variants))
    # Every variant x seed x lr together, over one pass of the features per epoch kept on the device.
    result.tables["segmentation"] = segmentation_rows(
        cached, ctx.model, ctx.prefix, grid, classes, settings, ctx.device
    )
