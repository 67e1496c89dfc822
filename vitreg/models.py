"""Build timm ViTs with registers and frozen blocks.

A model is a plain timm `VisionTransformer`. Registers are extra prefix tokens: token order is
`[CLS, REG..., PATCH...]`, registers carry no position embedding and are dropped at the output (timm's pooling
reads the CLS token, or averages past `num_prefix_tokens`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class ModelBuildError(ValueError):
    """A model could not be built as asked (unknown name, bad checkpoint, bad register or freeze request)."""


class PositionFreeRegistersViT(VisionTransformer):
    """A ViT whose position embedding covers the CLS token, with registers added after it.

    timm's own `_pos_embed` would expect position rows for the registers on such models (`no_embed_class=False`,
    e.g. DINO, DINOv2 without registers). Here the position embedding is added to `[CLS, PATCH...]` exactly as
    before, then the registers are inserted after CLS without any, so every pretrained weight keeps its shape.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.dynamic_img_size:
            _, height, width, channels = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed,
                new_size=(height, width),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=1,
            )
            x = x.view(batch, -1, channels)
        else:
            pos_embed = self.pos_embed
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + pos_embed  # (B, 1 + N, C)
        x = torch.cat([x[:, :1], self.reg_token.expand(batch, -1, -1), x[:, 1:]], dim=1)  # (B, 1 + R + N, C)
        return self.pos_drop(x)


def count_registers(model: VisionTransformer) -> int:
    """Number of register tokens the model carries (0 for a plain ViT)."""
    return int(getattr(model, "num_reg_tokens", 0) or 0)


def depth(model: VisionTransformer) -> int:
    """Number of transformer blocks."""
    return len(model.blocks)


def add_registers(model: VisionTransformer, registers: int, init_std: float = 1e-6) -> VisionTransformer:
    """Give a ViT that has no registers `registers` new ones, in place; every existing weight is untouched.

    Args:
        model: a timm VisionTransformer with a CLS token and no registers.
        registers: how many to add (0 leaves the model as it is).
        init_std: std of the normal init of the new tokens (timm initialises registers with std 1e-6).
    """
    if registers < 0:
        raise ModelBuildError(f"registers={registers}: must be 0 or more")
    if registers == 0:
        return model
    existing = count_registers(model)
    if existing:
        raise ModelBuildError(f"model already has {existing} registers; cannot add {registers} more")
    if model.cls_token is None:
        raise ModelBuildError("registers are placed after the CLS token; this model has none")
    if init_std < 0:
        raise ModelBuildError(f"register init std={init_std}: must be >= 0")
    reference = model.cls_token
    model.reg_token = nn.Parameter(
        torch.randn(1, registers, model.embed_dim, device=reference.device, dtype=reference.dtype) * init_std
    )
    model.num_reg_tokens = registers
    model.num_prefix_tokens += registers
    if not model.no_embed_class:
        # DeiT-III-style models (no_embed_class) already concatenate reg_token after adding positions.
        model.__class__ = PositionFreeRegistersViT
    return model


def freeze_blocks(model: VisionTransformer, frozen_blocks: int) -> VisionTransformer:
    """Freeze the patch embedding and the first `frozen_blocks` blocks, as the study's fine-tunes do.

    Everything else trains: later blocks, final norm, head, position embedding, CLS token and registers.
    `frozen_blocks=0` freezes nothing (full fine-tuning or training from scratch).
    """
    blocks = depth(model)
    if not 0 <= frozen_blocks <= blocks:
        raise ModelBuildError(f"frozen_blocks={frozen_blocks}: must be in 0..{blocks} (the model's depth)")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if frozen_blocks == 0:
        return model
    frozen_modules: list[nn.Module] = [model.patch_embed, model.norm_pre, *model.blocks[:frozen_blocks]]
    for module in frozen_modules:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the study's Table 8 'Parameters' column)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _load_checkpoint_file(name: str, path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelBuildError(f"checkpoint for model {name!r} not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelBuildError(
            f"checkpoint {path} for model {name!r}: unknown format {path.suffix!r}; "
            f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure is reported with the file and the model
        raise ModelBuildError(f"cannot read checkpoint {path} for model {name!r}: {error}") from error


def build_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    registers: int | None = None,
    register_init_std: float = 1e-6,
    frozen_blocks: int = 0,
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    **architecture: Any,
) -> VisionTransformer:
    """Build a timm ViT by name, optionally with weights, added registers and frozen blocks.

    Args:
        name: a timm model name, with or without a pretrained tag (`deit3_small_patch16_224.fb_in22k_ft_in1k`).
        pretrained: load timm's hub weights for `name` (needs the network or a warm cache).
        checkpoint: a local file in the original layout of DeiT-III or DINOv2 (`.pth`, read with
            `weights_only=True`, or `.safetensors`); converted by timm's checkpoint filter. Implies pretrained.
        img_size: input resolution; the position embedding is resampled to it.
        registers: None keeps what the architecture has; N adds N registers to a model that has none, or
            confirms the count of a model that already has them.
        register_init_std: std of the normal init of added registers.
        frozen_blocks: freeze the patch embedding and this many first blocks (0 freezes nothing).
        num_classes: classifier size; None keeps the architecture's (a pretrained head is dropped if it differs).
        drop_path_rate: stochastic depth.
        **architecture: timm architecture overrides (depth, embed_dim, patch_size, num_heads, ...), e.g. for tiny
            test models; a pretrained or checkpoint load then fails unless the weights still fit.
    """
    if not timm.is_model(name):
        base = name.split(".")[0]
        candidates = [m for m in timm.list_models(f"*{base.split('_')[0]}*")][:12]
        raise ModelBuildError(f"unknown model {name!r}; timm models with that stem: {candidates}")
    kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate, **architecture}
    if img_size is not None:
        if img_size <= 0:
            raise ModelBuildError(f"img_size={img_size}: must be positive")
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        state_dict = _load_checkpoint_file(name, path)
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **kwargs
            )
        except Exception as error:  # timm's filter and strict load fail in many ways on a wrong file; all end here
            raise ModelBuildError(
                f"checkpoint {path} does not fit model {name!r}: {type(error).__name__}: {error}"
            ) from error
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # hub, network and cache errors all end here
            raise ModelBuildError(
                f"could not fetch pretrained weights for {name!r} from timm's hub ({type(error).__name__}: "
                f"{error}); with no network, pass checkpoint=<local .pth or .safetensors file>"
            ) from error
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)

    if not isinstance(model, VisionTransformer):
        raise ModelBuildError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if registers is not None:
        existing = count_registers(model)
        if existing and registers != existing:
            raise ModelBuildError(f"{name!r} already has {existing} registers; asked for registers={registers}")
        if not existing:
            add_registers(model, registers, init_std=register_init_std)
    return freeze_blocks(model, frozen_blocks)
