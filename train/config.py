"""One frozen, validated config for a whole training run, and `key=value` overrides.

`TrainConfig` holds everything a run depends on: the model and what is added to or frozen in it, the L2-norm
penalty and its lambda schedule, the optimiser and learning-rate schedule, the data (a `train.data.DataConfig`),
the Ray resources, seeds, fault tolerance and MLflow settings. All validation happens in `__post_init__`, on the
driver, before any Ray worker starts; every error is a `ValueError` that names the field, the value and what is
allowed. `from_dict` rejects unknown keys, so a typo in a sweep or on the command line fails at once.

The global batch size, image size and seed live here only: the per-rank `DataConfig` is derived from them
(`data.batch_size = batch_size // num_workers`, `data.img_size = img_size`, `data.seed = seed`).

Experiments (the training presets `finetune`, `scratch`, `tiny`, the study's recipe and the sweeps) are plain data
in `train.experiments`; `from_preset` builds a config from one of them.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torchvision.datasets.folder import find_classes

import vitreg
from train.augment import AugmentConfig
from train.data import DataConfig, read_class_names, timm_eval_settings
from vitreg.models import REGISTER_ENTRIES
from vitreg.schedules import SCHEDULES, LambdaSchedule

PRECISIONS = ("bf16", "fp16", "fp32")
EVAL_PREPROCESSING = ("study", "timm")
LR_SCHEDULE_UNITS = ("step", "epoch")
# Data fields derived from the run config; a data dict may repeat them only with the same value.
DERIVED_DATA_FIELDS = ("img_size", "batch_size", "seed")
# Fields that may change when a run is resumed (they do not change what is computed).
OPERATIONAL_FIELDS = (
    "max_failures",
    "fail_at_epoch",
    "tracking",
    "cpus_per_worker",
    "resources_per_worker",
    "keep_checkpoints",
    "figure_images",
    "log_every_steps",
)
OPERATIONAL_DATA_FIELDS = ("num_workers", "batches_ahead", "os_cache")


def _fail(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {allowed}")


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, "must be an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise _fail(name, value, f"must be {bounds}")


def _check_number(
    name: str, value: object, low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(name, value, "must be a finite number")
    open_high = open_high or not math.isfinite(high)
    if value < low or (open_low and value == low) or value > high or (open_high and value == high):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise _fail(name, value, f"must be in {interval}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(name, value, "must be true or false")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow settings. Only Ray Train rank 0 talks to MLflow; a failing server never stops training.

    Attributes:
        enabled: log the run to MLflow at all.
        tracking_uri: None takes $MLFLOW_TRACKING_URI, else `sqlite:///<driver cwd>/outputs/mlflow.db`
            (`train.tracking.resolve_tracking_uri`, on the driver, so every worker logs to the same place;
            multi-node runs need a server URI).
        experiment: MLflow experiment name (a child run goes to its parent's experiment).
        system_metrics: log CPU/memory/disk/network (and GPU with pynvml) metrics as `system/...`.
        system_metrics_interval_s: sampling interval of the system metrics.
        retries: tries per tracking call before it is given up with a warning.
        retry_backoff_s: wait before the second try; doubles after each further failure.
        http_timeout_s, http_max_retries: MLflow's own per-request timeout and retries (REST servers), set as
            MLFLOW_HTTP_REQUEST_TIMEOUT / MLFLOW_HTTP_REQUEST_MAX_RETRIES in rank 0 unless already set there.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "vitreg"
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    retries: int = 3
    retry_backoff_s: float = 1.0
    http_timeout_s: int = 10
    http_max_retries: int = 2

    def __post_init__(self) -> None:
        _check_bool("tracking.enabled", self.enabled)
        _check_bool("tracking.system_metrics", self.system_metrics)
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str) or not self.tracking_uri):
            raise _fail("tracking.tracking_uri", self.tracking_uri, "must be None or a non-empty URI")
        if self.tracking_uri is not None and self.tracking_uri.startswith("file:"):
            raise _fail("tracking.tracking_uri", self.tracking_uri, "MLflow 3 has no file store; use sqlite:///...")
        if not isinstance(self.experiment, str) or not self.experiment:
            raise _fail("tracking.experiment", self.experiment, "must be a non-empty name")
        _check_number("tracking.system_metrics_interval_s", self.system_metrics_interval_s, 0, open_low=True)
        _check_int("tracking.retries", self.retries, 1)
        _check_number("tracking.retry_backoff_s", self.retry_backoff_s, 0)
        _check_int("tracking.http_timeout_s", self.http_timeout_s, 1)
        _check_int("tracking.http_max_retries", self.http_max_retries, 0)


@dataclass(frozen=True)
class Architecture:
    """What validation needs to know about a model, read from a weightless (meta-device) build."""

    depth: int
    patch_size: int
    registers: int


def architecture(model: str, model_kwargs: Mapping[str, Any] | None = None) -> Architecture:
    """Depth, patch size and built-in registers of a timm ViT, without allocating or loading weights."""
    kwargs = dict(model_kwargs or {})
    with torch.device("meta"):
        try:  # a ViT skips its weight init: random numbers nobody reads, slow to draw op by op on meta tensors
            net = timm.create_model(model, pretrained=False, weight_init="skip", **kwargs)
        except TypeError as error:  # a model without that option (not a ViT: refused below)
            if "weight_init" not in str(error):
                raise
            net = timm.create_model(model, pretrained=False, **kwargs)
    blocks = getattr(net, "blocks", None)
    patch_embed = getattr(net, "patch_embed", None)
    if blocks is None or patch_embed is None:
        raise TypeError(f"{type(net).__name__} is not a ViT (no blocks / patch_embed)")
    return Architecture(len(blocks), int(patch_embed.patch_size[0]), int(getattr(net, "num_reg_tokens", 0) or 0))


def checkpoint_model_kwargs(checkpoint: str | None) -> dict[str, Any]:
    """The architecture overrides a vitreg model file was built with ({} for any other file, or none)."""
    if checkpoint is None or not checkpoint.endswith(".safetensors"):
        return {}
    try:
        return dict(vitreg.read_model_file_info(checkpoint).model_kwargs)
    except vitreg.ModelBuildError:  # a plain safetensors file (timm layout): no metadata of ours
        return {}


def checkpoint_register_entry(checkpoint: str | None) -> int | None:
    """The block at which a vitreg model file's registers enter (None: the input, or not a vitreg model file)."""
    if checkpoint is None or not checkpoint.endswith(".safetensors"):
        return None
    try:
        return vitreg.read_model_file_info(checkpoint).register_entry_block
    except vitreg.ModelBuildError:  # a plain safetensors file (timm layout): no metadata of ours
        return None


