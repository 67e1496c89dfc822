"""Weights files: our self-describing model file, and reading every checkpoint `build_model` accepts.

A **vitreg model file** is a safetensors file whose tensors are the model's `state_dict()` in timm's layout and
whose metadata says what model they belong to (`ModelFileInfo`): timm name, registers, input size, classes,
frozen blocks, the block the registers enter at (when not the input), timm architecture overrides, the register
convention and, if given, the training run. So a
fine-tuned model reloads as itself with `vitreg.build_model(checkpoint=path)`, with nothing to remember.

`read_checkpoint` tells apart what a weights file holds:
- a vitreg model file (safetensors with `format` = "vitreg.model" metadata);
- a training `state.pt` (a dict with "model", the state dict, and "config", the run's TrainConfig dict);
- the study's fine-tuned DeiT-III files (vit-reg/vit-reg, `DEIT-III/main.py`): `{'model': state_dict, 'args':
  Namespace, 'model_ema': ..., 'optimizer': ..., ...}` in DeiT-III's original layout (`blocks.N.gamma_1`) with
  `register_tokens` of shape (R, D), which its forward appends *after* the patches. Token order does not change
  any output (attention is permutation-equivariant and registers carry no position embedding), so they become
  our `reg_token` (1, R, D), placed after CLS. The `model` weights are read, not `model_ema`;
- a timm-layout state dict that holds an added `reg_token` (e.g. a saved `model.state_dict()` of ours);
- anything else is returned as raw weights in an original layout (DeiT-III, DINOv2, timm; timm's filter reads it).
The first four are `SavedModel`s: `build_model` builds their architecture with the file's registers and head
before loading and then requires an exact key match.

Pickles are read with `torch.load(weights_only=True)` (plus `argparse.Namespace`, which the study's files hold),
so a file that would run code when loaded is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
MODEL_FILE_FORMAT = "vitreg.model"
MODEL_FILE_VERSION = 2  # the newest version this code reads and writes
# Version 2 added `register_entry_block`; a file without one is written as version 1, so older readers still read
# it, and refuse (rather than misbuild) a model whose registers enter after the input.
FIRST_VERSION_WITH_ENTRY = 2
# Our register convention: reg_token (1, R, D) inserted after CLS, no position embedding: [CLS, REG..., PATCH...].
TOKEN_ORDER = "cls,registers,patches"


class ModelBuildError(ValueError):
    """A model could not be built as asked (unknown name, bad checkpoint, bad register or freeze request)."""


@dataclass(frozen=True)
class ModelFileInfo:
    """The metadata of a vitreg model file: everything needed to rebuild the model its tensors belong to.

    Attributes:
        timm_name: the timm model name the model was built from (with its pretrained tag, if any).
        registers: register tokens the model holds (`reg_token` (1, R, D), or 0).
        img_size: input resolution the position embedding is laid out for (square).
        num_classes: classifier size (0: no head).
        frozen_blocks: blocks that were frozen when it was trained (a record; loading does not freeze).
        register_entry_block: the block at whose input the registers join (`vitreg.set_register_entry_block`);
            None: at the model's input. Part of the architecture: loading rebuilds it.
        model_kwargs: timm architecture overrides it was built with (depth, embed_dim, ...).
        token_order: the register convention, `TOKEN_ORDER`.
        training_run_id: the training run's MLflow run id, if any.
        training_run_dir: the training run's directory (storage path), if any.
        extra: any further JSON-ready facts the writer chose to keep.
        format_version: version of this file format.
    """

    timm_name: str
    registers: int
    img_size: int
    num_classes: int
    frozen_blocks: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    token_order: str = TOKEN_ORDER
    training_run_id: str | None = None
    training_run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1
    register_entry_block: int | None = None

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata (str -> str): numbers as decimal text, dicts as JSON."""
        version = self.format_version
        if self.register_entry_block is not None:
            version = max(version, FIRST_VERSION_WITH_ENTRY)
        metadata = {
            "format": MODEL_FILE_FORMAT,
            "format_version": str(version),
            "timm_name": self.timm_name,
            "registers": str(self.registers),
            "img_size": str(self.img_size),
            "num_classes": str(self.num_classes),
            "frozen_blocks": str(self.frozen_blocks),
            "model_kwargs": json.dumps(self.model_kwargs, sort_keys=True),
            "token_order": self.token_order,
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        if self.register_entry_block is not None:
            metadata["register_entry_block"] = str(self.register_entry_block)
        if self.training_run_id is not None:
            metadata["training_run_id"] = self.training_run_id
        if self.training_run_dir is not None:
            metadata["training_run_dir"] = self.training_run_dir
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], path: Path) -> ModelFileInfo:
        if metadata.get("format") != MODEL_FILE_FORMAT:
            raise ModelBuildError(f"{path} is not a vitreg model file (metadata format={metadata.get('format')!r})")
        try:
            version = int(metadata["format_version"])
            if version > MODEL_FILE_VERSION:
                raise ModelBuildError(
                    f"{path}: model file format version {version}; this vitreg reads up to {MODEL_FILE_VERSION}"
                )
            if metadata["token_order"] != TOKEN_ORDER:
                raise ModelBuildError(f"{path}: token_order={metadata['token_order']!r}; expected {TOKEN_ORDER!r}")
            return cls(
                timm_name=metadata["timm_name"],
                registers=int(metadata["registers"]),
                img_size=int(metadata["img_size"]),
                num_classes=int(metadata["num_classes"]),
                frozen_blocks=int(metadata["frozen_blocks"]),
                model_kwargs=json.loads(metadata["model_kwargs"]),
                token_order=metadata["token_order"],
                training_run_id=metadata.get("training_run_id"),
                training_run_dir=metadata.get("training_run_dir"),
                extra=json.loads(metadata.get("extra", "{}")),
                format_version=version,
                register_entry_block=_optional_int(metadata.get("register_entry_block")),
            )
        except (KeyError, ValueError) as error:
            if isinstance(error, ModelBuildError):
                raise
            raise ModelBuildError(
                f"{path}: broken vitreg model file metadata ({type(error).__name__}: {error})"
            ) from error


