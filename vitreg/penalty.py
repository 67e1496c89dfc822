"""The study's L2-norm penalty on patch tokens, and a hook that captures a block's pre-norm output in training."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitreg.models import register_entry_block


def l2_norm_penalty(block_output: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Mean over images and patch tokens of the (unsquared) L2 norm of each patch token.

    Args:
        block_output: (B, T, C) pre-norm tokens in the model's order `[CLS, REG..., PATCH...]`.
        num_prefix_tokens: CLS + registers, excluded from the penalty.
    """
    patches = block_output[:, num_prefix_tokens:]  # (B, N, C)
    if patches.shape[1] == 0:
        raise ValueError("l2_norm_penalty: no patch tokens after the prefix")
    return patches.float().norm(dim=-1).mean()


class BlockOutputCapture:
    """Forward hook that keeps the output of one block (with its graph) for the penalty.

    Use it around the normal (possibly DDP-wrapped, fused-attention) forward, so training needs no second path:

        capture = BlockOutputCapture(model, block=-1)
        logits = ddp_model(images)
        loss = ce + lam * l2_norm_penalty(capture.output, model.num_prefix_tokens)
    """

    def __init__(self, model: VisionTransformer, block: int = -1) -> None:
        depth = len(model.blocks)
        index = block + depth if block < 0 else block
        if not 0 <= index < depth:
            raise ValueError(f"penalty block {block} out of range for a model of depth {depth}")
        entry = register_entry_block(model)
        if entry is not None and index < entry:
            raise ValueError(
                f"penalty block {block} (block {index}) is before block {entry}, where the registers enter: its "
                f"output is computed without autograd and holds no registers; penalise block {entry} or later"
            )
        self.block_index = index
        self.output: torch.Tensor | None = None
        self._handle = model.blocks[index].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.output = output

    def pop(self) -> torch.Tensor:
        """The captured output of the last forward; cleared so a stale tensor is never reused."""
        if self.output is None:
            raise RuntimeError(f"block {self.block_index} produced no output since the last pop()")
        output, self.output = self.output, None
        return output

    def remove(self) -> None:
        self._handle.remove()
