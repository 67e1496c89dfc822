"""Faults during training: a NaN or infinite loss, a disk that fills while a checkpoint is written, the data folder
vanishing mid-run. Each stops with an error that names what went wrong, and nothing already saved is lost."""

from __future__ import annotations

import errno
import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import vitreg
from train import checkpoints
from train.checkpoints import MODEL_FILE, STATE_FILE, CheckpointWriteError, RunState, save_checkpoint
from train.config import TrainConfig
from train.data import build_loader, generate_dataset
from train.epoch import NonFiniteLossError, train_epoch
from train.loop import FAILURE_TAG, build_network
from train.optim import LearningRate, make_ema, make_optimizer

CPU = torch.device("cpu")
Tiny = Callable[..., TrainConfig]  # the `tiny` fixture (tests/conftest.py): the tiny preset on generated images


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.randint(0, 3, (4,)))
        for _ in range(count)
    ]


class Training:
    """The pieces `train_epoch` needs, built in-process as a worker builds them."""

    def __init__(self, config: TrainConfig, steps: int) -> None:
        self.config = config
        self.model = build_network(config)
        self.capture = vitreg.BlockOutputCapture(self.model, config.penalty_block)
        self.optimizer = make_optimizer(self.model, config, CPU)
        self.schedule = LearningRate(self.optimizer, config, steps)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.ema = make_ema(self.model, config)

    def epoch(self, loader: list, epoch: int) -> dict[str, float]:
        return train_epoch(
            self.model, self.model, self.capture, loader, self.optimizer, self.schedule, self.scaler, self.ema,
            self.config, epoch, lambda e, s: None,
        )  # fmt: skip

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Weights, EMA weights and optimiser moments, cloned."""
        state = {f"model.{k}": v.clone() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            state |= {f"ema.{k}": v.clone() for k, v in self.ema.module.state_dict().items()}
        for index, moments in self.optimizer.state_dict()["state"].items():
            state |= {f"optimizer.{index}.{k}": torch.as_tensor(v).clone() for k, v in moments.items()}
        return state


def assert_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"


# ---------------------------------------------------------------------------------------------------------------
# A NaN or infinite loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("term", "bad"), [("ce", float("nan")), ("penalty", float("inf"))])
def test_a_non_finite_loss_stops_before_the_optimiser_step(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch, term: str, bad: float
) -> None:
    """Step 2 of epoch 1 gets a NaN cross-entropy (or an infinite penalty): the error names the epoch, the step
    and the term, and the weights, EMA and optimiser moments are bit-identical to those before that step."""
    config = tiny(penalty_lambda=0.5, lr=3e-3, warmup_epochs=0.0, ema_decay=0.9)
    training = Training(config, steps=4)
    training.epoch(batches(4), 0)  # a good epoch: the optimiser has moments to keep
    before: dict[str, torch.Tensor] = {}
    calls = 0
    original = vitreg.l2_norm_penalty if term == "penalty" else torch.nn.CrossEntropyLoss.forward

    def poisoned(*args: object) -> torch.Tensor:
        nonlocal calls
        value = original(*args)
        calls += 1
        if calls < 3:
            return value
        before.update(training.snapshot())  # the state step 2 starts from (after step 1's update)
        return value * bad  # keeps the graph: a backward pass would run if the loop did not stop

    if term == "penalty":
        monkeypatch.setattr(vitreg, "l2_norm_penalty", poisoned)
    else:
        monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=rf"epoch 1, step 2: the training loss is not finite \({term} is"):
        training.epoch(batches(4), 1)
    assert before, "the poisoned step never ran"
    assert_identical(before, training.snapshot())
    assert all(torch.isfinite(p).all() for p in training.model.parameters())


def test_a_nan_penalty_under_lambda_zero_does_not_stop_training(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """With lambda = 0 the penalty is only measured, not part of the loss: its NaN is reported, not fatal."""
    original = vitreg.l2_norm_penalty
    monkeypatch.setattr(vitreg, "l2_norm_penalty", lambda *args: original(*args) * float("nan"))
    training = Training(tiny(penalty_lambda=0.0, warmup_epochs=0.0), steps=2)
    metrics = training.epoch(batches(2), 0)
    assert metrics["train/ce"] == metrics["train/ce"] and metrics["train/penalty"] != metrics["train/penalty"]


def test_a_learning_rate_that_diverges_stops_with_the_clear_error(tiny: Tiny) -> None:
    """No monkeypatching: an absurd learning rate overflows the logits within a few steps."""
    training = Training(tiny(lr=1e30, warmup_epochs=0.0, penalty_lambda=0.0), steps=8)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step [1-7]: .*\(ce is not finite"):
        training.epoch(batches(8), 0)


@pytest.mark.slow
def test_a_diverging_trial_ends_keeping_its_last_good_checkpoint_and_the_sweep_goes_on(
    ray_local: None, tmp_path: Path
) -> None:
    """A real two-cell sweep (Ray Tune over Ray Train, one trial at a time): in one cell (two gloo workers) epoch 0
    runs at a small warm-up lr and epoch 1 at an absurd one, so its loss turns NaN within epoch 1. That trial ends
    ERROR with NonFiniteLossError; epoch 0's checkpoint is its last, with finite weights; its MLflow run is FAILED
    with the reason; the other trial still runs and finishes; the report lists the failed trial with its reason and
    the parent run is FAILED (rerunning the command retries it). Tune's own retry of the trial does not train it
    again."""
    from mlflow.tracking import MlflowClient

    from sweeps.grid import make_settings, run_sweep
    from train.driver import RESULT_FILE
    from train.experiments.sweep import Experiment
    from train.experiments.tiny import BASE

    root = generate_dataset(tmp_path / "data", num_classes=3, train_per_class=16, val_per_class=2, image_size=32)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {
        **BASE,
        "data": {"backend": "imagefolder", "num_workers": 0},
        "batch_size": 8,  # 6 steps per epoch on each of the 2 workers
        "lr_schedule_unit": "epoch",
        "warmup_epochs": 1.0,
        "warmup_lr": 1e-4,
        "max_failures": 3,
    }
    # The healthy trial needs no second epoch, nor a second worker (a worker process costs seconds of imports).
    cells = ({"lr": 1e30}, {"lr": 1e-3, "epochs": 1, "num_workers": 1})
    experiment = Experiment(name="diverge", base=base, cells=cells, local=True)
    settings = make_settings(
        experiment, prefix="faults", storage_path=str(tmp_path / "results"), data=str(root),
        tracking_uri=tracking_uri, max_concurrent=1,
    )  # fmt: skip
    outcome = run_sweep(settings)

    by_lr = {trial["config"]["cell"]: trial for trial in outcome.trials}
    assert len(outcome.trials) == 2, outcome.trials
    diverged, healthy = (next(t for t in outcome.trials if experiment.trial_values(t["config"])["lr"] == lr)
                         for lr in (1e30, 1e-3))  # fmt: skip
    assert healthy["status"] == "TERMINATED" and healthy["metrics"]["val/top1"] >= 0, by_lr
    assert diverged["status"] == "ERROR"
    assert re.search(r"NonFiniteLossError: .*epoch 1, step [1-5]: .*\((ce|ce and penalty) (is|are) not finite",
                     diverged["error"]), diverged["error"][-2000:]  # fmt: skip
    assert f"  {diverged['trial']}: " in outcome.table_text and "failed trials" in outcome.table_text
    # Tune's retry did not train again (it would diverge the same way): it ended at once on this sweep's marker.
    assert "(not retried in this sweep; rerun the command to retry)" in diverged["error"]

    run_dir = Path(settings.train_storage) / f"train-{diverged['trial']}"
    # A checkpoint is named after the next epoch to run: epoch_0001 holds epoch 0's weights.
    assert f"Last good checkpoint: {run_dir / 'epoch_0001'}" in diverged["error"]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0001"]
    assert not (run_dir / RESULT_FILE).exists()  # the run did not finish
    state = torch.load(run_dir / "epoch_0001" / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())

    client = MlflowClient(tracking_uri)
    children = {run.info.run_name: run for run in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`mlflow.parentRunId` != ''")}  # fmt: skip
    assert set(children) == {f"train-{diverged['trial']}", f"train-{healthy['trial']}"}
    failed = children[f"train-{diverged['trial']}"]
    assert failed.info.status == "FAILED" and children[f"train-{healthy['trial']}"].info.status == "FINISHED"
    assert failed.data.tags[FAILURE_TAG].startswith("NonFiniteLossError: epoch 1, step")
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "val/top1")] == [0]  # epoch 0 only
    assert client.get_run(outcome.parent_run_id).info.status == "FAILED"


# ---------------------------------------------------------------------------------------------------------------
# The disk filling while a checkpoint is written
# ---------------------------------------------------------------------------------------------------------------


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("failing", [STATE_FILE, MODEL_FILE])
def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous_one(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    config = tiny()
    training = Training(config, steps=2)
    state = (training.model, training.optimizer, training.scaler, training.ema)
    previous, current = tmp_path / "epoch_0000", tmp_path / "epoch_0001"
    previous.mkdir()
    current.mkdir()
    save_checkpoint(previous, *state, RunState(epoch=1), config, run_dir="r", run_id="x")
    kept = digests(previous)
    assert set(kept) == {STATE_FILE, MODEL_FILE, "config.json"}

    def half_then_full(path: Path) -> None:
        Path(path).write_bytes(b"\x00" * 1000)  # part of the file reached the disk before it filled
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == STATE_FILE:
        monkeypatch.setattr(checkpoints.torch, "save", lambda obj, path: half_then_full(path))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata: half_then_full(path))
    with pytest.raises(CheckpointWriteError, match=rf"{current / failing}.*no space left on device") as caught:
        save_checkpoint(current, *state, RunState(epoch=2), config, run_dir="r", run_id="x")
    assert caught.value.errno == errno.ENOSPC
    assert digests(previous) == kept  # the last good checkpoint, byte for byte
    left = {p.name for p in current.iterdir()}
    assert failing not in left and not any(name.endswith(".partial") for name in left)  # nothing half-written
    loaded = torch.load(previous / STATE_FILE, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------------
# The data path vanishing mid-run
# ---------------------------------------------------------------------------------------------------------------


def test_the_data_folder_vanishing_mid_run_names_the_path(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2, image_size=32)
    # Its own data folder (it is deleted below), not the shared one of the `tiny` fixture.
    values = {"data": {"path": str(root), "backend": "imagefolder"}, "num_workers": 1, "batch_size": 4}
    config = TrainConfig.from_preset("tiny", values)
    loader = build_loader(config.data, "train", rank=0, world_size=1)
    assert len(list(loader)) == len(loader) > 0  # epoch 0 reads the files
    shutil.rmtree(root)
    loader.set_epoch(1)
    # The loader's workers re-raise the image reader's error in this process: the file, under the data path,
    # and why (an OSError, not a hang or a silently shorter epoch).
    with pytest.raises(OSError, match=rf"{re.escape(str(root))}/train/c\d+_\w+/.*No such file or directory"):
        next(iter(loader))


# ---------------------------------------------------------------------------------------------------------------
# A failed trial in a sweep
# ---------------------------------------------------------------------------------------------------------------


def test_the_sweep_report_lists_failed_trials_with_their_reason() -> None:
    from sweeps.grid import failed_trials_text

    reason = "train.loop.NonFiniteLossError: run t1 stopped: NonFiniteLossError: epoch 1, step 2: the training loss"
    trials = [
        {"trial": "t0", "status": "TERMINATED", "error": None},
        {"trial": "t1", "status": "ERROR", "error": f"Traceback (most recent call last):\n  File x\n{reason}\n"},
    ]
    assert failed_trials_text(trials) == f"\n\nfailed trials (rerun the command to retry them):\n  t1: {reason}"
    assert failed_trials_text(trials[:1]) == ""
