"""Training on Ray Train (CPU, gloo): configs, a 2-worker run tracked in MLflow, a killed worker, a dead server.

The tests' shared local Ray instance, and the generated data set and 2-worker tracked run of tests/conftest.py
(`train_data`, `tracked_run`; tests/test_probe_runs.py probes that run's model).
"""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from oracles import explicit_prefix_attention

import vitreg
from train import storage
from train.checkpoints import MODEL_FILE, STATE_FILE
from train.config import TrainConfig, merge, parse_overrides
from train.driver import CONFIG_FILE, RESULT_FILE, run_training
from train.experiments import TRAINING_PRESETS
from train.figures import draw_attention, draw_norm_histogram
from train.loop import EPOCH_METRICS, FAULT_MARKER_FILE, FINAL_METRICS, MLFLOW_RUN_ID_FILE
from train.measure import artifact_metrics, draw_figures
from train.tracking import RunTracker, flatten
from vitreg.synthetic import planted_artifact_vit, planted_images

# Metrics that depend on the machine's speed, not on what was computed.
TIMING = ("perf/", "time/")


def tiny(train_data: Path, tmp_path: Path, **overrides: object) -> TrainConfig:
    """The tiny preset on the test data, logging to a sqlite MLflow in `tmp_path`."""
    values = {
        "data": {"path": str(train_data)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics_interval_s": 1.0},
    }
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return TrainConfig.from_preset("tiny", values)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# ---------------------------------------------------------------------------------------------------------------
# Config: validation before any worker starts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"model": "vit_no_such_model_patch16"}, ["model='vit_no_such_model_patch16'", "timm"]),
        ({"frozen_blocks": 5}, ["frozen_blocks=5", "0..4"]),  # the tiny ViT has 4 blocks
        ({"penalty_lambda": -0.1}, ["penalty_lambda=-0.1"]),
        ({"lambda_schedule": "linear"}, ["lambda_schedule='linear'", "harmonic"]),
        ({"batch_size": 33}, ["batch_size=33", "num_workers=2"]),
        ({"data": {"path": "/no/such/dir"}}, ["data.path='/no/such/dir'"]),
        ({"img_size": 36}, ["img_size=36", "patch size 8"]),
        ({"fail_at_epoch": 2}, ["fail_at_epoch=2", "0..1"]),
        ({"data": {"batch_size": 4}}, ["data.batch_size=4", "batch_size (global)"]),
        ({"tracking": {"tracking_uri": "file:///tmp/mlruns"}}, ["tracking.tracking_uri", "sqlite"]),
        ({"registers": -1}, ["registers=-1"]),
    ],
)
def test_bad_config_fails_naming_the_field(train_data: Path, overrides: dict, names: list[str]) -> None:
    values = {"data": {"path": str(train_data)}}
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError) as error:
        TrainConfig.from_preset("tiny", values)
    for name in names:
        assert name in str(error.value)


def test_unknown_keys_are_rejected(train_data: Path) -> None:
    with pytest.raises(ValueError, match="unknown TrainConfig field.*learning_rate"):
        TrainConfig.from_preset("tiny", {"data": {"path": str(train_data)}, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown DataConfig field.*pth"):
        TrainConfig.from_preset("tiny", {"data": {"path": str(train_data), "pth": "x"}})
    with pytest.raises(ValueError, match="unknown tracking field.*uri"):
        TrainConfig.from_preset("tiny", {"data": {"path": str(train_data)}, "tracking": {"uri": "x"}})


def test_missing_data_path_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.path='.*missing'"):
        TrainConfig.from_preset("tiny", {"data": {"path": str(tmp_path / "missing")}})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"data.path=.*train.beton and val.beton"):
        TrainConfig.from_preset("tiny", {"data": {"path": str(empty)}})
    with pytest.raises(ValueError, match="data=None: required"):
        TrainConfig.from_preset("tiny", {"data": None})


def test_presets_validate_and_round_trip(train_data: Path) -> None:
    for preset in TRAINING_PRESETS:
        config = TrainConfig.from_preset(preset, {"data": {"path": str(train_data)}})
        assert TrainConfig.from_dict(json.loads(config.to_json())) == config
        assert config.num_classes == 4  # read from the data
        assert config.data.batch_size * config.num_workers == config.batch_size
    finetune = TrainConfig.from_preset("finetune", {"data": {"path": str(train_data)}})
    assert finetune.model == "deit3_small_patch16_224.fb_in22k_ft_in1k" and finetune.pretrained
    assert (finetune.registers, finetune.frozen_blocks, finetune.penalty_lambda, finetune.epochs) == (4, 10, 0.01, 10)
    scratch = TrainConfig.from_preset("scratch", {"data": {"path": str(train_data)}})
    assert (scratch.pretrained, scratch.frozen_blocks, scratch.epochs, scratch.registers) == (False, 0, 150, 0)


def test_overrides_parse_json_and_nest() -> None:
    assert parse_overrides(["lr=1e-4", "data.path=/x", "betas=[0.9, 0.95]", "checkpoint=null", "model=vit"]) == {
        "lr": 1e-4,
        "data": {"path": "/x"},
        "betas": [0.9, 0.95],
        "checkpoint": None,
        "model": "vit",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])


