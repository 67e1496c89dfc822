"""The Ray Train worker loop: every rank runs `train_worker`; rank 0 also measures artifacts and talks to MLflow.

One epoch (`train.epoch`): train on this rank's shard (DDP averages gradients), evaluate on this rank's validation
shard (totals summed over ranks), measure artifacts on fixed validation images (rank 0, `vitreg.run_taps`), then
report the metrics with a checkpoint through `ray.train.report`. The loss is cross-entropy + lambda(epoch) x the
mean L2 norm of the patch tokens of one block's pre-norm output, captured by a forward hook during the normal
(fused-attention) forward, so no attention map is built in training.

Reproducibility: the model is initialised from `seed`; every epoch reseeds torch/numpy/random from (seed, epoch,
rank) and the data order and crops come from (seed, epoch, sample); model, optimiser, grad scaler and EMA states
are checkpointed and the learning rate is set from the absolute epoch/step. So a run restored from its epoch-k
checkpoint computes epochs k.. exactly as an uninterrupted run.

`epochs=0` evaluates the model as built (the "no fine-tuning" row of the study's Table 8) through the same path:
one round of evaluation, artifact metrics, figures and a checkpoint, without a training step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import timm
import torch
from ray.train import CheckpointConsistencyMode
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch import nn

import vitreg
from train import storage
from train.checkpoints import RunState, load_checkpoint, restore, save_checkpoint
from train.config import TrainConfig
from train.data import build_loader, normalize_on_device
from train.epoch import NonFiniteLossError, evaluate, train_epoch
from train.measure import artifact_metrics, draw_figures, probe_images
from train.optim import LearningRate, make_ema, make_optimizer
from train.tracking import RunTracker

logger = logging.getLogger(__name__)

MLFLOW_RUN_ID_FILE = "mlflow_run_id"
RESULT_FILE = "result.json"  # a finished run's result; its presence is what "finished" means
FAULT_MARKER_FILE = "fault_injected"
# Reported every epoch (artifact/* only by rank 0, whose metrics are the run's).
EPOCH_METRICS = (
    "epoch",
    "train/loss",
    "train/ce",
    "train/penalty",
    "train/lambda",
    "train/lr",
    "perf/images_per_s",
    "perf/images_per_s_per_worker",
    "val/loss",
    "val/top1",
    "val/top5",
    "artifact/outlier_fraction",
    "artifact/high_norm_fraction",
    "artifact/max_median_ratio",
    "artifact/cls_attention_entropy",
    "artifact/cls_attention_to_registers",
    "time/epoch_s",
    "time/elapsed_s",
)
FINAL_METRICS = ("time/wall_s", "time/gpu_hours", "time/worker_hours")
FAILURE_TAG = "vitreg.failure"  # the MLflow tag that says why a run is FAILED


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed torch, numpy and random from (seed, epoch, rank): an epoch's randomness never depends on the past."""
    state = np.random.SeedSequence([seed, epoch + 1, rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def build_network(config: TrainConfig) -> VisionTransformer:
    """The model of `config`, on CPU, initialised from `config.seed` (identical on every rank).

    From a checkpoint file, the model is first rebuilt exactly as the file holds it (its registers, head and
    architecture); then this run adds registers to a model without any and replaces a head of another size.
    Registers the file has and the config contradicts are an error, never silently replaced; so is a file's
    register entry block that `register_entry` and `frozen_blocks` contradict.
    """
    torch.manual_seed(config.seed)
    if config.checkpoint is not None:
        model = vitreg.build_model(
            config.model,
            checkpoint=config.checkpoint,
            img_size=config.img_size,
            drop_path_rate=config.drop_path_rate,
            **config.model_kwargs,
        )
        held = vitreg.count_registers(model)
        if config.registers is not None and held and config.registers != held:
            raise vitreg.ModelBuildError(
                f"checkpoint {config.checkpoint} holds {held} trained registers; the config asks for "
                f"registers={config.registers} (use {held}, or None to keep them)"
            )
        if config.registers and not held:
            vitreg.add_registers(model, config.registers, init_std=config.register_init_std)
        if config.num_classes is not None and model.num_classes != config.num_classes:
            model.reset_classifier(config.num_classes)  # a fresh head for this data's classes
        held_entry = vitreg.register_entry_block(model)
        wanted_entry = config.frozen_blocks if config.register_entry == "after_frozen" else None
        if held_entry is not None and held_entry != wanted_entry:
            raise vitreg.ModelBuildError(
                f"checkpoint {config.checkpoint} holds registers entering at block {held_entry}; the config asks "
                f"for register_entry={config.register_entry!r} with frozen_blocks={config.frozen_blocks}"
            )
        vitreg.set_register_entry_block(model, wanted_entry)
        return vitreg.freeze_blocks(model, config.frozen_blocks)
    return vitreg.build_model(
        config.model,
        pretrained=config.pretrained,
        checkpoint=config.checkpoint,
        img_size=config.img_size,
        registers=config.registers,
        register_init_std=config.register_init_std,
        frozen_blocks=config.frozen_blocks,
        register_entry=config.register_entry,
        num_classes=config.num_classes,
        drop_path_rate=config.drop_path_rate,
        **config.model_kwargs,
    )


def maybe_fail(config: TrainConfig, epoch: int, step: int, rank: int, world_size: int, run_dir: str) -> None:
    """Test hook: kill the last rank's process after the first step of `fail_at_epoch`, once per run."""
    if config.fail_at_epoch != epoch or step != 1 or rank != world_size - 1:
        return
    marker = storage.join(run_dir, FAULT_MARKER_FILE)
    if storage.read_text(marker) is not None:  # already fired before the restore
        return
    storage.write_text(marker, f"rank {rank} killed after step 1 of epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def open_tracker(config: TrainConfig, payload: dict[str, Any], model: nn.Module, world_size: int) -> RunTracker:
    """Rank 0's MLflow run: the one recorded in the run directory, else a new one (whose id is recorded)."""
    tracker = RunTracker(config.tracking)
    id_file = storage.join(payload["run_dir"], MLFLOW_RUN_ID_FILE)
    known = storage.read_text(id_file)
    params = {
        **config.to_dict(),
        "run": {"name": payload["name"], "dir": payload["run_dir"], "world_size": world_size},
        "model_info": {"trainable_parameters": vitreg.trainable_parameters(model), "depth": len(model.blocks)},
    }
    run_id = tracker.start(
        run_id=known.strip() if known else None,
        run_name=payload["name"],
        params=params,
        tags={"vitreg.storage": payload["run_dir"]},
        parent_run_id=payload.get("mlflow_parent_run_id"),
    )
    if run_id and not known:
        storage.write_text(id_file, run_id + "\n")
    return tracker


def run_totals(elapsed_s: float, world_size: int, use_gpu: bool) -> dict[str, float]:
    """Wall time of the run (summed over restarts, from the checkpoints) and the device hours it took."""
    return {
        "time/wall_s": elapsed_s,
        "time/gpu_hours": elapsed_s * world_size / 3600 if use_gpu else 0.0,
        "time/worker_hours": elapsed_s * world_size / 3600,
    }


def report_epoch(
    run: RunState,
    metrics: dict[str, float],
    state: tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, ModelEmaV3 | None],
    config: TrainConfig,
    rank: int,
    run_dir: str,
    figures: Any = None,
    tracker: RunTracker | None = None,
) -> str:
    """`ray.train.report` the epoch's metrics with a checkpoint written by rank 0; returns its directory name.

    `figures(directory) -> paths`, on rank 0 after the last epoch, draws into the checkpoint (and MLflow).
    """
    name = f"epoch_{run.epoch:04d}"
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            run_id = tracker.run_id if tracker else None
            save_checkpoint(Path(directory), *state, run, config, run_dir=run_dir, run_id=run_id)
            if figures is not None:
                paths = figures(Path(directory) / "figures")
                if tracker:
                    tracker.log_artifacts(paths)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    if rank == 0:
        # Wait until the controller has registered the checkpoint: a worker that dies right after a report could
        # otherwise lose it, and MLflow should never hold an epoch that a restart would redo. The other ranks
        # wait for rank 0 in the next step's gradient all-reduce.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
    return name


def train_worker(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entry point of every rank. `payload`: config (dict), name, run_dir, mlflow_parent_run_id."""
    attempt_started = time.time()
    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if not timm.layers.use_fused_attn():
            logger.warning("timm's fused attention is off (TIMM_FUSED_ATTN?): training will be slower")

    model = build_network(config)
    checkpoint_state = load_checkpoint()
    if checkpoint_state is not None:
        model.load_state_dict(checkpoint_state["model"])
    capture = vitreg.BlockOutputCapture(model, config.penalty_block)  # the hook sees the DDP forward too
    net = ray.train.torch.prepare_model(model)  # to the device; DDP (gloo on CPU, NCCL on GPU) with >1 worker
    optimizer = make_optimizer(model, config, device)
    ema = make_ema(model, config)
    train_loader = build_loader(config.data, "train", rank=rank, world_size=world_size, device=device)
    val_loader = build_loader(config.data, "val", rank=rank, world_size=world_size, device=device)
    schedule = LearningRate(optimizer, config, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and config.precision == "fp16")
    run = restore(optimizer, scaler, ema, checkpoint_state)
    resumed_from, elapsed_before = run.epoch, run.elapsed_s
    # epochs=0 evaluates the model as built: one "epoch" that measures and reports without training.
    rounds = max(config.epochs, 1)

    tracker = open_tracker(config, payload, model, world_size) if rank == 0 else None
    probe = probe_images(config, device) if rank == 0 else None  # uint8, for the figures

    def fault(epoch: int, step: int) -> None:
        maybe_fail(config, epoch, step, rank, world_size, payload["run_dir"])

    def report_progress(values: dict[str, float], step: int) -> None:
        # Printed, not logged: Ray forwards a worker's stdout to the driver whatever its logging setup.
        print(
            f"{payload['name']} epoch {values['progress/epoch']:.2f} step {step}: loss {values['progress/loss']:.4f}, "
            f"{values['progress/images_per_s_per_worker']:.1f} images/s on rank 0",
            flush=True,
        )
        if tracker:
            tracker.log_step(values, step)

    progress = report_progress if rank == 0 else None

    checkpoint_name = f"epoch_{run.epoch:04d}" if run.epoch else None
    failure = None  # a non-finite loss: the run ends without retries (a restart would compute it again)
    try:
        for epoch in range(run.epoch, rounds):
            epoch_started = time.time()
            last = epoch == rounds - 1
            seed_everything(config.seed, epoch, rank)
            train_loader.set_epoch(epoch)
            metrics: dict[str, float] = {"epoch": epoch}
            if config.epochs:
                metrics |= train_epoch(
                    net, model, capture, train_loader, optimizer, schedule, scaler, ema, config, epoch, fault, progress
                )
            metrics |= evaluate(model, val_loader, config)
            if ema is not None and last and config.epochs:
                metrics |= {
                    k.replace("val/", "val_ema/"): v for k, v in evaluate(ema.module, val_loader, config).items()
                }
            figures = None
            if rank == 0:
                artifacts, taps = artifact_metrics(model, normalize_on_device(probe))
                metrics |= artifacts
                if last:
                    when = f"after epoch {epoch}" if config.epochs else "as built (no training)"
                    title = f"{payload['name']}, {when}"
                    figures = partial(draw_figures, taps, probe, config.figure_images, title)  # (directory) -> paths
            run.elapsed_s = elapsed_before + time.time() - attempt_started
            metrics |= {"time/epoch_s": time.time() - epoch_started, "time/elapsed_s": run.elapsed_s}
            if last:
                metrics |= run_totals(run.elapsed_s, world_size, config.use_gpu)
            run.epoch = epoch + 1
            run.history.append(metrics)
            state = (model, optimizer, scaler, ema)
            checkpoint_name = report_epoch(run, metrics, state, config, rank, payload["run_dir"], figures, tracker)
            if tracker:
                tracker.log_history(run.history)  # after the report: only checkpointed epochs reach MLflow
                tracker.set_tags({"checkpoint_path": storage.join(payload["run_dir"], checkpoint_name)})
    except NonFiniteLossError as error:  # raised on every rank at the same step
        failure = f"{type(error).__name__}: {error}"
        if tracker:
            tracker.set_tags({FAILURE_TAG: failure})
            tracker.finish(run.history, status="FAILED")
    except BaseException as error:
        if tracker:  # (a killed process never gets here: its run stays RUNNING until the restart resumes it)
            tracker.set_tags({FAILURE_TAG: f"{type(error).__name__}: {error}"[:4000]})
            tracker.finish(run.history, status="FAILED")
        raise

    if rank != 0:
        return None
    checkpoint_path = storage.join(payload["run_dir"], checkpoint_name) if checkpoint_name else None
    summary = {
        "name": payload["name"],
        "path": payload["run_dir"],
        "config": payload["config"],
        "history": run.history,
        "metrics": run.history[-1] if run.history else {},
        "checkpoint_path": checkpoint_path,
        "mlflow_run_id": tracker.run_id if tracker else None,
        "resumed_from_epoch": resumed_from,
        "already_finished": False,
    }
    if failure is None:
        # Written here, before MLflow shows the run FINISHED, not by the driver after `fit` returns: a driver killed
        # in between finds the run finished when it is rerun, instead of starting a worker group to learn it.
        text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        storage.write_text(storage.join(payload["run_dir"], RESULT_FILE), text)
        if tracker:
            tracker.set_tags({"final_checkpoint_path": checkpoint_path or ""})
            tracker.finish(run.history)
    return {**summary, "failure": failure}
