"""A training run's checkpoint: what a restart needs (`state.pt`), and the trained model as a self-describing
file (`model.safetensors`, what `vitreg.build_model(checkpoint=...)` and the probes load)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from timm.utils import ModelEmaV3
from torch import nn

import vitreg
from train.config import TrainConfig

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (a full disk, a quota, a read-only or vanished directory).

    Each checkpoint has its own fresh directory and every file is renamed into place only when complete, so the
    previous checkpoints, and the files this one already holds, are never half-written."""


def _partial(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (vitreg.save_model_file's convention too)."""
    return path.with_name(path.name + ".partial")


@contextmanager
def _naming_the_file(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into a `CheckpointWriteError` that names the file and the cause, and
    remove the partial file (which would only fill the disk further)."""
    try:
        yield
    except OSError as error:
        _partial(path).unlink(missing_ok=True)
        cause = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise CheckpointWriteError(
            error.errno, f"writing checkpoint file {path} failed: {cause}; the previous checkpoint is untouched"
        ) from error


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` next to `path`, then rename it into place: `path` is whole or absent, never partial."""
    with _naming_the_file(path):
        write(_partial(path))
        os.replace(_partial(path), path)


@dataclass
class RunState:
    """What survives a restart besides the weights: the next epoch, the metrics so far, the time spent."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


def restore(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
    state: dict[str, Any] | None,
) -> RunState:
    """Load a checkpoint's optimiser, scaler and EMA states (the weights are loaded before DDP wraps).

    The learning-rate schedule has no state to restore: it is set from the absolute epoch and step.
    """
    if state is None:
        return RunState()
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.module.load_state_dict(state["model_ema"])
    return RunState(state["epoch"], state["history"], state["elapsed_s"])


def load_checkpoint() -> dict[str, Any] | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
    run: RunState,
    config: TrainConfig,
    *,
    run_dir: str,
    run_id: str | None,
) -> None:
    """`state.pt` (everything a resume needs), `config.json`, and the trained model as a self-describing file.

    Each file is written under a temporary name and renamed when complete; a failed write (a full disk) raises
    `CheckpointWriteError` naming the file, and leaves no partial file behind.
    """
    state = {
        "model": model.state_dict(),  # the unwrapped model: loads without DDP's "module." prefix
        "model_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": run.epoch,  # the next epoch to run
        "history": run.history,
        "elapsed_s": run.elapsed_s,
        # Not needed to resume (each epoch reseeds from (seed, epoch, rank)); kept to inspect a run.
        "rng": {"torch": torch.get_rng_state(), "seed": config.seed},
        "config": config.to_dict(),
    }
    _write_atomically(directory / STATE_FILE, lambda path: torch.save(state, path))
    _write_atomically(directory / CONFIG_FILE, lambda path: path.write_text(config.to_json()))
    with _naming_the_file(directory / MODEL_FILE):  # save_model_file renames its file into place itself
        vitreg.save_model_file(
            model,
            directory / MODEL_FILE,
            timm_name=config.model,
            frozen_blocks=config.frozen_blocks,
            model_kwargs=config.architecture_kwargs,
            training_run_id=run_id,
            training_run_dir=run_dir,
            extra={
                "epoch": run.epoch,
                **{k: v for k, v in (run.history[-1] if run.history else {}).items() if "/" in k},
            },
        )