def _optional_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def save_model_file(
    model: nn.Module,
    path: str | Path,
    *,
    timm_name: str,
    frozen_blocks: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    training_run_id: str | None = None,
    training_run_dir: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ModelFileInfo:
    """Write `model` as a vitreg model file (safetensors + metadata) that `build_model(checkpoint=path)` reloads.

    Registers, input size, classes and where the registers enter are read from the model itself. Before anything
    is written, the model is checked against a weightless rebuild from `timm_name` + `model_kwargs`: every key and
    shape must match, so a written file always loads back. The file is written next to `path` and renamed into
    place (never half-written).

    Args:
        model: the (unwrapped, not DDP) timm VisionTransformer, as `vitreg.build_model` built it.
        path: destination, ending in `.safetensors`.
        timm_name: the timm name it was built from (keep the pretrained tag: it names the data config).
        frozen_blocks: blocks frozen in its training (a record only).
        model_kwargs: the timm architecture overrides it was built with (JSON-ready values).
        training_run_id, training_run_dir: the training run that produced it (MLflow run id, run directory).
        extra: further JSON-ready facts to keep (e.g. epoch, top-1).

    Returns:
        The metadata written.
    """
    from vitreg.models import build_model, count_registers, register_entry_block  # models imports this module

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelBuildError(f"model file {path}: must end in .safetensors")
    img_height, img_width = model.patch_embed.img_size
    if img_height != img_width:
        raise ModelBuildError(f"model file {path}: img_size {(img_height, img_width)} is not square")
    num_classes = model.head.out_features if isinstance(model.head, nn.Linear) else 0
    kwargs = dict(model_kwargs or {})
    try:
        json.dumps(kwargs), json.dumps(dict(extra or {}))
    except TypeError as error:
        raise ModelBuildError(f"model file {path}: model_kwargs and extra must be JSON-ready: {error}") from error
    info = ModelFileInfo(
        timm_name=timm_name,
        registers=count_registers(model),
        img_size=int(img_height),
        num_classes=int(num_classes),
        frozen_blocks=frozen_blocks,
        model_kwargs=kwargs,
        training_run_id=training_run_id,
        training_run_dir=None if training_run_dir is None else str(training_run_dir),
        extra=dict(extra or {}),
        register_entry_block=register_entry_block(model),
    )
    with torch.device("meta"):
        reference = build_model(
            timm_name,
            img_size=info.img_size,
            num_classes=info.num_classes,
            registers=info.registers,
            frozen_blocks=frozen_blocks,
            **kwargs,
        )
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in state_dict.items()}
    if actual != expected:
        differ = sorted(key for key in set(actual) | set(expected) if actual.get(key) != expected.get(key))
        raise ModelBuildError(
            f"model file {path}: the model does not match {timm_name!r} with model_kwargs={kwargs}, "
            f"{info.registers} registers, {info.num_classes} classes at {info.img_size} px; keys that differ: "
            + ", ".join(f"{key} (model {actual.get(key)}, rebuilt {expected.get(key)})" for key in differ[:8])
        )
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state_dict, str(partial), metadata=info.to_metadata())
    os.replace(partial, path)
    return info


