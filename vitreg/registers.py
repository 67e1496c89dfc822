"""Registers as tokens: adding them to a ViT, counting them, and where they join the token stream.

Registers are extra prefix tokens: token order `[CLS, REG..., PATCH...]`, no position embedding (DINO-style models
whose position embedding covers CLS get `PositionFreeRegistersViT`, which adds it before inserting them). They join
at the input (the study's way, `register_entry="input"`) or, with `set_register_entry_block`, at the input of block
k: the prefix before it then runs under `torch.no_grad()` (`register_entry="after_frozen"`).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitreg.model_files import ModelBuildError

# Where the registers join the token stream: at the input (the study's), or at the first trainable block.
REGISTER_ENTRIES = ("input", "after_frozen")


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


class _LateRegisters:
    """Mixin of a ViT whose registers enter at block `register_entry_block` instead of at the input.

    Blocks before the entry see `[CLS, PATCH...]`; they, the embeddings and norm_pre form a frozen prefix that runs
    under `torch.no_grad()`, so no autograd graph is kept for it. The registers (no position embedding, our
    convention) are inserted after CLS at the entry block's input. No Python-side state changes in the forward
    (`torch.compile` and DDP see a fixed graph; the frozen prefix has no parameter that DDP waits for).
    """

    register_entry_block: int

    def tokens_before_entry(self, patches: torch.Tensor) -> torch.Tensor:
        """The stream that enters block 0: `[CLS, PATCH...]`, (B, 1 + N, C), from the patch embedding's output.

        The model's own `_pos_embed` (+ patch dropout, norm_pre, all per token) places the positions exactly as
        with input registers; the register rows it adds carry no position and are dropped again here.
        """
        x = self.norm_pre(self.patch_drop(self._pos_embed(patches)))  # (B, 1 + R + N, C)
        return torch.cat([x[:, :1], x[:, 1 + count_registers(self) :]], dim=1)  # (B, 1 + N, C)

    def insert_registers(self, x: torch.Tensor) -> torch.Tensor:
        """`[CLS, PATCH...]` -> `[CLS, REG..., PATCH...]`, (B, 1 + R + N, C); a model without registers: as is."""
        if self.reg_token is None:
            return x
        return torch.cat([x[:, :1], self.reg_token.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks: the prefix and the rest see different token counts")
        entry = self.register_entry_block
        with torch.no_grad():  # the frozen prefix: no graph kept, nothing to back-propagate through
            x = self.tokens_before_entry(self.patch_embed(x))
            for block in self.blocks[:entry]:
                x = block(x)
        x = self.insert_registers(x)
        rest = self.blocks[entry:]
        x = checkpoint_seq(rest, x) if self.grad_checkpointing and not torch.jit.is_scripting() else rest(x)
        return self.norm(x)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"forward_intermediates does not know registers entering at block {self.register_entry_block}; "
            "use vitreg.run_taps (keep_block_outputs=...)"
        )


class LateRegistersViT(_LateRegisters, VisionTransformer):
    """A `no_embed_class` ViT (DeiT-III, DINOv2) whose registers enter at block `register_entry_block`."""


class LatePositionFreeRegistersViT(_LateRegisters, PositionFreeRegistersViT):
    """A `PositionFreeRegistersViT` (DINO, ...) whose registers enter at block `register_entry_block`."""


_LATE_CLASSES: dict[type, type] = {
    VisionTransformer: LateRegistersViT,
    PositionFreeRegistersViT: LatePositionFreeRegistersViT,
}


def register_entry_block(model: nn.Module) -> int | None:
    """The block at whose input the registers join (`set_register_entry_block`); None: at the input, as usual."""
    return model.register_entry_block if isinstance(model, _LateRegisters) else None


def set_register_entry_block(model: VisionTransformer, block: int | None) -> VisionTransformer:
    """Make the registers enter at the input of block `block` (None: at the input, as built), in place.

    The weights are untouched; only the forward changes (see `_LateRegisters`): the prefix (embeddings, norm_pre,
    blocks < `block`) then runs under `torch.no_grad()`, so `freeze_blocks` always freezes it. A model without
    registers may be given an entry block too: then only its prefix runs without autograd.

    Args:
        model: a timm VisionTransformer whose registers (if any) carry no position embedding.
        block: 0..depth-1, or None.
    """
    base = (
        next(cls for cls in type(model).__mro__ if cls in _LATE_CLASSES) if isinstance(model, _LateRegisters) else None
    )
    if block is None:
        if base is not None:
            model.__class__ = base
            del model.register_entry_block
        return model
    blocks = depth(model)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < blocks:
        raise ModelBuildError(f"register entry block {block!r}: must be in 0..{blocks - 1} (a block that reads them)")
    current = base or type(model)
    if current not in _LATE_CLASSES:
        raise ModelBuildError(f"registers after the input: not supported for a {current.__name__} (a timm ViT only)")
    if count_registers(model) and current is VisionTransformer and not model.no_embed_class:
        raise ModelBuildError("this model's registers have position-embedding rows; they can only enter at the input")
    if model.cls_token is None:
        raise ModelBuildError("registers are placed after the CLS token; this model has none")
    model.__class__ = _LATE_CLASSES[current]
    model.register_entry_block = block
    return model


def count_registers(model: VisionTransformer) -> int:
    """Number of register tokens the model carries (0 for a plain ViT)."""
    return int(getattr(model, "num_reg_tokens", 0) or 0)


def depth(model: VisionTransformer) -> int:
    """Number of transformer blocks."""
    return len(model.blocks)


def prefix_token_counts(model: nn.Module) -> dict[str, int]:
    """Every cached prefix-token count in the model, by module name ("" is the model itself).

    timm copies `num_prefix_tokens` into some sub-modules when it builds them (PatchDropout; rotary attention
    layers), where adding registers later would leave it stale; pooling and `forward_intermediates` read the
    model's own attribute. All of them must agree.
    """
    return {name: int(module.num_prefix_tokens) for name, module in model.named_modules()
            if hasattr(module, "num_prefix_tokens")}  # fmt: skip


def add_registers(model: VisionTransformer, registers: int, init_std: float = 1e-6) -> VisionTransformer:
    """Give a ViT that has no registers `registers` new ones, in place; every existing weight is untouched.

    Every cached prefix count (`prefix_token_counts`: the model's, patch dropout's) then counts them, so patch
    dropout never drops a register and average pooling skips them.

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
    for module in model.modules():
        if hasattr(module, "num_prefix_tokens"):
            module.num_prefix_tokens = model.num_prefix_tokens
    if not model.no_embed_class:
        # DeiT-III-style models (no_embed_class) already concatenate reg_token after adding positions.
        entry = register_entry_block(model)
        set_register_entry_block(model, None)
        model.__class__ = PositionFreeRegistersViT
        set_register_entry_block(model, entry)  # a late entry stays where it was
    return model
