"""vitreg.artifacts: the auto detector's "clearly separated" at its stated boundary, over grid sizes, shares and
random bulk spreads; no false positives on unimodal, log-normal and textured spreads; the study's threshold and
top_percent methods; the vectorised neighbourhood minimum; removal at several layers against a hand-run forward."""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitreg
from analysis import run_probes
from analysis.data import DataSpec
from analysis.probes import first_outlier_layer
from analysis.specs import parse_model_spec
from analysis.tasks import ProbeSettings, ProbeTask, run_task
from vitreg.artifacts import ArtifactRemoval, detect_artifacts, neighbourhood_minimum

GRIDS = {16: (4, 4), 36: (6, 6), 196: (14, 14), 1024: (32, 32), 4624: (68, 68)}  # tokens -> (rows, cols)
SHARES = ("1 token", 0.01, 0.05, 0.10, 0.20, 0.25)
MIN_GAP, MIN_RATIO = 4.0, 3.0  # detect_artifacts' defaults: the definition under test
EPS = 0.05  # how far either side of a boundary the planted groups sit (5%)
SEEDS = 12
NORMAL_QUARTILE = 0.6744897501960817


def images_for(tokens: int) -> int:
    """Images per batch: at least 256 tokens (16 images of a 4x4 grid, one of a 14x14 or larger)."""
    return max(1, 256 // tokens)


def group_size(share: str | float, tokens: int) -> int:
    return 1 if share == "1 token" else max(1, round(share * tokens))


def bulk(kind: str, rng: np.random.Generator, images: int, tokens: int) -> np.ndarray:
    """(images, tokens) log-norms of artifact-free maps of one kind, with random parameters."""
    shape = (images, tokens)
    level = rng.normal(0, 1)  # any overall scale: the rule is scale-free
    if kind == "normal":  # normal norms, coefficient of variation up to 0.3
        return level + np.log(np.clip(rng.normal(1, rng.uniform(0.05, 0.3), shape), 0.05, None))
    if kind == "narrow_normal":  # where the ratio, not the gap, decides
        return level + np.log(rng.normal(1, rng.uniform(0.02, 0.06), shape))
    if kind in ("lognormal", "wide_lognormal"):  # wide: where the gap, not the ratio, decides
        return level + rng.normal(0, rng.uniform(0.05 if kind == "lognormal" else 0.25, 0.5), shape)
    if kind == "gamma":  # right-skewed norms with a longer tail than normal
        return level + np.log(rng.gamma(rng.uniform(2, 6), 1, shape))
    if kind == "student_t":  # heavy-ish tails: Student t norms, 10 degrees of freedom
        return level + np.log(np.clip(1 + rng.uniform(0.05, 0.2) * rng.standard_t(10, shape), 0.05, None))
    if kind == "two_modes":  # textured: a second mode up to 2x above the first, up to half the tokens
        second = rng.random(shape) < rng.uniform(0.1, 0.5)
        return level + rng.normal(0, rng.uniform(0.1, 0.2), shape) + math.log(rng.uniform(1.2, 2.0)) * second
    if kind in ("gradient", "wide_gradient"):  # textured: a smooth plane up to 2x across the grid, log-normal texture
        rows, cols = GRIDS[tokens]
        row, col = np.meshgrid(np.linspace(-0.5, 0.5, rows), np.linspace(-0.5, 0.5, cols), indexing="ij")
        slopes = rng.uniform(-1, 1, (images, 2, 1, 1)) * math.log(2)
        plane = (slopes[:, 0] * row + slopes[:, 1] * col).reshape(images, tokens)
        return level + plane + rng.normal(0, rng.uniform(0.05 if kind == "gradient" else 0.25, 0.4), shape)
    if kind == "levels":  # images whose whole norm level differs up to 3x
        return level + rng.uniform(0, math.log(3), (images, 1)) + rng.normal(0, rng.uniform(0.05, 0.3), shape)
    raise ValueError(kind)


NEGATIVE_KINDS = ("normal", "lognormal", "gamma", "student_t", "two_modes", "gradient", "levels")


@pytest.mark.parametrize("tokens", GRIDS)
def test_auto_finds_nothing_on_unimodal_lognormal_and_textured_spreads(tokens):
    found = []
    for kind_index, kind in enumerate(NEGATIVE_KINDS):
        for seed in range(4 * SEEDS):
            rng = np.random.default_rng([tokens, kind_index, seed])
            report = detect_artifacts(torch.from_numpy(np.exp(bulk(kind, rng, images_for(tokens), tokens))))
            if report.count:
                found.append((kind, seed, report.count, report.gap_spreads, report.median_ratio))
    assert found == []


def test_auto_finds_nothing_on_a_textured_object_on_a_flat_background():
    """A quarter of the tokens at about 2.3x a nearly constant background: separated, but below the 3x ratio."""
    rng = np.random.default_rng(0)
    norms = np.full((8, 64), 1.0) + rng.normal(0, 0.01, (8, 64))
    norms[:, 20:36] = rng.uniform(2.2, 2.9, (8, 16))
    report = detect_artifacts(torch.from_numpy(norms))
    assert report.count == 0 and math.isnan(report.threshold)
    assert 2.0 < report.median_ratio < MIN_RATIO and report.gap_spreads > MIN_GAP  # the ratio is what rejects it


class Planted:
    """A batch of bulk log-norms with a group planted `gap` bulk spreads above the bulk, in the units of the
    definition: log-norms centred on each image's median, pooled; s = (median - lower quartile) / 0.6745 of
    the pooled bulk. With several images, some (at least the last) get no group."""

    def __init__(self, kind: str, tokens: int, share: str | float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        images = images_for(tokens)
        self.count = group_size(share, tokens)
        has_group = rng.random(images) < 0.7
        has_group[0], has_group[-1] = True, images == 1  # with several images, at least one has no group
        self.counts = np.where(has_group, self.count, 0)
        raw = bulk(kind, rng, images, tokens)
        self.bulk_values = [raw[b, : tokens - self.counts[b]] for b in range(images)]
        # An image's median sits in its bulk (the group is a minority above it), so it is known before placing it.
        self.medians = np.array(
            [
                np.median(np.concatenate([values, np.full(count, 1e300)]))
                for values, count in zip(self.bulk_values, self.counts, strict=True)
            ]
        )
        pooled = np.concatenate(
            [values - median for values, median in zip(self.bulk_values, self.medians, strict=True)]
        )
        self.bulk_median = float(np.median(pooled))
        self.spread = float((np.median(pooled) - np.quantile(pooled, 0.25)) / NORMAL_QUARTILE)
        self.bulk_top = float(pooled.max())
        self.offsets = [rng.uniform(0, 0.5, count) for count in self.counts]  # within half a spread of the lowest
        for offsets in self.offsets:
            if offsets.size:
                offsets[0] = 0.0
        self.rng = rng

    def norms(self, gap: float | None = None, group_level: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms, planted mask) with the group's lowest value `gap` spreads above the bulk's highest, or every
        group value at `group_level` (centred log)."""
        rows, masks = [], []
        for values, median, offsets in zip(self.bulk_values, self.medians, self.offsets, strict=True):
            if group_level is None:
                group = self.bulk_top + (gap + offsets) * self.spread
            else:
                group = np.full(offsets.size, group_level)
            row = np.concatenate([values, median + group])
            mask = np.arange(row.size) >= values.size
            order = self.rng.permutation(row.size)  # the group anywhere on the grid
            rows.append(row[order])
            masks.append(mask[order])
        return torch.from_numpy(np.exp(np.stack(rows))), torch.from_numpy(np.stack(masks))

    def group_median(self, gap: float) -> float:
        return float(np.median(np.concatenate([self.bulk_top + (gap + o) * self.spread for o in self.offsets])))


@pytest.mark.parametrize("tokens", GRIDS)
@pytest.mark.parametrize("share", SHARES)
def test_auto_gap_boundary_is_min_gap_bulk_spreads(tokens, share):
    """Just above `min_gap` spreads the group is found exactly (and nothing else); just below, nothing is."""
    for seed in range(SEEDS):
        kind = ("wide_lognormal", "gamma", "wide_gradient")[seed % 3]
        planted = Planted(kind, tokens, share, seed=seed * 1000 + tokens)
        below = MIN_GAP * (1 - EPS)
        # Only the gap may decide: the ratio must hold on both sides.
        assert math.exp(planted.group_median(below) - planted.bulk_median) > MIN_RATIO * 1.05, (kind, seed)
        norms, mask = planted.norms(gap=MIN_GAP * (1 + EPS))
        report = detect_artifacts(norms * 1000.0)
        assert torch.equal(report.mask, mask), (kind, seed, report.gap_spreads)
        assert report.gap_spreads == pytest.approx(MIN_GAP * (1 + EPS), rel=1e-6)
        assert torch.equal(norms * 1000.0 > report.image_thresholds[:, None], mask)  # per-image thresholds
        norms, _ = planted.norms(gap=below)
        report = detect_artifacts(norms)
        assert report.count == 0, (kind, seed, report.gap_spreads)
        assert report.gap_spreads == pytest.approx(below, rel=1e-6)  # the near miss is reported


@pytest.mark.parametrize("tokens", [16, 196, 4624])
@pytest.mark.parametrize("share", ["1 token", 0.25])
def test_auto_ratio_boundary_is_min_ratio(tokens, share):
    """On a narrow bulk the gap is wide; then the group's median decides at `min_ratio` x the bulk's."""
    for seed in range(SEEDS):
        planted = Planted("narrow_normal", tokens, share, seed=seed)
        for factor, expect in ((1 + EPS, True), (1 - EPS, False)):
            level = planted.bulk_median + factor * math.log(MIN_RATIO)
            assert level - planted.bulk_top > MIN_GAP * planted.spread * 1.5, seed  # the gap holds with room
            norms, mask = planted.norms(group_level=level)
            report = detect_artifacts(norms)
            assert torch.equal(report.mask, mask if expect else torch.zeros_like(mask)), (seed, factor)
            assert report.median_ratio == pytest.approx(MIN_RATIO**factor, rel=1e-6)


def test_auto_is_scale_free_per_image():
    planted = Planted("wide_lognormal", 36, 0.1, seed=3)
    norms, mask = planted.norms(gap=6.0)
    factors = torch.from_numpy(np.random.default_rng(1).uniform(0.01, 100, (norms.shape[0], 1)))
    for scaled in (norms, norms * 1e-3, norms * factors):
        assert torch.equal(detect_artifacts(scaled).mask, mask)


def test_auto_finds_the_issue_case_four_of_36_tokens_at_13x():
    """The case the old rule (at most 10% of tokens) missed: 4 of 36 tokens at about 13x the median norm."""
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0, 0.3, (8, 36)))
    mask = np.zeros((8, 36), dtype=bool)
    for image in range(8):
        mask[image, rng.choice(36, 4, replace=False)] = True
    norms[mask] = 13 * np.exp(rng.normal(0, 0.05, 32))
    report = detect_artifacts(torch.from_numpy(norms).reshape(8, 6, 6))
    assert torch.equal(report.mask, torch.from_numpy(mask).reshape(8, 6, 6))
    assert report.outlier_fraction == pytest.approx(4 / 36)


def test_auto_takes_a_group_up_to_max_fraction_and_checks_its_arguments():
    planted = Planted("wide_lognormal", 196, 0.4, seed=0)  # 40% of each image's tokens
    norms, mask = planted.norms(gap=6.0)
    assert torch.equal(detect_artifacts(norms).mask, mask)
    assert detect_artifacts(norms, max_fraction=0.2).count == 0
    for kwargs, message in (
        ({"min_gap": 0}, "min_gap=0"),
        ({"max_fraction": 0.6}, "max_fraction=0.6"),
        ({"min_ratio": 0.5}, "min_ratio=0.5"),
    ):
        with pytest.raises(ValueError, match=message):
            detect_artifacts(norms, **kwargs)
    with pytest.raises(ValueError, match="finite and non-negative"):
        detect_artifacts(torch.tensor([[1.0, float("nan")]]))


def test_threshold_and_top_percent_methods_as_the_study():
    rng = np.random.default_rng(0)
    norms = torch.from_numpy(rng.uniform(10, 200, (4, 196)))
    report = detect_artifacts(norms, method="threshold", threshold=100.0)
    assert torch.equal(report.mask, norms > 100) and report.threshold == 100.0
    assert report.image_thresholds.tolist() == [100.0] * 4
    report = detect_artifacts(norms, method="top_percent", top_percent=5.0)
    assert report.mask.sum(dim=1).tolist() == [math.ceil(196 * 0.05)] * 4  # 10 of 196 in every image
    for row, flagged in zip(norms, report.mask, strict=True):
        assert row[flagged].min() > row[~flagged].max()
    assert torch.equal(report.image_thresholds, norms.masked_fill(~report.mask, math.inf).min(dim=1).values)


# --- removal -----------------------------------------------------------------------------------------------------


def loop_neighbourhood_minimum(patches, grid, replace, connectivity):
    """Oracle: token by token, the minimum over in-grid neighbours that are not flagged (all of them if all are)."""
    rows, cols = grid
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    out = patches.clone()
    for image, index in replace.nonzero().tolist():
        row, col = divmod(index, cols)
        cells = [(row + dr, col + dc) for dr, dc in offsets if 0 <= row + dr < rows and 0 <= col + dc < cols]
        clean = [(r, c) for r, c in cells if not replace[image, r * cols + c]] or cells
        out[image, index] = torch.stack([patches[image, r * cols + c] for r, c in clean]).min(dim=0).values
    return out


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", [(1, 5), (3, 3), (4, 6), (7, 5)])
def test_vectorised_neighbourhood_minimum_equals_the_token_loop(grid, connectivity):
    generator = torch.Generator().manual_seed(grid[0] * 10 + grid[1] + connectivity)
    tokens = grid[0] * grid[1]
    patches = torch.randn(3, tokens, 5, generator=generator)
    for density in (0.1, 0.5, 0.9, 1.0):  # up to every token flagged (then all neighbours are used)
        replace = torch.rand(3, tokens, generator=generator) < density
        expected = loop_neighbourhood_minimum(patches, grid, replace, connectivity)
        assert torch.equal(neighbourhood_minimum(patches, grid, replace, connectivity), expected)


def test_neighbourhood_minimum_rejects_grids_it_cannot_serve():
    with pytest.raises(ValueError, match="grid"):
        neighbourhood_minimum(torch.zeros(1, 6, 2), (2, 2), torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="no neighbours"):
        neighbourhood_minimum(torch.zeros(1, 1, 2), (1, 1), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one layer"):
        ArtifactRemoval(layers=[])


def top_k_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    k = math.ceil(scores.shape[1] * percent / 100)
    order = scores.argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, True)


@torch.no_grad()
def hand_removal(model, images, layers, percent, grid):
    """Oracle: the forward written out, CLS attention of each edited block from its own q and k, the edit after it."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    removed = {}
    for index, block in enumerate(model.blocks):
        if index in layers:
            attention = block.attn
            hidden = block.norm1(x)
            batch, tokens, _ = hidden.shape
            qkv = attention.qkv(hidden).reshape(batch, tokens, 3, attention.num_heads, attention.head_dim)
            q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
            cls_row = ((q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, H, T)
        x = block(x)
        if index in layers:
            patches = x[:, 1:]
            replace = top_k_mask(patches.norm(dim=-1), percent) & top_k_mask(cls_row.mean(dim=1)[:, 1:], percent)
            removed[index] = replace
            x = torch.cat([x[:, :1], neighbourhood_minimum(patches, grid, replace)], dim=1)
    return model.forward_head(model.norm(x)), removed


def test_removal_at_several_layers_equals_a_hand_run_forward():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, num_classes=5).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers, percent = [1, 3], 30.0
    removal = ArtifactRemoval(layers=layers, norm_percent=percent, attention_percent=percent)
    taps = vitreg.run_taps(model, images, layers=[4], token_edit=removal)
    expected_logits, expected_removed = hand_removal(model, images, layers, percent, (4, 4))
    for layer in layers:
        assert removal.removed[layer].any()  # both edits act
        assert torch.equal(removal.removed[layer], expected_removed[layer])
    torch.testing.assert_close(taps.logits, expected_logits)
    first_only = vitreg.run_taps(model, images, layers=[4], token_edit=ArtifactRemoval([1], percent, percent))
    assert not torch.allclose(first_only.logits, taps.logits)  # the second layer's edit changed the outcome


# --- removal from the probes' command line -------------------------------------------------------------------------

FAST = ProbeSettings(batch_size=8, seeds=(0,), max_iter=200)
DATA = DataSpec("generated", train_images=16, test_images=8)


def removal_row(settings: ProbeSettings) -> tuple[dict | None, list[dict]]:
    result = run_task(ProbeTask(parse_model_spec("planted"), "final", ("removal",), DATA, settings))
    return (result.tables["removal"][0] if "removal" in result.tables else None), result.errors


def test_removal_starts_at_the_norms_probes_first_outlier_block():
    result = run_task(ProbeTask(parse_model_spec("planted"), "layers", ("norms",), DATA, FAST))
    norms = result.tables["norms"]
    first = first_outlier_layer([row["layer"] for row in norms], [row["outlier_fraction"] for row in norms])
    row, errors = removal_row(FAST)
    assert not errors and first == 2  # the plant block of the planted model (depth 6)
    assert row["layers"] == "2 3 4" and row["layer_choice"] == "from the first block with outliers (2) on"


def test_removal_layers_and_removal_from_as_asked():
    row, errors = removal_row(dataclasses.replace(FAST, removal_layers=(-2, 3)))  # negative: from the end
    assert not errors and (row["layers"], row["layer"], row["layer_choice"]) == ("3 4", 3, "asked")
    row, errors = removal_row(dataclasses.replace(FAST, removal_from="1"))
    assert not errors and row["layers"] == "1 2 3 4"
    row, errors = removal_row(dataclasses.replace(FAST, removal_layers=(5,)))  # the last block of 6
    assert row is None and "removal_layers=[5]" in errors[0]["error"] and "never edited" in errors[0]["error"]
    with pytest.raises(ValueError, match="removal_from='middle'"):
        ProbeSettings(removal_from="middle")
    with pytest.raises(ValueError, match="each block at most once"):
        ProbeSettings(removal_layers=(3, 3))


def test_removal_options_on_the_command_line(monkeypatch):
    command = ["run_probes.py", "--models", "planted", "--dataset", "generated", "--out", "x"]
    monkeypatch.setattr(sys, "argv", [*command, "--removal-layers", "6", "7", "8"])
    args, _ = run_probes.parse_args()
    assert args.removal_layers == [6, 7, 8] and args.removal_from == "first-outlier"
    monkeypatch.setattr(sys, "argv", [*command, "--removal-from", "4"])
    args, _ = run_probes.parse_args()
    assert args.removal_layers == [] and args.removal_from == "4"
    monkeypatch.setattr(sys, "argv", [*command, "--removal-from", "4", "--removal-layers", "6"])
    with pytest.raises(SystemExit):
        run_probes.parse_args()  # one or the other