def read_model_file_info(path: str | Path) -> ModelFileInfo:
    """The metadata of a vitreg model file, read from its header only (no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # missing, truncated or not safetensors: all reported with the file
        raise ModelBuildError(f"cannot read model file {path}: {type(error).__name__}: {error}") from error
    return ModelFileInfo.from_metadata(metadata, path)


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelFileInfo]:
    """The state dict (CPU) and metadata of a vitreg model file; its tensors are checked against the metadata."""
    from safetensors.torch import load_file

    path = Path(path)
    info = read_model_file_info(path)
    try:
        state_dict = load_file(str(path), device="cpu")
    except Exception as error:  # a truncated body passes the header read
        raise ModelBuildError(f"cannot read model file {path}: {type(error).__name__}: {error}") from error
    _check_agrees(path, "metadata", info.registers, info.num_classes, info.img_size, state_dict)
    return state_dict, info


@dataclass(frozen=True)
class SavedModel:
    """A whole trained model read from a file: its timm-layout state dict and what it was built as.

    `timm_name` and `model_kwargs` are None where the file does not say them (the study's files, bare state
    dicts): the caller's request is used. `registers`, `num_classes` and `img_size` always come from the tensors.
    """

    kind: str
    state_dict: dict[str, torch.Tensor]
    registers: int
    num_classes: int
    img_size: int
    timm_name: str | None = None
    model_kwargs: dict[str, Any] | None = None
    info: ModelFileInfo | None = None
    register_entry_block: int | None = None


def read_checkpoint(path: Path, model_name: str | None) -> SavedModel | dict[str, Any]:
    """What a weights file holds: a `SavedModel` (kinds above), or the raw object of an original-layout file.

    `model_name` is only used in error messages.
    """
    for_model = f" for model {model_name!r}" if model_name else ""
    if not path.is_file():
        raise ModelBuildError(f"checkpoint{for_model} not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelBuildError(
            f"checkpoint {path}{for_model}: unknown format {path.suffix!r}; expected one of "
            f"{', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") == MODEL_FILE_FORMAT:
                state_dict, info = read_model_file(path)
                return SavedModel(
                    "vitreg model file", state_dict, info.registers, info.num_classes, info.img_size,
                    info.timm_name, info.model_kwargs, info, info.register_entry_block,
                )  # fmt: skip
            raw: Any = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except ModelBuildError:
        raise
    except Exception as error:  # any reader failure is reported with the file and the model
        raise ModelBuildError(f"cannot read checkpoint {path}{for_model}: {error}") from error
    return _classify(path, raw)


def _classify(path: Path, raw: Any) -> SavedModel | dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ModelBuildError(f"cannot read checkpoint {path}: holds a {type(raw).__name__}, not a state dict")
    config = raw.get("config")
    if isinstance(raw.get("model"), Mapping) and isinstance(config, Mapping) and isinstance(config.get("model"), str):
        return _training_state(path, dict(raw["model"]), config)
    weights = raw.get("model", raw)
    if not isinstance(weights, Mapping):
        return dict(raw)
    register_tokens = weights.get("register_tokens")
    if isinstance(register_tokens, torch.Tensor) and register_tokens.dim() == 2 and "mask_token" not in weights:
        return saved_model_from_state_dict(path, "study DeiT-III file", _study_to_timm(weights))
    return dict(raw)


def _training_state(path: Path, state_dict: dict[str, torch.Tensor], config: Mapping[str, Any]) -> SavedModel:
    """A training `state.pt`: the state dict is the truth; the config's non-None values must agree with it."""
    saved = saved_model_from_state_dict(path, "training state", state_dict)
    stated = {key: config.get(key) for key in ("registers", "num_classes", "img_size")}
    _check_agrees(path, "config", stated["registers"], stated["num_classes"], stated["img_size"], state_dict)
    kwargs = config.get("model_kwargs") or {}
    # The run's TrainConfig: register_entry "after_frozen" put the registers at block frozen_blocks.
    entry = config.get("frozen_blocks") if config.get("register_entry") == "after_frozen" else None
    return SavedModel(
        saved.kind, state_dict, saved.registers, saved.num_classes, saved.img_size, config["model"], dict(kwargs),
        register_entry_block=entry,
    )  # fmt: skip


