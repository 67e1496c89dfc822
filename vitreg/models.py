"""Build timm ViTs with registers and frozen blocks, from scratch, timm's hub or any weights file.

A model is a plain timm `VisionTransformer`. Registers are extra prefix tokens: token order is
`[CLS, REG..., PATCH...]`, registers carry no position embedding and are dropped at the output (timm's pooling
reads the CLS token, or averages past `num_prefix_tokens`).

Weights files (see `vitreg.model_files`): a file that holds a whole trained model (our model file, a training
`state.pt`, the study's fine-tuned DeiT-III files) is rebuilt with *its* registers and head before loading and
must match key for key; an original-layout file (DeiT-III, DINOv2, timm) goes through timm's checkpoint filter
and must match too, except a classifier deliberately replaced by asking for another `num_classes`.
Nothing loads partially.

DINOv2 models (timm names with "dinov2") at another resolution than their weights' resample the position
embedding as the official code does (`dinov2_resample_pos_embed`), so features match facebookresearch/dinov2.

Register entry (`REGISTER_ENTRIES`): "input" puts the registers at the input, as the study does (the fine-tune then
trains position embedding, CLS and registers, so autograd runs back through every frozen block); "after_frozen"
inserts them after CLS at the input of block k = `frozen_blocks` (`set_register_entry_block`): the prefix (patch
embedding, position embedding, CLS, norm_pre, blocks < k) sees `[CLS, PATCH...]` only, is frozen and runs under
`torch.no_grad()`, and from block k on the token order is `[CLS, REG..., PATCH...]` again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vitreg.model_files import (
    CHECKPOINT_SUFFIXES,
    ModelBuildError,
    SavedModel,
    grid_side,
    read_checkpoint,
    saved_model_from_state_dict,
)
from vitreg.registers import (
    REGISTER_ENTRIES,
    add_registers,
    count_registers,
    depth,
    prefix_token_counts,
    register_entry_block,
    set_register_entry_block,
)
from vitreg.resolution import is_dinov2, set_img_size

# Re-exported (the functions below are public too).
__all__ = [
    "CHECKPOINT_SUFFIXES",
    "REGISTER_ENTRIES",
    "ModelBuildError",
    "add_registers",
    "count_registers",
    "depth",
    "prefix_token_counts",
    "register_entry_block",
    "set_register_entry_block",
]

# timm options that change no weight: a model file may be rebuilt with other values than it was trained with.
RUNTIME_OPTIONS = frozenset(
    {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "dynamic_img_size",
     "dynamic_img_pad"}
)  # fmt: skip


def freeze_blocks(model: VisionTransformer, frozen_blocks: int) -> VisionTransformer:
    """Freeze the patch embedding and the first `frozen_blocks` blocks, as the study's fine-tunes do.

    Everything else trains: later blocks, final norm, head, position embedding, CLS token and registers.
    `frozen_blocks=0` freezes nothing (full fine-tuning or training from scratch). A model whose registers enter
    at block k (`set_register_entry_block`) also has its prefix frozen, which runs under no_grad: position
    embedding, CLS token, norm_pre and blocks < k (whatever `frozen_blocks` says; more blocks may be frozen).
    """
    blocks = depth(model)
    if not 0 <= frozen_blocks <= blocks:
        raise ModelBuildError(f"frozen_blocks={frozen_blocks}: must be in 0..{blocks} (the model's depth)")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    entry = register_entry_block(model)
    frozen_modules: list[nn.Module] = []
    if frozen_blocks or entry is not None:
        frozen_modules = [model.patch_embed, model.norm_pre, *model.blocks[: max(frozen_blocks, entry or 0)]]
    frozen = [parameter for module in frozen_modules for parameter in module.parameters()]
    if entry is not None:
        frozen += [p for p in (model.pos_embed, model.cls_token) if isinstance(p, nn.Parameter)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the study's Table 8 'Parameters' column)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


# --- building ----------------------------------------------------------------------------------------------------


def build_model(
    name: str | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    registers: int | None = None,
    register_init_std: float = 1e-6,
    frozen_blocks: int = 0,
    register_entry: str | None = None,
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    **architecture: Any,
) -> VisionTransformer:
    """Build a timm ViT by name or from a weights file, optionally with added registers and frozen blocks.

    Args:
        name: a timm model name, with or without a pretrained tag (`deit3_small_patch16_224.fb_in22k_ft_in1k`).
            May be omitted when `checkpoint` names its model (a vitreg model file, a training `state.pt`); if
            given, it must be the same architecture (the pretrained tag may differ).
        pretrained: load timm's hub weights for `name` (needs the network or a warm cache).
        checkpoint: a local weights file (implies pretrained); pickles are read with `weights_only=True`.
            - A whole trained model: a vitreg model file (`vitreg.save_model_file`), a training `state.pt`
              ({"model", "config", ...}), the study's fine-tuned DeiT-III files (`register_tokens` (R, D), needs
              `name`) or a timm-layout state dict with an added `reg_token`. It is rebuilt with the file's
              registers, classes and architecture overrides, then loaded with an exact key match. `registers`,
              `num_classes` and architecture overrides default to the file's; a different value is an error.
            - An original-layout file (DeiT-III `.pth`, DINOv2 `.pth`, timm `.safetensors`): converted by timm's
              checkpoint filter; every key must match, except that asking for another `num_classes` replaces
              the classifier with a fresh one. `num_classes=None` takes the file's classifier size.
        img_size: input resolution. If it differs from the weights' (hub or file), the position embedding is
            resampled: DINOv2 models as the official DINOv2 code does, others as timm does.
        registers: None keeps what the architecture (or the file) has; N adds N registers to a model that has
            none, or confirms the count of a model (or a file) that already has them.
        register_init_std: std of the normal init of added registers.
        frozen_blocks: freeze the patch embedding and this many first blocks (0 freezes nothing).
        register_entry: where the registers join (`REGISTER_ENTRIES`): "input", or "after_frozen" (at block
            `frozen_blocks`, the prefix frozen and run under no_grad: `set_register_entry_block`). None: the
            file's (a model file or `state.pt` records it), else "input"; a file's entry may not be contradicted.
        num_classes: classifier size; None keeps the architecture's (or the file's).
        drop_path_rate: stochastic depth.
        **architecture: timm architecture overrides (depth, embed_dim, patch_size, num_heads, ...), e.g. for tiny
            test models; a pretrained or checkpoint load then fails unless the weights still fit. Options that
            change no weight (`RUNTIME_OPTIONS`: dropout rates, dynamic_img_size) may differ from a model file's.
    """
    if name is not None:
        _check_name(name)
    if img_size is not None and img_size <= 0:
        raise ModelBuildError(f"img_size={img_size}: must be positive")
    if register_entry is not None and register_entry not in REGISTER_ENTRIES:
        raise ModelBuildError(f"register_entry={register_entry!r}: allowed: {', '.join(REGISTER_ENTRIES)}")
    wanted_entry = frozen_blocks if register_entry == "after_frozen" else None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        held = read_checkpoint(path, name)
        if isinstance(held, dict):
            if name is None:
                raise ModelBuildError(f"checkpoint {path} does not name its model; pass the timm name")
            weights = _unwrap(held)
            if "reg_token" in weights and _builtin_registers(name, architecture) == 0:
                held = saved_model_from_state_dict(path, "timm state dict with added registers", weights)
        if isinstance(held, SavedModel):
            model = _build_saved(held, path, name, img_size, registers, num_classes, drop_path_rate, architecture)
            if register_entry is not None and wanted_entry != held.register_entry_block:
                raise ModelBuildError(
                    f"checkpoint {path} holds registers entering at {_entry_text(held.register_entry_block)}; asked "
                    f"for register_entry={register_entry!r} with frozen_blocks={frozen_blocks} (at "
                    f"{_entry_text(wanted_entry)}); omit register_entry to take the file's"
                )
            set_register_entry_block(model, held.register_entry_block)
            return freeze_blocks(model, frozen_blocks)
        model = _build_original(name, path, held, img_size, num_classes, drop_path_rate, architecture)
    else:
        if name is None:
            raise ModelBuildError("build_model needs a timm model name, or a checkpoint file that names its model")
        model = _build_fresh(name, pretrained, img_size, num_classes, drop_path_rate, architecture)
    if registers is not None:
        existing = count_registers(model)
        if existing and registers != existing:
            raise ModelBuildError(f"{name!r} already has {existing} registers; asked for registers={registers}")
        if not existing:
            add_registers(model, registers, init_std=register_init_std)
    set_register_entry_block(model, wanted_entry)
    return freeze_blocks(model, frozen_blocks)


def _entry_text(block: int | None) -> str:
    return "the input" if block is None else f"block {block}"


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        base = name.split(".")[0]
        candidates = [m for m in timm.list_models(f"*{base.split('_')[0]}*")][:12]
        raise ModelBuildError(f"unknown model {name!r}; timm models with that stem: {candidates}")


def _check_vit(model: nn.Module, name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ModelBuildError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def _build_fresh(
    name: str, pretrained: bool, img_size: int | None, num_classes: int | None, drop_path_rate: float,
    architecture: dict[str, Any],
) -> VisionTransformer:  # fmt: skip
    """Random init, or timm's hub weights (DINOv2: loaded at their own resolution, then resampled officially)."""
    kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate, **architecture}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    resample_to = img_size if pretrained and is_dinov2(name) else None
    if img_size is not None and resample_to is None:
        kwargs["img_size"] = img_size
    if not pretrained:
        return _check_vit(timm.create_model(name, pretrained=False, **kwargs), name)
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # hub, network and cache errors all end here
        raise ModelBuildError(
            f"could not fetch pretrained weights for {name!r} from timm's hub ({type(error).__name__}: "
            f"{error}); with no network, pass checkpoint=<local .pth or .safetensors file>"
        ) from error
    model = _check_vit(model, name)
    return set_img_size(model, resample_to) if resample_to is not None else model


