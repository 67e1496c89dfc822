"""Which models a run probes: `ModelSpec`, parsed from a model spec string, and loading one.

Spec strings:
    NAME[=CHECKPOINT][:option]...                 a timm model (hub weights, a local file, or random weights)
    run:RUN_DIR[@CHECKPOINT][:option]...          a model trained by train.driver, from its run directory
    mlflow:RUN_ID[@CHECKPOINT][:option]...        the same, found through its MLflow training run

Examples:
    vit_large_patch14_reg4_dinov2.lvd142m          timm name, pretrained weights from timm's hub
    deit3_small_patch16_384=/ckpt/deit3_s.pth       timm name with a local checkpoint (original layout)
    vit_tiny_patch16_224:random:img_size=64         random weights (tests), 64 px input
    deit3_small_patch16_224:registers=4:label=s4    4 registers added, shown as `s4`
    planted                                         `vitreg.synthetic.planted_artifact_vit` (known artifacts)
    run:outputs/runs/my-finetune                    a finished training run, its last checkpoint
    run:outputs/runs/my-finetune@epoch_0003         its checkpoint after 3 epochs (`@3` says the same)
    run:outputs/runs/my-finetune/epoch_0003         a checkpoint directory names itself
    mlflow:0123456789abcdef0123456789abcdef         the training run with this MLflow id (its `vitreg.storage` tag
                                                    gives the directory; store: --mlflow-uri, else
                                                    $MLFLOW_TRACKING_URI, else the project's default)
    run:outputs/runs/my-finetune:img_size=384:label=ft   probed at 384 px, shown as `ft`
Options: `random` (no weights), `img_size=N`, `registers=N`, `label=TEXT`. A training run's model is what its
checkpoint holds: its timm name and architecture, registers and trained head come from the run (config.json and
the checkpoint), and it is probed at its training resolution with its training normalisation unless `img_size=N`
says otherwise; `random` and `registers=N` do not apply to it. Without `@CHECKPOINT`, the run must have finished
(`result.json`). The probes' MLflow run records each such model's training run id (`ModelSpec.training_run_id`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from analysis.runs import RunError, RunModel, run_dir_of, run_model
from vitreg import add_registers, build_model, count_registers
from vitreg.synthetic import planted_artifact_vit

PLANTED = "planted"
PLANTED_IMG_SIZE = 64
MODEL_OPTIONS = ("random", "img_size", "registers", "label")
RUN_OPTIONS = ("img_size", "label")  # a trained model brings its weights and registers
RUN_PREFIXES = ("run", "mlflow")
INIT_SEED = 0  # random weights and added registers are drawn from this seed


class ModelSpecError(ValueError):
    """A model spec that cannot be parsed or does not name a buildable model."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to probe.

    Args:
        name: a timm ViT name (with or without a pretrained tag) or `planted`.
        checkpoint: local checkpoint file (implies weights from it, not the hub).
        pretrained: load timm hub weights when there is no checkpoint.
        img_size: input resolution (None: the dataset protocol's, else the model's own).
        registers: registers to add (None: what the architecture has); for a trained model, the registers it has.
        label: how tables and figures name the model (default: derived from the spec).
        model_kwargs: timm architecture overrides (tiny test models).
        num_classes: for a trained model, the size of its trained head (None: the architecture's).
        mean, std: input normalisation (None: the model's timm data config); a trained model's is its training's.
        run_dir: the training run the checkpoint comes from (None: not a trained model). A trained model loads
            with everything its checkpoint holds (registers, head); nothing is added or drawn at random.
        training_run_id: that run's MLflow id, which the probes' MLflow run records.
    """

    name: str
    checkpoint: str | None = None
    pretrained: bool = True
    img_size: int | None = None
    registers: int | None = None
    label: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    run_dir: str | None = None
    training_run_id: str | None = None

    def __post_init__(self) -> None:
        if self.name != PLANTED and not timm.is_model(self.name):
            raise ModelSpecError(f"unknown model {self.name!r}: not a timm model name and not {PLANTED!r}")
        if self.checkpoint is not None:
            if not Path(self.checkpoint).expanduser().is_file():
                raise ModelSpecError(f"checkpoint for model {self.name!r} not found: {self.checkpoint}")
            # Absolute, so Ray workers with another working directory find it too.
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().resolve()))
        if self.img_size is not None and self.img_size <= 0:
            raise ModelSpecError(f"model {self.name!r}: img_size={self.img_size} must be positive")
        if self.registers is not None and self.registers < 0:
            raise ModelSpecError(f"model {self.name!r}: registers={self.registers} must be 0 or more")
        if self.run_dir is not None and (self.checkpoint is None or self.registers is None or self.pretrained):
            raise ModelSpecError(f"model {self.name!r} from run {self.run_dir}: needs its checkpoint and registers")
        if not self.label:
            label = self.name + (f"@{Path(self.checkpoint).stem}" if self.checkpoint else "")
            label += f"+reg{self.registers}" if self.registers else ""
            object.__setattr__(self, "label", label)

    @property
    def family(self) -> str:
        """The architecture without pretrained tag and register count: models of one family differ only in those."""
        return re.sub(r"_reg\d+", "", self.name.split(".")[0])


def _parse_options(text: str, options: list[str], allowed: tuple[str, ...]) -> dict[str, object]:
    fields: dict[str, object] = {}
    for option in options:
        key, has_value, value = option.partition("=")
        if key not in allowed or (key == "random") == bool(has_value):
            spelled = ", ".join("random" if name == "random" else f"{name}=..." for name in allowed)
            trained = key in MODEL_OPTIONS and key not in allowed
            why = " (a training run's model has its own weights and registers)" if trained else ""
            raise ModelSpecError(f"model spec {text!r}: bad option {option!r}{why}; allowed: {spelled}")
        if key == "random":
            fields["pretrained"] = False
        elif key == "label":
            fields["label"] = value
        else:
            try:
                fields[key] = int(value)
            except ValueError:
                raise ModelSpecError(f"model spec {text!r}: {key}={value!r} is not an integer") from None
    return fields


def parse_model_spec(text: str, tracking_uri: str | None = None) -> ModelSpec:
    """Parse a model spec string (see the module docstring).

    Args:
        tracking_uri: the MLflow store of `mlflow:RUN_ID` specs (None: `train.tracking.resolve_tracking_uri`).
    """
    prefix, is_run, rest = text.strip().partition(":")
    if is_run and prefix in RUN_PREFIXES:
        target, *options = rest.split(":")
        return run_spec(text, prefix, target, _parse_options(text, options, RUN_OPTIONS), tracking_uri)
    head, *options = text.strip().split(":")
    name, _, checkpoint = head.partition("=")
    return ModelSpec(name=name, checkpoint=checkpoint or None, **_parse_options(text, options, MODEL_OPTIONS))


def run_spec(
    text: str, prefix: str, target: str, options: dict[str, object], tracking_uri: str | None = None
) -> ModelSpec:
    """The spec of `run:RUN_DIR[@CHECKPOINT]` or `mlflow:RUN_ID[@CHECKPOINT]` with its parsed options."""
    where, at, checkpoint = target.rpartition("@")
    if not at or "/" in checkpoint:  # no checkpoint named (an "@" inside a directory name stays in the path)
        where, checkpoint = target, ""
    if not where:
        raise ModelSpecError(f"model spec {text!r}: give the {'run directory' if prefix == 'run' else 'run id'}")
    try:
        run_dir = run_dir_of(where, tracking_uri) if prefix == "mlflow" else where
        trained = run_model(run_dir, checkpoint or None)
    except RunError as error:
        raise ModelSpecError(f"model spec {text!r}: {error}") from None
    named = bool(checkpoint) or Path(run_dir).expanduser().resolve() != trained.run_dir  # a checkpoint directory
    label = str(options.get("label") or trained.run_dir.name + (f"@{trained.checkpoint}" if named else ""))
    return spec_of_run(trained, label=label, img_size=options.get("img_size"))


def spec_of_run(trained: RunModel, label: str, img_size: object = None) -> ModelSpec:
    """The spec of a trained model (see `analysis.runs.run_model`), shown as `label`."""
    return ModelSpec(
        name=trained.name,
        checkpoint=str(trained.model_file),
        pretrained=False,
        img_size=int(img_size) if img_size is not None else trained.img_size,
        registers=trained.registers,
        label=label,
        model_kwargs=dict(trained.model_kwargs),
        num_classes=trained.num_classes,
        mean=tuple(trained.mean),
        std=tuple(trained.std),
        run_dir=str(trained.run_dir),
        training_run_id=trained.training_run_id,
    )


def load_model(spec: ModelSpec, img_size: int | None = None) -> tuple[VisionTransformer, tuple, tuple]:
    """Build the model of `spec` in eval mode, with its input mean and std.

    Args:
        img_size: resolution to build for when the spec does not fix one (None: the model's own).
    """
    size = spec.img_size or img_size
    # Every task builds its own copy: random weights and new registers must come out the same in each.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        if spec.name == PLANTED:
            model = planted_artifact_vit(img_size=size or PLANTED_IMG_SIZE)
            if spec.registers:
                add_registers(model, spec.registers)
            return model.eval(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # its images are generated already normalised
        if spec.run_dir is not None:
            model = load_trained(spec, size)
        else:
            model = build_model(
                spec.name,
                pretrained=spec.pretrained and spec.checkpoint is None,
                checkpoint=spec.checkpoint,
                img_size=size,
                registers=spec.registers,
                num_classes=spec.num_classes,
                **spec.model_kwargs,
            )
    config = timm.data.resolve_model_data_config(model)
    mean = spec.mean if spec.mean is not None else tuple(config["mean"])
    std = spec.std if spec.std is not None else tuple(config["std"])
    return model.eval(), mean, std


def load_trained(spec: ModelSpec, img_size: int | None) -> VisionTransformer:
    """A trained model with everything its checkpoint holds: registers=None and num_classes=None ask
    `build_model` for what the file has (its registers and trained head, loaded strictly); the spec's counts,
    read from the run's config, must then match, or the model is not the one that was trained."""
    model = build_model(
        spec.name, checkpoint=spec.checkpoint, img_size=img_size, registers=None, num_classes=None, **spec.model_kwargs
    )
    found = {"registers": count_registers(model), "num_classes": model.num_classes}
    wanted = {"registers": spec.registers, "num_classes": spec.num_classes}
    if found != wanted:
        raise ModelSpecError(
            f"model {spec.label!r}: {spec.checkpoint} loaded as {found}, but its training run {spec.run_dir} "
            f"trained {wanted}; the checkpoint does not hold the trained model"
        )
    return model


def model_depth(spec: ModelSpec) -> int | None:
    """Number of blocks, from a weightless build on the meta device (cheap even for giant models)."""
    if spec.name == PLANTED:
        return len(planted_artifact_vit().blocks)
    try:
        with torch.device("meta"):
            return len(timm.create_model(spec.name, pretrained=False, **spec.model_kwargs).blocks)
    except Exception:  # any architecture that cannot build on meta: the tasks find out the depth themselves
        return None


def model_info(model: VisionTransformer) -> dict[str, object]:
    """Size and shape facts the summary needs (claim 2 relates artifacts to model size)."""
    return {
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "depth": len(model.blocks),
        "embed_dim": model.embed_dim,
        "registers": count_registers(model),
        "patch_size": model.patch_embed.patch_size[0],
        "img_size": model.patch_embed.img_size[0],
    }