def data_class_names(data: DataConfig) -> list[str]:
    """Class names of the training split (index = label); raises ValueError naming data.path if it is missing."""
    assert data.path is not None
    if data.backend == "ffcv":
        missing = [f"{split}.beton" for split in ("train", "val") if not (data.path / f"{split}.beton").is_file()]
        if missing:
            raise _fail("data.path", str(data.path), f"backend 'ffcv' needs {' and '.join(missing)} in it")
        return read_class_names(data.path / "train.beton")
    missing = [split for split in ("train", "val") if not (data.path / split).is_dir()]
    if missing:
        raise _fail("data.path", str(data.path), f"backend 'imagefolder' needs sub-folders {', '.join(missing)}")
    return find_classes(data.path / "train")[0]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on. Defaults are the study's fine-tune (preset `finetune`).

    Model:
        model: timm model name, with a pretrained tag where it matters (`...fb_in22k_ft_in1k`).
        pretrained: load timm's hub weights for `model`.
        checkpoint: a local weights file (`.pth` in the original DeiT-III/DINOv2 layout or `.safetensors`).
        model_kwargs: timm architecture overrides (depth, embed_dim, patch_size, ...) for random-init models only.
        img_size: input resolution (the position embedding is resampled to it); must divide by the patch size.
        num_classes: classifier size; None takes the number of classes of the data.
        registers: registers to add (None keeps the architecture's own).
        register_init_std: std of the normal init of added registers (timm: 1e-6; the study: 1.0).
        frozen_blocks: freeze the patch embedding and this many first blocks.
        register_entry: where the registers join the tokens. "input" (the study's): at the input, so position
            embedding, CLS and registers train and autograd runs back through every frozen block. "after_frozen":
            after CLS at the input of block `frozen_blocks`; the prefix (patch and position embedding, CLS, blocks
            before it) is frozen and runs under no_grad, and later blocks, final norm, head and registers train.
            With frozen_blocks=0 it is "input" with the embeddings frozen; it needs frozen_blocks < depth and a
            penalty_block at or after the entry.
        drop_path_rate: stochastic depth.
    Penalty (loss = CE + lambda(epoch) * mean patch-token L2 norm of block `penalty_block`'s pre-norm output):
        penalty_lambda: lambda at epoch 0 (0 disables the penalty).
        lambda_schedule: one of vitreg.SCHEDULES.
        lambda_period: the schedules' period in epochs.
        penalty_block: block whose output is penalised (-1: the last).
    Optimisation:
        epochs: training epochs; 0 evaluates the model as built (no training): the "no fine-tuning" baseline.
        batch_size: global, split evenly over the workers.
        lr: peak learning rate; with lr_reference_batch N it is scaled by batch_size / N (DeiT's linear rule).
        min_lr: end of the cosine; warmup_epochs: linear warm-up from warmup_lr to the peak (timm's
        `CosineLRScheduler`); lr_schedule_unit: "step" (the lr changes every step; fractional warm-up epochs
        allowed) or "epoch" (once per epoch, as DeiT and the study; whole warm-up epochs).
        weight_decay, betas (AdamW); no_weight_decay: parameter names without weight decay besides 1-d ones
        (None: the model's own `no_weight_decay()`, which in timm includes the registers).
        label_smoothing; grad_clip_norm (None: no clipping); ema_decay: keep an exponential moving average of the
        weights (timm's `ModelEmaV3`), evaluated at the end as val_ema/* (None: none).
        precision: autocast dtype on GPU: bf16, fp16 with a GradScaler, or fp32; CPU always runs fp32.
    Augmentation (on the device, per image, after the loader's crop and flip; `train.augment`):
        rand_augment: timm RandAugment spec (e.g. "rand-m9-mstd0.5-inc1") or None; color_jitter: strength
        (0: none); random_erasing: probability (pixel mode, after normalisation, as timm).
    Data:
        data: a `train.data.DataConfig` or its dict; its img_size, batch_size (per rank) and seed are derived.
        eval_preprocessing: "study" evaluates with data.crop_pct and data.eval_interpolation (default 0.875,
            bicubic: the study's); "timm" takes both from timm's pretrained data config of `model`
            (`train.data.timm_eval_settings`; e.g. crop 1.0 for deit3_small_patch16_224.fb_in22k_ft_in1k).
    Resources and run:
        num_workers: Ray Train workers (DDP ranks); use_gpu: one GPU per worker; cpus_per_worker;
        resources_per_worker: extra Ray resources per worker (e.g. {"memory": 8e9}); seed; max_failures: worker
        group restarts from the last checkpoint (-1: unlimited); keep_checkpoints: newest checkpoints kept.
    Measurements:
        artifact_images: fixed validation images (the first ones, in file order) for the artifact metrics;
        figure_images: how many of them the end-of-run figures show.
        log_every_steps: progress inside an epoch (step, loss, images/s) every this many steps, in the log and
            as MLflow `progress/*` metrics at the global step (0: only once per epoch).
    Testing:
        fail_at_epoch: kill the last worker's process once, after the first step of this epoch (a marker file in
            the run directory keeps it from firing again after the restore).
    Tracking:
        tracking: a `TrackingConfig` or its dict.
    """

    model: str = "deit3_small_patch16_224.fb_in22k_ft_in1k"
    pretrained: bool = True
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    num_classes: int | None = None
    registers: int | None = 4
    register_init_std: float = 1e-6
    frozen_blocks: int = 10
    register_entry: str = "input"
    drop_path_rate: float = 0.0

    penalty_lambda: float = 0.01
    lambda_schedule: str = "constant"
    lambda_period: int = 10
    penalty_block: int = -1

    epochs: int = 10
    batch_size: int = 512
    lr: float = 5e-5
    lr_reference_batch: int | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    warmup_lr: float = 0.0
    lr_schedule_unit: str = "step"
    weight_decay: float = 0.05
    no_weight_decay: tuple[str, ...] | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    grad_clip_norm: float | None = None
    ema_decay: float | None = None
    precision: str = "bf16"

    rand_augment: str | None = None
    color_jitter: float = 0.0
    random_erasing: float = 0.0

    data: DataConfig | None = None
    eval_preprocessing: str = "study"

    num_workers: int = 1
    use_gpu: bool = True
    cpus_per_worker: float = 8.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    max_failures: int = 3
    keep_checkpoints: int = 2

    artifact_images: int = 8
    figure_images: int = 4
    log_every_steps: int = 50

    fail_at_epoch: int | None = None

    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # Nested configs may come as dicts (JSON, Tune search spaces); betas as a list.
        if isinstance(self.tracking, Mapping):
            object.__setattr__(self, "tracking", _tracking_from_dict(self.tracking))
        if not isinstance(self.tracking, TrackingConfig):
            raise _fail("tracking", self.tracking, "must be a TrackingConfig or its dict")
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.no_weight_decay, list):
            object.__setattr__(self, "no_weight_decay", tuple(self.no_weight_decay))
        self._check_model()
        self._check_penalty()
        self._check_optimisation()
        self._check_resources()
        self._resolve_data()  # last: it needs batch_size, num_workers, img_size and seed checked

    # -- validation, one group per section of the docstring ------------------------------------------------------

    def _check_model(self) -> None:
        if not isinstance(self.model, str) or not timm.is_model(self.model):
            stem = str(self.model).split(".")[0].split("_")[0]
            close = timm.list_models(f"{stem}*")[:8] if stem else []
            raise _fail(
                "model", self.model, f"not a timm model name (e.g. {', '.join(close) or 'vit_small_patch16_224'})"
            )
        _check_bool("pretrained", self.pretrained)
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, str) or not Path(self.checkpoint).expanduser().is_file():
                raise _fail("checkpoint", self.checkpoint, "must be None or an existing weights file")
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().resolve()))
        if not isinstance(self.model_kwargs, dict):
            raise _fail("model_kwargs", self.model_kwargs, "must be a dict of timm architecture arguments")
        if self.model_kwargs and (self.pretrained or self.checkpoint):
            raise _fail(
                "model_kwargs", self.model_kwargs, "architecture overrides need pretrained=false, no checkpoint"
            )
        try:
            arch = architecture(self.model, self.architecture_kwargs)
        except TypeError as error:
            raise _fail("model_kwargs", self.model_kwargs, f"not accepted by {self.model!r}: {error}") from error
        _check_int("img_size", self.img_size, arch.patch_size)
        if self.img_size % arch.patch_size:
            raise _fail("img_size", self.img_size, f"must be a multiple of the patch size {arch.patch_size}")
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, 2)
        if self.registers is not None:
            _check_int("registers", self.registers, 0)
            if arch.registers and self.registers != arch.registers:
                raise _fail(
                    "registers", self.registers, f"{self.model!r} has {arch.registers} built in; use that or None"
                )
        _check_number("register_init_std", self.register_init_std, 0)
        _check_int("frozen_blocks", self.frozen_blocks, 0, arch.depth)
        _check_number("drop_path_rate", self.drop_path_rate, 0, 1, open_high=True)
        _check_int("penalty_block", self.penalty_block, -arch.depth, arch.depth - 1)
        self._check_register_entry(arch)

    def _check_register_entry(self, arch: Architecture) -> None:
        if self.register_entry not in REGISTER_ENTRIES:
            raise _fail("register_entry", self.register_entry, f"allowed: {', '.join(REGISTER_ENTRIES)}")
        late = self.register_entry == "after_frozen"
        if late and self.frozen_blocks >= arch.depth:
            raise _fail(
                "register_entry",
                self.register_entry,
                f"the registers enter at block frozen_blocks={self.frozen_blocks}; the model has blocks "
                f"0..{arch.depth - 1} (freeze fewer, or use 'input')",
            )
        penalised = self.penalty_block % arch.depth
        if late and penalised < self.frozen_blocks:
            raise _fail(
                "penalty_block",
                self.penalty_block,
                f"with register_entry='after_frozen' block {penalised} runs without autograd and holds no registers; "
                f"must be a block >= frozen_blocks={self.frozen_blocks}",
            )
        # A model file whose registers enter late is that architecture: it may not be contradicted (as in
        # train.loop.build_network). Registers trained at the input may be moved (an explicit choice of this run).
        held = checkpoint_register_entry(self.checkpoint)
        wanted = self.frozen_blocks if late else None
        if held is not None and held != wanted:
            raise _fail(
                "register_entry",
                self.register_entry,
                f"checkpoint {self.checkpoint} holds registers entering at block {held}; with frozen_blocks="
                f"{self.frozen_blocks} this asks for {'the input' if wanted is None else f'block {wanted}'} (use "
                f"register_entry='after_frozen' with frozen_blocks={held})",
            )

    def _check_penalty(self) -> None:
        _check_number("penalty_lambda", self.penalty_lambda, 0)
        if self.lambda_schedule not in SCHEDULES:
            raise _fail("lambda_schedule", self.lambda_schedule, f"allowed: {', '.join(SCHEDULES)}")
        _check_int("lambda_period", self.lambda_period, 1)
        try:
            self.lambda_fn()
        except ValueError as error:  # combinations, e.g. an exponential schedule with lambda > 1
            raise ValueError(f"penalty_lambda/lambda_schedule: {error}") from error

    def _check_optimisation(self) -> None:
        _check_int("epochs", self.epochs, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_number("lr", self.lr, 0, open_low=True)
        if self.lr_reference_batch is not None:
            _check_int("lr_reference_batch", self.lr_reference_batch, 1)
        _check_number("min_lr", self.min_lr, 0, self.peak_lr)
        _check_number("warmup_lr", self.warmup_lr, 0, self.peak_lr)
        if self.lr_schedule_unit not in LR_SCHEDULE_UNITS:
            raise _fail("lr_schedule_unit", self.lr_schedule_unit, f"allowed: {', '.join(LR_SCHEDULE_UNITS)}")
        if self.epochs:
            _check_number("warmup_epochs", self.warmup_epochs, 0, self.epochs)
            if self.lr_schedule_unit == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
                raise _fail("warmup_epochs", self.warmup_epochs, "must be whole epochs with lr_schedule_unit='epoch'")
        _check_number("weight_decay", self.weight_decay, 0)
        if self.no_weight_decay is not None and (
            not isinstance(self.no_weight_decay, tuple) or not all(isinstance(n, str) for n in self.no_weight_decay)
        ):
            raise _fail("no_weight_decay", self.no_weight_decay, "must be None or a list of parameter names")
        if self.ema_decay is not None:
            _check_number("ema_decay", self.ema_decay, 0, 1, open_low=True, open_high=True)
        _check_number("color_jitter", self.color_jitter, 0, 1)
        _check_number("random_erasing", self.random_erasing, 0, 1)
        try:
            augment_config(self)
        except (ValueError, TypeError) as error:
            raise _fail("rand_augment", self.rand_augment, f"not a valid augmentation: {error}") from error
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise _fail("betas", self.betas, "must be two numbers in [0, 1)")
        for beta in self.betas:
            _check_number("betas", beta, 0, 1, open_high=True)
        _check_number("label_smoothing", self.label_smoothing, 0, 1, open_high=True)
        if self.grad_clip_norm is not None:
            _check_number("grad_clip_norm", self.grad_clip_norm, 0, open_low=True)
        if self.precision not in PRECISIONS:
            raise _fail("precision", self.precision, f"allowed: {', '.join(PRECISIONS)}")

    def _check_resources(self) -> None:
        _check_int("num_workers", self.num_workers, 1)
        if self.batch_size % self.num_workers:
            raise _fail(
                "batch_size", self.batch_size, f"must be divisible by num_workers={self.num_workers} (global batch)"
            )
        _check_bool("use_gpu", self.use_gpu)
        _check_number("cpus_per_worker", self.cpus_per_worker, 0, open_low=True)
        if not isinstance(self.resources_per_worker, dict) or any(
            not isinstance(k, str) or k in ("CPU", "GPU") or isinstance(v, bool) or not isinstance(v, int | float)
            for k, v in self.resources_per_worker.items()
        ):
            raise _fail(
                "resources_per_worker",
                self.resources_per_worker,
                "must map resource names other than CPU/GPU (set cpus_per_worker, use_gpu) to numbers",
            )
        _check_int("seed", self.seed, 0)
        _check_int("max_failures", self.max_failures, -1)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        _check_int("artifact_images", self.artifact_images, 1)
        _check_int("figure_images", self.figure_images, 1, self.artifact_images)
        _check_int("log_every_steps", self.log_every_steps, 0)
        if self.fail_at_epoch is not None:
            _check_int("fail_at_epoch", self.fail_at_epoch, 0, self.epochs - 1)
            if self.max_failures == 0:
                raise _fail("fail_at_epoch", self.fail_at_epoch, "a killed worker needs max_failures >= 1")

    def _resolve_data(self) -> None:
        if self.data is None:
            raise _fail("data", None, "required: at least data.path (and data.backend, 'ffcv' or 'imagefolder')")
        derived = {
            "img_size": self.img_size,
            "batch_size": self.batch_size // self.num_workers,
            "seed": self.seed,
        }
        if isinstance(self.data, Mapping):
            values = dict(self.data)
            for name, want in derived.items():
                if name in values and values[name] != want:
                    raise _fail(
                        f"data.{name}",
                        values[name],
                        f"is derived from the run config (must be {want}); set "
                        + ("batch_size (global)" if name == "batch_size" else name)
                        + " instead",
                    )
            values.update(derived)
            if values.get("path"):  # absolute: Ray workers run in their own working directory
                values["path"] = str(Path(values["path"]).expanduser().resolve())
            try:
                data = DataConfig.from_dict(values)
            except ValueError as error:
                raise ValueError(f"data.{error}") from error
        elif isinstance(self.data, DataConfig):
            assert self.data.path is not None
            data = replace(self.data, path=self.data.path.expanduser().resolve(), **derived)
        else:
            raise _fail("data", self.data, "must be a DataConfig or its dict")
        if self.eval_preprocessing not in EVAL_PREPROCESSING:
            raise _fail("eval_preprocessing", self.eval_preprocessing, f"allowed: {', '.join(EVAL_PREPROCESSING)}")
        if self.eval_preprocessing == "timm":
            try:
                data = replace(data, **timm_eval_settings(self.model))
            except ValueError as error:
                raise _fail("eval_preprocessing", "timm", str(error)) from error
        names = data_class_names(data)
        if self.num_classes is not None and self.num_classes != len(names):
            raise _fail("num_classes", self.num_classes, f"the data at {data.path} has {len(names)} classes")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "num_classes", len(names))

    # -- derived values ------------------------------------------------------------------------------------------

    def lambda_fn(self) -> LambdaSchedule:
        """The penalty weight as a function of the (0-based) epoch."""
        return LambdaSchedule(self.lambda_schedule, float(self.penalty_lambda), self.lambda_period, self.epochs)

    @property
    def architecture_kwargs(self) -> dict[str, Any]:
        """The timm architecture overrides of the model: `model_kwargs`, or those a vitreg model file holds."""
        return {**checkpoint_model_kwargs(self.checkpoint), **self.model_kwargs}

    @property
    def peak_lr(self) -> float:
        """The learning rate at the end of warm-up: `lr`, linearly scaled when `lr_reference_batch` is set."""
        if self.lr_reference_batch is None:
            return float(self.lr)
        return float(self.lr) * self.batch_size / self.lr_reference_batch

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    # -- plain data ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data that `from_dict` turns back into an equal config."""
        values = {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("data", "tracking")
        }
        values["betas"] = list(self.betas)
        if self.no_weight_decay is not None:
            values["no_weight_decay"] = list(self.no_weight_decay)
        values["data"] = self.data.to_dict() if isinstance(self.data, DataConfig) else self.data
        values["tracking"] = asdict(self.tracking)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from plain data; unknown keys (also inside `data` and `tracking`) are an error."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a TrainConfig is built from a mapping, not {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """The training preset's values (`train.experiments.TRAINING_PRESETS`) with `overrides` merged over them
        (nested dicts merge by key); an unknown preset is a ValueError naming the ones there are."""
        from train.experiments import training_values  # the experiments are data built with `merge`, below

        return cls.from_dict(merge(training_values(preset), overrides or {}))

    def compute_fields(self) -> dict[str, Any]:
        """The fields that define what is computed (everything but `OPERATIONAL_FIELDS`), for resume checks."""
        values = {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_FIELDS}
        values["data"] = {k: v for k, v in values["data"].items() if k not in OPERATIONAL_DATA_FIELDS}
        return values


def augment_config(config: TrainConfig) -> AugmentConfig | None:
    """The device-side augmentation of `config` (`train.augment`), or None when it asks for none."""
    if config.rand_augment is None and config.color_jitter == 0 and config.random_erasing == 0:
        return None
    return AugmentConfig(
        rand_augment=config.rand_augment, color_jitter=config.color_jitter, random_erasing=config.random_erasing
    )


def _tracking_from_dict(values: Mapping[str, Any]) -> TrackingConfig:
    known = [f.name for f in fields(TrackingConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown tracking field(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    return TrackingConfig(**values)


# Dict-valued fields that an override replaces as a whole (an architecture is not merged key by key).
ATOMIC_FIELDS = ("model_kwargs", "resources_per_worker")


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested sections (data, tracking) merge key by key, the rest is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key in ATOMIC_FIELDS:
            merged[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        elif isinstance(value, DataConfig | TrackingConfig) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value.to_dict() if isinstance(value, DataConfig) else asdict(value))
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """`["lr=1e-4", "data.path=/imagenet", "betas=[0.9,0.95]"]` -> a nested dict of overrides.

    Values are read as JSON when they parse (numbers, true/false/null, lists, objects), else kept as strings.
    """
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"override {assignment!r}: expected key=value (nested keys with dots: data.path=...)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = overrides
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {assignment!r}: {parent} is set both as a value and as a section")
        node[leaf] = value
    return overrides