def _unwrap(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights inside an original-layout file, as timm's filter finds them ({'model': ...}, {'state_dict'})."""
    weights = raw.get("model", raw)
    weights = weights.get("state_dict", weights) if isinstance(weights, Mapping) else weights
    return weights if isinstance(weights, Mapping) else raw


def _builtin_registers(name: str, architecture: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **architecture)
    return count_registers(model)


def _build_original(
    name: str, path: Path, raw: dict[str, Any], img_size: int | None, num_classes: int | None,
    drop_path_rate: float, architecture: dict[str, Any],
) -> VisionTransformer:  # fmt: skip
    """An original-layout file through timm's filter, with every key matched (a replaced classifier excepted)."""
    weights = _unwrap(raw)
    kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate, **architecture}
    if img_size is not None:
        kwargs["img_size"] = img_size
    file_head = weights.get("head.weight")
    if num_classes is not None or isinstance(file_head, torch.Tensor):  # None: the file's classifier size
        kwargs["num_classes"] = num_classes if num_classes is not None else int(file_head.shape[0])
    try:
        model = _check_vit(timm.create_model(name, pretrained=False, **kwargs), name)
        target = int(model.patch_embed.img_size[0])
        pos_embed = weights.get("pos_embed")
        side = grid_side(pos_embed.shape[1]) if isinstance(pos_embed, torch.Tensor) else None
        if is_dinov2(name) and side is not None:
            set_img_size(model, side * model.patch_embed.patch_size[0])  # load at the file's grid, resample below
        flexi = "flexi" in name  # as timm's _create_vision_transformer: FlexiViT weights resample bilinearly
        state_dict = checkpoint_filter_fn(
            dict(weights), model, adapt_layer_scale=True, interpolation="bilinear" if flexi else "bicubic",
            antialias=not flexi,
        )  # fmt: skip
        model_state = model.state_dict()
        head_keys = {"head.weight", "head.bias"} & (set(model_state) | set(state_dict))
        new_head = num_classes is not None and any(
            key not in state_dict or key not in model_state or state_dict[key].shape != model_state[key].shape
            for key in head_keys
        )
        if new_head:  # asked for another classifier: the file's is not loaded, the new one keeps its init
            state_dict = {key: value for key, value in state_dict.items() if key not in head_keys}
        result = model.load_state_dict(state_dict, strict=False)
    except ModelBuildError:
        raise
    except Exception as error:  # timm's filter and the load fail in many ways on a wrong file; all end here
        raise ModelBuildError(
            f"checkpoint {path} does not fit model {name!r}: {type(error).__name__}: {error}"
        ) from error
    missing = sorted(set(result.missing_keys) - (head_keys if new_head else set()))
    if missing or result.unexpected_keys:
        raise ModelBuildError(
            f"checkpoint {path} does not fit model {name!r}: missing keys {missing}, unexpected keys "
            f"{sorted(result.unexpected_keys)} (nothing loads partially)"
        )
    return set_img_size(model, target)


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