def test_resume_with_another_config_is_refused(train_data: Path, tmp_path: Path) -> None:
    config = tiny(train_data, tmp_path)
    storage.write_text(str(tmp_path / "runs" / "r" / CONFIG_FILE), config.to_json())
    changed = TrainConfig.from_dict({**config.to_dict(), "lr": 0.5})
    with pytest.raises(ValueError, match=r"another config \(lr: 0.001 -> 0.5\)"):
        run_training(changed, name="r", storage_path=tmp_path / "runs")  # fails before Ray is touched


# ---------------------------------------------------------------------------------------------------------------
# MLflow that is down
# ---------------------------------------------------------------------------------------------------------------


def test_tracker_survives_a_dead_server(monkeypatch: pytest.MonkeyPatch, train_data: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = {"tracking_uri": f"http://127.0.0.1:{closed_port()}", "retries": 2, "retry_backoff_s": 0.01}
    config = tiny(train_data, tmp_path, tracking=dead)
    tracker = RunTracker(config.tracking)
    started = time.time()
    assert tracker.start(run_id=None, run_name="down", params=config.to_dict()) is None
    tracker.log_history([{"epoch": 0, "train/loss": 1.0}])
    tracker.set_tags({"x": "y"})
    tracker.finish([{"epoch": 0, "train/loss": 1.0}])
    assert not tracker.online
    assert time.time() - started < 30


def test_flatten_config_for_mlflow_params(train_data: Path, tmp_path: Path) -> None:
    flat = flatten(tiny(train_data, tmp_path).to_dict())
    assert flat["data.path"] == str(train_data)
    assert flat["model_kwargs.depth"] == "4"
    assert flat["betas"] == "[0.9, 0.999]"
    assert flat["fail_at_epoch"] == "null"


# ---------------------------------------------------------------------------------------------------------------
# Artifact metrics and figures (no Ray): known answers on the planted-artifact ViT
# ---------------------------------------------------------------------------------------------------------------


def test_artifact_metrics_find_planted_artifacts(tmp_path: Path) -> None:
    model = planted_artifact_vit(plant_block=2)  # 64 px, 8 x 8 patches, no registers
    planted = [(0, 1), (6, 7), (7, 0)]
    dirty, taps = artifact_metrics(model, planted_images(planted, batch=2))
    clean, _ = artifact_metrics(model, planted_images([], batch=2))
    assert dirty["artifact/outlier_fraction"] == pytest.approx(3 / 64)
    assert dirty["artifact/high_norm_fraction"] == pytest.approx(3 / 64)
    assert clean["artifact/outlier_fraction"] == 0 and clean["artifact/high_norm_fraction"] == 0
    assert dirty["artifact/max_median_ratio"] > 5 * clean["artifact/max_median_ratio"]
    assert dirty["artifact/cls_attention_entropy"] < clean["artifact/cls_attention_entropy"] <= 1
    assert dirty["artifact/cls_attention_to_registers"] == 0  # no registers

    images = planted_images(planted, batch=2)
    display = ((images - images.min()) / (images.max() - images.min()) * 255).to(torch.uint8)
    paths = draw_figures(taps, display, 2, "planted artifacts", tmp_path / "figures")
    assert [p.name for p in paths] == ["attention.png", "norm_histogram.png"]
    for path in paths:
        assert matplotlib.image.imread(path).std() > 0.05


def test_run_figures_plot_the_explicit_attention_and_norms_of_every_token() -> None:
    """What each panel of the end-of-run figures shows, read back from the drawn artists, against a forward pass
    written out from the weights: the image, CLS and register attention over the patches, the patch norms, and
    the norm histogram's bars and threshold (which separates the planted artifacts)."""
    model = vitreg.add_registers(planted_artifact_vit(plant_block=2), 2, init_std=1.0).eval()  # 64 px, 8 x 8
    planted = [(0, 1), (6, 7), (7, 0)]
    images = planted_images(planted, batch=2)
    taps = vitreg.run_taps(model, images, layers=[-1], attention_layers=[-1])
    rows, norms, _ = explicit_prefix_attention(model, images)  # (B, L, 3, T), (B, L, T)
    last, prefix = len(model.blocks) - 1, 3
    display = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)

    figure = draw_attention(taps, display, last, "run")
    grid = np.array(figure.axes[: 5 * 2]).reshape(5, 2)  # rows: image, CLS, register 0, register 1, norms
    for column in range(2):
        panel = lambda row, column=column: np.asarray(grid[row, column].images[0].get_array())
        np.testing.assert_array_equal(panel(0), display[column].permute(1, 2, 0).numpy())
        for row, query in ((1, 0), (2, 1), (3, 2)):  # CLS, then each register, as the query
            expected = rows[column, last, query, prefix:].reshape(8, 8).numpy()
            np.testing.assert_allclose(panel(row), expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(panel(4), norms[column, last, prefix:].reshape(8, 8).numpy(), rtol=1e-4)
        hottest = np.argsort(panel(4).ravel())[-3:]
        assert {divmod(int(index), 8) for index in hottest} == set(planted)
    assert [grid[row, 0].get_title() for row in range(5)] == [
        "image 0", f"CLS attention, block {last}", "register 0 attention", "register 1 attention",
        "patch-token L2 norm",
    ]  # fmt: skip
    matplotlib.pyplot.close(figure)

    figure = draw_norm_histogram(taps, last, "run")
    (axis,) = figure.axes
    patch_norms = norms[:, last, prefix:].numpy().ravel()
    heights = np.array([bar.get_height() for bar in axis.patches])
    edges = np.array([bar.get_x() for bar in axis.patches] + [axis.patches[-1].get_x() + axis.patches[-1].get_width()])
    np.testing.assert_array_equal(heights, np.histogram(patch_norms, bins=edges)[0])
    assert heights.sum() == patch_norms.size == 2 * 64
    threshold = axis.lines[0].get_xdata()[0]
    assert (patch_norms > threshold).sum() == 2 * len(planted)  # the drawn threshold separates the planted tokens
    np.testing.assert_allclose(axis.lines[1].get_xdata()[0], np.median(patch_norms), rtol=1e-5)
    matplotlib.pyplot.close(figure)


# ---------------------------------------------------------------------------------------------------------------
# Ray Train runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_worker_ffcv_run_is_tracked_in_mlflow(tracked_run: dict) -> None:
    config, result, tmp_path = tracked_run["config"], tracked_run["result"], tracked_run["tmp_path"]
    sweep, parent = tracked_run["sweep"], tracked_run["parent"]
    client = MlflowClient(config.tracking.tracking_uri)

    # Result: one metrics dict per epoch, every metric, the last with the run's totals.
    assert [entry["epoch"] for entry in result["history"]] == [0, 1]
    for entry in result["history"]:
        assert set(EPOCH_METRICS) <= set(entry)
    final = result["metrics"]
    assert set(FINAL_METRICS) <= set(final)
    assert final["time/gpu_hours"] == 0.0
    assert final["time/worker_hours"] == pytest.approx(final["time/wall_s"] * 2 / 3600)
    assert final["perf/images_per_s"] == pytest.approx(2 * final["perf/images_per_s_per_worker"])
    assert final["train/loss"] == pytest.approx(final["train/ce"] + 0.1 * final["train/penalty"])
    assert final["train/lambda"] == 0.1
    assert 0 <= final["val/top1"] <= final["val/top5"] <= 100
    assert result["history"][1]["train/ce"] < result["history"][0]["train/ce"]  # it learns
    assert 0 < final["artifact/cls_attention_entropy"] <= 1
    assert 0 < final["artifact/cls_attention_to_registers"] < 1  # 4 registers take part of CLS's attention
    assert result["resumed_from_epoch"] == 0 and not result["already_finished"]

    # Run directory: resolved config, result, checkpoints with everything needed to resume, figures.
    run_dir = tmp_path / "runs" / "tiny-ffcv"
    saved = TrainConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    assert saved.compute_fields() == config.compute_fields()
    assert json.loads((run_dir / RESULT_FILE).read_text())["metrics"] == final
    checkpoint = Path(result["checkpoint_path"])
    assert checkpoint == run_dir / "epoch_0002"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert {"model", "model_ema", "optimizer", "scaler", "epoch", "history", "rng", "config"} <= set(state)
    assert state["epoch"] == 2 and "reg_token" in state["model"]
    assert not any(key.startswith("module.") for key in state["model"])  # saved unwrapped from DDP
    # ... and the trained model as a self-describing file that loads back as itself.
    weights, info = vitreg.read_model_file(checkpoint / MODEL_FILE)
    assert all(torch.equal(weights[key], value) for key, value in state["model"].items())
    assert info.registers == 4 and info.training_run_dir == str(run_dir) and info.extra["epoch"] == 2
    assert info.training_run_id == result["mlflow_run_id"]
    for figure in ("attention.png", "norm_histogram.png"):
        pixels = matplotlib.image.imread(checkpoint / "figures" / figure)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.05

    # MLflow: one child run of the parent, in its experiment, with the whole config as params, every metric at
    # steps 0 and 1, figures and tags.
    runs = client.search_runs([sweep], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [run.info.run_id for run in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-ffcv"
    assert (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip() == run.info.run_id
    assert set(flatten(config.to_dict())) <= set(run.data.params)
    assert run.data.params["penalty_lambda"] == "0.1" and run.data.params["data.backend"] == "ffcv"
    for key in EPOCH_METRICS:
        if key != "epoch":
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    for key in FINAL_METRICS:
        assert run.data.metrics[key] == pytest.approx(final[key])
    # Progress inside the epochs: every 2 of the 4 steps per epoch, at the global step.
    progress = client.get_metric_history(run.info.run_id, "progress/loss")
    assert [m.step for m in progress] == [1, 3, 5, 7] and all(math.isfinite(m.value) for m in progress)
    assert run.data.metrics["val/top1"] == pytest.approx(final["val/top1"])
    assert any(key.startswith("system/") for key in run.data.metrics)  # system metrics (psutil)
    assert run.data.tags["final_checkpoint_path"] == str(checkpoint)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures")) == [
        "figures/attention.png",
        "figures/norm_histogram.png",
    ]

    # Rerunning a finished run returns its result without training or a second MLflow run.
    started = time.time()
    again = run_training(config, name="tiny-ffcv", storage_path=tmp_path / "runs")
    assert again["already_finished"] and again["metrics"] == final
    assert time.time() - started < 5
    assert len(client.search_runs([sweep])) == 2  # the parent and its one child


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_metrics(tracked_run: dict, tmp_path: Path) -> None:
    # FFCV crops and flips are a function of (seed, epoch, sample), so the restarted worker group recomputes the
    # interrupted epoch exactly as the uninterrupted reference run did.
    reference = tracked_run["result"]
    # The reference run's config, with the fault and a store of its own: the same computation by construction.
    store = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    faulty = TrainConfig.from_dict(merge(tracked_run["config"].to_dict(), {"fail_at_epoch": 1, "tracking": store}))
    result = run_training(faulty, name="faulty", storage_path=tmp_path / "runs")
    assert (tmp_path / "runs" / "faulty" / FAULT_MARKER_FILE).read_text().startswith("rank 1 killed")
    assert result["resumed_from_epoch"] == 1  # the new worker group started from the epoch-1 checkpoint
    for got, want in zip(result["history"], reference["history"], strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if not key.startswith(TIMING):
                assert math.isclose(got[key], value, rel_tol=0, abs_tol=1e-6), (got["epoch"], key, got[key], value)

    # One MLflow run, reused by the restarted worker group, with each epoch logged once.
    client = MlflowClient(faulty.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("vitreg-tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'faulty'")
    assert [run.info.run_id for run in runs] == [result["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(result["mlflow_run_id"], "val/top1")
    assert [m.step for m in history] == [0, 1]
    assert [m.value for m in history] == pytest.approx([e["val/top1"] for e in reference["history"]], abs=1e-6)


@pytest.mark.slow
def test_evaluation_only_run_measures_the_model_as_built(ray_local: None, train_data: Path, tmp_path: Path) -> None:
    """epochs=0 (Table 8's "no fine-tuning" row): one evaluation through the same driver and loaders, no training
    step; its accuracy equals a plain forward over the validation set, and the checkpoint holds the model as
    built. The MLflow server is down the whole time (nothing listens on its port): every call is retried, then
    skipped, and the run goes on to its result (one Ray run serves both checks)."""
    from train.data import build_loader, normalize_on_device
    from train.loop import build_network

    dead_server = f"http://127.0.0.1:{closed_port()}"
    config = tiny(
        train_data,
        tmp_path,
        epochs=0,
        num_workers=1,
        data={"backend": "imagefolder", "num_workers": 0},
        tracking={"tracking_uri": dead_server, "retries": 1, "http_max_retries": 0, "http_timeout_s": 2},
    )
    result = run_training(config, name="baseline", storage_path=tmp_path / "runs")
    assert result["mlflow_run_id"] is None  # MLflow down: skipped, and the run still ends with its result
    (entry,) = result["history"]
    assert entry["epoch"] == 0 and not any(key.startswith("train/") for key in entry)
    assert {"val/top1", "val/top5", "artifact/max_median_ratio"} <= set(entry)

    model = build_network(config).eval()
    weights, _ = vitreg.read_model_file(Path(result["checkpoint_path"]) / MODEL_FILE)
    assert all(torch.equal(weights[key], value) for key, value in model.state_dict().items())
    hits = total = 0
    with torch.no_grad():
        for images, labels in build_loader(config.data, "val", rank=0, world_size=1, device=torch.device("cpu")):
            hits += (model(normalize_on_device(images)).argmax(dim=1) == labels).sum().item()
            total += labels.numel()
    assert entry["val/top1"] == pytest.approx(100 * hits / total)