def saved_model_from_state_dict(path: Path, kind: str, state_dict: Mapping[str, torch.Tensor]) -> SavedModel:
    """A timm-layout state dict with added registers, described from its tensors alone (no name, no kwargs)."""
    state_dict = dict(state_dict)
    registers, num_classes = _registers_in(state_dict), _classes_in(state_dict)
    return SavedModel(kind, state_dict, registers, num_classes, _img_size_in(path, state_dict))


def _study_to_timm(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The study's DeiT-III layout -> timm's: gamma_1/2 -> ls1/2.gamma; register_tokens (R, D) -> reg_token."""
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key == "register_tokens":
            state_dict["reg_token"] = value.unsqueeze(0)  # (1, R, D); placed after CLS by our model
        else:
            state_dict[key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = value
    return state_dict


def _registers_in(state_dict: Mapping[str, torch.Tensor]) -> int:
    reg_token = state_dict.get("reg_token")
    return 0 if reg_token is None else int(reg_token.shape[1])


def _classes_in(state_dict: Mapping[str, torch.Tensor]) -> int:
    head = state_dict.get("head.weight")
    return 0 if head is None else int(head.shape[0])


def grid_side(pos_embed_tokens: int) -> int | None:
    """Side of the square patch grid of a position embedding with `pos_embed_tokens` rows (with or without one
    CLS row: of two consecutive counts > 1 only one is a square), or None if neither is square."""
    for patches in (pos_embed_tokens, pos_embed_tokens - 1):
        side = math.isqrt(max(patches, 0))
        if patches > 1 and side * side == patches:
            return side
    return None


def _img_size_in(path: Path, state_dict: Mapping[str, torch.Tensor]) -> int:
    pos_embed, proj = state_dict.get("pos_embed"), state_dict.get("patch_embed.proj.weight")
    if pos_embed is None or proj is None:
        raise ModelBuildError(f"checkpoint {path}: no pos_embed / patch_embed.proj.weight; not a ViT state dict")
    side = grid_side(pos_embed.shape[1])
    if side is None:
        raise ModelBuildError(f"checkpoint {path}: pos_embed {tuple(pos_embed.shape)} is not a square patch grid")
    return side * int(proj.shape[-1])


def _check_agrees(
    path: Path,
    source: str,
    registers: int | None,
    num_classes: int | None,
    img_size: int | None,
    state_dict: Mapping[str, torch.Tensor],
) -> None:
    """The file's own description (metadata or config) must agree with its tensors; None is not checked."""
    actual = {"registers": _registers_in(state_dict), "num_classes": _classes_in(state_dict)}
    if img_size is not None:
        actual["img_size"] = _img_size_in(path, state_dict)
    stated = {"registers": registers, "num_classes": num_classes, "img_size": img_size}
    for key, value in actual.items():
        if stated[key] is not None and stated[key] != value:
            raise ModelBuildError(f"checkpoint {path} is inconsistent: its {source} says {key}={stated[key]}, "
                                  f"its tensors hold {key}={value}")  # fmt: skip