def _build_saved(
    saved: SavedModel, path: Path, name: str | None, img_size: int | None, registers: int | None,
    num_classes: int | None, drop_path_rate: float, architecture: dict[str, Any],
) -> VisionTransformer:  # fmt: skip
    """A whole trained model: built with the file's registers and head first, then loaded key for key."""
    timm_name = saved.timm_name or name
    if timm_name is None:
        raise ModelBuildError(f"checkpoint {path} ({saved.kind}) does not name its model; pass the timm name")
    _check_name(timm_name)
    if name is not None and name.split(".")[0] != timm_name.split(".")[0]:
        raise ModelBuildError(f"checkpoint {path} holds a {timm_name!r} model; asked for {name!r}")
    if registers is not None and registers != saved.registers:
        raise ModelBuildError(
            f"checkpoint {path} holds {saved.registers} registers; asked for registers={registers} (omit "
            f"registers to take the file's; vitreg.add_registers adds registers to a model that has none)"
        )
    if num_classes is not None and num_classes != saved.num_classes:
        raise ModelBuildError(
            f"checkpoint {path} holds a {saved.num_classes}-class head; asked for num_classes={num_classes} "
            f"(omit num_classes to take the file's; model.reset_classifier gives a new head)"
        )
    kwargs = dict(architecture)
    if saved.model_kwargs is not None:
        for key, value in architecture.items():
            held = saved.model_kwargs.get(key, "<architecture default>")
            if key not in RUNTIME_OPTIONS and (key not in saved.model_kwargs or not _same_json(held, value)):
                raise ModelBuildError(f"checkpoint {path} was built with {key}={held!r}; asked for {key}={value!r}")
        kwargs = {**saved.model_kwargs, **architecture}
    try:
        model = timm.create_model(
            timm_name, pretrained=False, img_size=saved.img_size, num_classes=saved.num_classes,
            drop_path_rate=drop_path_rate, **kwargs,
        )  # fmt: skip
    except TypeError as error:  # an option timm does not know
        raise ModelBuildError(f"cannot build {timm_name!r} with {kwargs} for checkpoint {path}: {error}") from error
    model = _check_vit(model, timm_name)
    builtin = count_registers(model)
    if builtin and builtin != saved.registers:
        raise ModelBuildError(
            f"{timm_name!r} has {builtin} registers built in; checkpoint {path} holds {saved.registers}"
        )
    if not builtin:
        add_registers(model, saved.registers)
    try:
        model.load_state_dict(saved.state_dict, strict=True)
    except RuntimeError as error:
        raise ModelBuildError(f"checkpoint {path} ({saved.kind}) does not fit model {timm_name!r}: {error}") from error
    return set_img_size(model, img_size) if img_size is not None else model
