"""Independent computations the tests hold the code against, written out from a model's weights."""

from __future__ import annotations

import torch

import vitreg


@torch.no_grad()
def explicit_prefix_attention(
    model: torch.nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block: the head-mean softmax(q k^T / sqrt(d)) rows of CLS and each register over every token, and every
    token's output and its L2 norm; through timm's plain blocks on `[CLS, REG..., PATCH...]`, no taps or hooks.

    Returns: rows (B, L, 1 + R, T), norms (B, L, T), outputs (B, L, T, C) (pre-norm).
    """
    prefix = 1 + vitreg.count_registers(model)
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))  # (B, T, C)
    rows, outputs = [], []
    for block in model.blocks:
        attn = block.attn
        batch, count, channels = tokens.shape
        qkv = attn.qkv(block.norm1(tokens)).reshape(batch, count, 3, attn.num_heads, channels // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1).mean(dim=1)  # (B, T, T)
        tokens = block(tokens)
        rows.append(weights[:, :prefix])
        outputs.append(tokens)
    outputs = torch.stack(outputs, 1)
    return torch.stack(rows, 1), outputs.norm(dim=-1), outputs
