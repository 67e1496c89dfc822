"""Which models a run probes: `ModelSpec`, parsed from `NAME[=CHECKPOINT][:option]...`, and loading one.

Examples:
    vit_large_patch14_reg4_dinov2.lvd142m          timm name, pretrained weights from timm's hub
    deit3_small_patch16_384=/ckpt/deit3_s.pth       timm name with a local checkpoint (original layout)
    vit_tiny_patch16_224:random:img_size=64         random weights (tests), 64 px input
    deit3_small_patch16_224:registers=4:label=s4    4 registers added, shown as `s4`
    planted                                         `vitreg.synthetic.planted_artifact_vit` (known artifacts)
Options: `random` (no weights), `img_size=N`, `registers=N`, `label=TEXT`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitreg import add_registers, build_model, count_registers
from vitreg.synthetic import planted_artifact_vit

PLANTED = "planted"
PLANTED_IMG_SIZE = 64
MODEL_OPTIONS = ("random", "img_size", "registers", "label")
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
        registers: registers to add (None: what the architecture has).
        label: how tables and figures name the model (default: derived from the spec).
    """

    name: str
    checkpoint: str | None = None
    pretrained: bool = True
    img_size: int | None = None
    registers: int | None = None
    label: str = ""

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
        if not self.label:
            label = self.name + (f"@{Path(self.checkpoint).stem}" if self.checkpoint else "")
            label += f"+reg{self.registers}" if self.registers else ""
            object.__setattr__(self, "label", label)

    @property
    def family(self) -> str:
        """The architecture without pretrained tag and register count: models of one family differ only in those."""
        return re.sub(r"_reg\d+", "", self.name.split(".")[0])


def parse_model_spec(text: str) -> ModelSpec:
    """Parse `NAME[=CHECKPOINT][:option]...` (see the module docstring)."""
    head, *options = text.strip().split(":")
    name, _, checkpoint = head.partition("=")
    fields: dict[str, object] = {"name": name, "checkpoint": checkpoint or None}
    for option in options:
        key, has_value, value = option.partition("=")
        if key not in MODEL_OPTIONS or (key == "random") == bool(has_value):
            raise ModelSpecError(
                f"model spec {text!r}: bad option {option!r}; allowed: random, img_size=N, registers=N, label=TEXT"
            )
        if key == "random":
            fields["pretrained"] = False
        elif key == "label":
            fields["label"] = value
        else:
            try:
                fields[key] = int(value)
            except ValueError:
                raise ModelSpecError(f"model spec {text!r}: {key}={value!r} is not an integer") from None
    return ModelSpec(**fields)


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
        model = build_model(
            spec.name,
            pretrained=spec.pretrained and spec.checkpoint is None,
            checkpoint=spec.checkpoint,
            img_size=size,
            registers=spec.registers,
        )
    config = timm.data.resolve_model_data_config(model)
    return model.eval(), tuple(config["mean"]), tuple(config["std"])


def model_depth(spec: ModelSpec) -> int | None:
    """Number of blocks, from a weightless build on the meta device (cheap even for giant models)."""
    if spec.name == PLANTED:
        return len(planted_artifact_vit().blocks)
    try:
        with torch.device("meta"):
            return len(timm.create_model(spec.name, pretrained=False).blocks)
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
