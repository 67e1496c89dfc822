"""The feature bank: its tables equal a direct pass's, one backbone pass per image however the probes change, and
a bank is reused only when it fits the run (other pass settings, partial or stale banks are rebuilt)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch

import analysis.bank
import analysis.model_passes
from analysis import probes
from analysis.bank import Bank, BankError, write_manifest
from analysis.data import DataSpec, open_splits
from analysis.extract import sample_tokens
from analysis.segmentation import HeadSettings
from analysis.specs import load_model, parse_model_spec
from analysis.tasks import GROUPS, PROBES, ProbeSettings, ProbeTask, build_bank, plan_bank, run_task
from vitreg import run_taps

FAST = ProbeSettings(
    batch_size=8,
    seeds=(0, 1),
    max_iter=200,
    seg_head=HeadSettings(epochs=1),
    seg_block=HeadSettings(epochs=1),
    seg_registers=(1,),
)
DATA = DataSpec("generated", train_images=16, test_images=8)
IMAGES = 16 + 8


@torch.no_grad()
def direct_pass(spec_text: str, data: DataSpec, settings: ProbeSettings) -> dict[str, np.ndarray]:
    """The oracle: run_taps over every image as the probes did before the bank, nothing read from disk."""
    spec = parse_model_spec(spec_text)
    train, test, protocol = open_splits(data, spec.name)
    model, mean, std = load_model(spec, settings.img_size or protocol.img_size)
    size, last, prefix = model.patch_embed.img_size[0], len(model.blocks) - 1, model.num_prefix_tokens
    kept: dict[str, list] = {name: [] for name in ("norms", "labels", "is_train", "cls", "mean_patch", "samples")}
    for is_train, split in ((True, train), (False, test)):
        for start in range(0, len(split.indices), settings.batch_size):
            indices = split.indices[start : start + settings.batch_size]
            batch = split.source.load(indices, size, mean, std)
            ids = np.asarray(indices) + (0 if is_train else 10**9)
            taps = run_taps(model, batch.images, layers=None, attention_layers=(), keep_block_outputs=(last,))
            output = taps.block_outputs[last]
            kept["norms"].append(taps.patch_norms.numpy())
            kept["labels"].append(batch.labels.numpy())
            kept["is_train"].append(np.full(len(ids), is_train))
            normalised = model.norm(output)
            kept["cls"].append(normalised[:, 0].numpy())
            kept["mean_patch"].append(normalised[:, prefix:].mean(dim=1).numpy())
            sample = sample_tokens(
                output[:, prefix:], taps.patch_norms[last], ids, settings.top_tokens, settings.random_tokens, 0
            )
            kept["samples"].append(sample)
    arrays = {name: np.concatenate(kept[name], axis=int(name == "norms")) for name in kept if name != "samples"}
    arrays["sample"] = probes.TokenSample.concatenate(kept["samples"])
    return arrays


def same(a: object, b: object) -> bool:
    """Equal, nan equal to nan (a detection that found no gap reports a nan threshold)."""
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def assert_rows_equal(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for row, wanted in zip(got, expected, strict=True):
        assert set(row) == set(wanted) and all(same(row[key], wanted[key]) for key in wanted), (row, wanted)


@pytest.mark.parametrize("spec_text", ["planted", "planted:registers=1"])
def test_bank_tables_equal_a_direct_pass(spec_text):
    direct = direct_pass(spec_text, DATA, FAST)
    spec = parse_model_spec(spec_text)
    test = ~direct["is_train"]
    layers = list(range(direct["norms"].shape[0]))

    layered = run_task(ProbeTask(spec, "layers", ("norms",), DATA, FAST))
    expected = probes.norm_distribution(direct["norms"][:, test], layers, FAST.artifact_method)
    got = [{key: row[key] for key in expected[0]} for row in layered.tables["norms"]]
    assert_rows_equal(got, expected)
    assert any(row["outlier_fraction"] > 0 for row in got)

    final = run_task(ProbeTask(spec, "final", ("global", "representation"), DATA, FAST))
    assert not final.errors
    mask = FAST.detect(direct["norms"][-1])  # the last layer, all images (as the global probe sees them)
    rows, _ = probes.global_information(
        direct["sample"], mask, direct["labels"], int(test.sum()), FAST.seeds, FAST.max_iter
    )
    assert_rows_equal(final.tables["global"], rows)
    features = {"cls": direct["cls"], "mean_patch": direct["mean_patch"]}
    rows, _ = probes.representation_quality(features, direct["labels"], int(test.sum()), FAST.seeds, FAST.max_iter)
    assert_rows_equal(final.tables["representation"], rows)
    assert {row["accuracy_mean"] for row in rows} - {math.nan}  # accuracies were measured, not all missing


def count_passes(monkeypatch) -> Counter:
    """Images forwarded, by kind: the bank's pass, removal's edited pass, the progression figure's pass."""
    counts: Counter = Counter()

    def counting(kind, function):
        def wrapped(model, images, *args, **kwargs):
            counts[kind] += images.shape[0]
            return function(model, images, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(analysis.bank, "run_taps", counting("bank", analysis.bank.run_taps))
    monkeypatch.setattr(analysis.model_passes, "run_taps", counting("removal", analysis.model_passes.run_taps))
    figure_pass = counting("figure", analysis.model_passes.query_attention)
    monkeypatch.setattr(analysis.model_passes, "query_attention", figure_pass)
    return counts


def run_all(bank_dir, settings: ProbeSettings) -> list:
    spec = parse_model_spec("planted")
    results = [run_task(ProbeTask(spec, group, PROBES, DATA, settings), bank_dir) for group in GROUPS]
    assert not [error for result in results for error in result.errors]
    return results


def test_one_backbone_pass_per_image_and_other_probe_settings_reuse_the_bank(tmp_path, monkeypatch):
    counts = count_passes(monkeypatch)
    results = run_all(tmp_path, FAST)
    assert counts == {"bank": IMAGES, "removal": IMAGES, "figure": FAST.figure_images}  # every image once
    assert sum(result.passes.get("bank", 0) for result in results) == IMAGES

    other = dataclasses.replace(
        FAST,
        seeds=(7,),
        max_iter=50,
        artifact_method="top_percent",
        top_percent=10.0,
        norm_threshold=3.0,
        removal_percent=10.0,
        removal_from="1",
        figure_images=1,
        seg_registers=(),
    )
    rerun = run_all(tmp_path, other)
    assert counts["bank"] == IMAGES  # nothing forwarded again for the bank
    assert counts["removal"] == 2 * IMAGES and counts["figure"] == FAST.figure_images + 1  # their own passes
    assert rerun[1].tables["removal"][0]["layers"] == "1 2 3 4"  # the new settings did apply
    # (a pass setting such as batch_size rebuilds it: test_a_bank_is_rebuilt_when_it_does_not_fit_and_never_read_stale)


def test_shards_hold_the_same_numbers_as_one_pass(tmp_path):
    spec = parse_model_spec("planted:registers=1")
    banks = {}
    small_batches = dataclasses.replace(FAST, batch_size=2)  # 4 test batches, 8 training batches
    for shards in (1, 3):
        directory = tmp_path / f"shards{shards}"
        plan = plan_bank(spec, DATA, small_batches, PROBES, directory, "float32", shards)
        assert plan.shards == shards
        build_bank(plan, DATA, small_batches)
        banks[shards] = Bank(directory)
    one, three = banks[1], banks[3]
    assert len(three.manifest["shards"]) == 3 and three.manifest["backbone_passes"] == {"train": 16, "test": 8}
    for name in ("ids", "labels", "patch_norms.0", "patch_norms.5", "attention", "registers", "cosines", "cls"):
        assert np.array_equal(one.load(name), three.load(name)), name
    for name in ("sample.3.top_features", "sample.3.random_index", "seg.patches", "seg.masks"):
        assert np.array_equal(one.load(name), three.load(name)), name
    assert one.load("ids", ("test",)).min() >= 10**9 and one.is_train().sum() == 16


def test_a_bank_is_rebuilt_when_it_does_not_fit_and_never_read_stale(tmp_path):
    spec = parse_model_spec("planted")

    def plan(settings=FAST, names=("norms",), precision="float32", **options):
        return plan_bank(spec, DATA, settings, names, tmp_path, precision, **options)

    assert plan().build == "no bank yet"
    build_bank(plan(), DATA, FAST)
    assert plan().build is None  # reused
    assert plan(dataclasses.replace(FAST, seeds=(5,), top_percent=1.0)).build is None  # probe settings only
    assert plan(dataclasses.replace(FAST, batch_size=4)).build == "pass settings changed: batch_size"
    assert plan(dataclasses.replace(FAST, img_size=32)).build == "pass settings changed: img_size"
    assert plan(precision="bfloat16-autocast").build == "pass settings changed: precision"  # a GPU's bank
    other_images = DataSpec("generated", train_images=16, test_images=8, seed=3)
    assert plan_bank(spec, other_images, FAST, ("norms",), tmp_path, "float32").build == "pass settings changed: images"
    assert plan(rebuild=True).build == "asked to rebuild"

    wider = plan(names=("norms", "global"))
    assert wider.build == "the bank lacks train, samples" and wider.contents.train and wider.contents.samples

    shard = tmp_path / "shard-0000.npz"
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated shard
    assert plan().build == "shard shard-0000.npz missing or changed"
    (tmp_path / "manifest.json").unlink()  # a build that did not finish
    assert plan().build == "a partial bank (no manifest: its build did not finish)"
    with pytest.raises(BankError, match="no manifest"):
        Bank(tmp_path)

    build_bank(plan(), DATA, FAST)  # a shard of another pass under this manifest is refused, not read
    other = tmp_path / "other"
    stale = plan_bank(spec, DATA, dataclasses.replace(FAST, batch_size=4), ("norms",), other, "float32")
    build_bank(stale, DATA, dataclasses.replace(FAST, batch_size=4))
    shard.write_bytes((other / "shard-0000.npz").read_bytes())
    report = {"shard": 0, "file": shard.name, "bytes": shard.stat().st_size, "images": {"test": 8}, "info": {}}
    report |= {"grid": [8, 8], "prefix": 1, "mean": [0] * 3, "std": [1] * 3, "precision": "float32"}
    write_manifest(tmp_path, plan().key, plan().contents, [report])
    with pytest.raises(BankError, match="another pass"):
        Bank(tmp_path).load("ids", ("test",))


def loop_neighbour_cosine(embedding: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Oracle: token by token, the mean cosine to the in-grid edge neighbours."""
    rows, cols = grid
    out = np.zeros(embedding.shape[:2])
    for image in range(embedding.shape[0]):
        for index in range(rows * cols):
            row, col = divmod(index, cols)
            here = embedding[image, index]
            cells = [(row + dr, col + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))]
            neighbours = [embedding[image, r * cols + c] for r, c in cells if 0 <= r < rows and 0 <= c < cols]
            cosines = [here @ there / (np.linalg.norm(here) * np.linalg.norm(there)) for there in neighbours]
            out[image, index] = np.mean(cosines) if cosines else 0.0
    return out


@pytest.mark.parametrize("grid", [(1, 5), (2, 2), (3, 4), (5, 3)])
def test_neighbour_cosine_equals_the_token_loop(grid):
    embedding = np.random.default_rng(grid[0] * 7 + grid[1]).normal(size=(3, grid[0] * grid[1], 6))
    np.testing.assert_allclose(
        probes.neighbour_cosine(embedding, grid), loop_neighbour_cosine(embedding, grid), atol=1e-12
    )


@pytest.mark.slow
def test_runner_builds_the_bank_once_and_reruns_with_other_probe_settings_reuse_it(tmp_path, monkeypatch, ray_local):
    import mlflow

    from analysis.runner import AnalysisConfig, run_analysis

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = dataclasses.replace(FAST, batch_size=4)  # two test batches: two bank shards on two workers
    first_config = AnalysisConfig(
        models=(parse_model_spec("planted"),),
        probes=("norms", "global"),
        data=DATA,
        out_dir=str(tmp_path / "first"),
        settings=settings,
    )
    rerun_settings = dataclasses.replace(settings, seeds=(3,), artifact_method="top_percent", max_iter=100)
    second_config = dataclasses.replace(
        first_config, out_dir=str(tmp_path / "second"), settings=rerun_settings, bank_dir=str(tmp_path / "first/bank")
    )
    first = run_analysis(first_config)
    second = run_analysis(second_config)
    (built,), (reused,) = first.banks, second.banks
    assert built["status"] == "built" and built["backbone_passes"] == IMAGES and built["images"] == IMAGES
    assert len(Bank(tmp_path / "first/bank/planted").manifest["shards"]) == 2
    assert reused["status"] == "reused" and "backbone_passes" not in reused and reused["images"] == IMAGES
    assert not first.report.errors and not second.report.errors
    medians = [[row["median"] for row in outcome.report.rows("norms")] for outcome in (first, second)]
    assert medians[0] == medians[1] and len(medians[0]) == 6
    assert [row["seeds"] for row in second.report.rows("global")] == [1, 1]  # the rerun's own probe settings
    assert "reused" in (tmp_path / "second/bank.csv").read_text()
    logged = {item.path for item in mlflow.MlflowClient(tracking_uri=uri).list_artifacts(first.run_id)}
    assert "bank.csv" in logged and "bank" not in logged  # the bank stays on disk, out of MLflow


def test_reads_the_bank_cannot_serve_are_errors_naming_what_is_missing(tmp_path):
    import json

    from analysis.model_passes import open_context, run_removal
    from analysis.probe_settings import TaskResult

    spec = parse_model_spec("planted")
    build_bank(plan_bank(spec, DATA, FAST, ("norms",), tmp_path, "float32"), DATA, FAST)
    bank = Bank(tmp_path)
    with pytest.raises(BankError, match=r"holds no \['train'\] images"):
        bank.load("ids")
    with pytest.raises(BankError, match="has no 'seg.patches'"):
        bank.load("seg.patches", ("test",))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["key"]["precision"] = "bfloat16-autocast"  # as if a GPU had built it
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = TaskResult("planted", "removal", 0)
    with pytest.raises(BankError, match="removal here would run in float32"):
        run_removal(open_context(spec, DATA, FAST), Bank(tmp_path), ("removal",), result)


def test_global_probe_with_no_random_candidates_reports_nan_instead_of_failing():
    """A 2 x 2 grid with 4 top candidates leaves no random ones: the normal group has no token to fit on."""
    assert probes.pick_per_image(np.zeros((3, 0), dtype=bool), np.random.default_rng(0)).tolist() == [-1, -1, -1]
    rng = np.random.default_rng(1)
    sample = probes.TokenSample(
        top_index=np.tile(np.arange(4), (12, 1)),
        top_features=rng.normal(size=(12, 4, 3)),
        random_index=np.zeros((12, 0), dtype=np.int64),
        random_features=np.zeros((12, 0, 3)),
    )
    mask = np.zeros((12, 4), dtype=bool)
    mask[:, 0] = True
    rows, _ = probes.global_information(sample, mask, np.arange(12) % 2, 4, seeds=(0,))
    normal = next(row for row in rows if row["tokens"] == "normal")
    assert math.isnan(normal["accuracy_mean"]) and normal["images"] == 0
