"""Every study architecture, built small with registers, against a forward written by hand from its weights.

The oracle below reads only the weights: a strided convolution for the patches, the family's token order and
position convention written out explicitly, then per block `x + ls1 * attn(norm1(x))` and
`x + ls2 * mlp(norm2(x))` with an explicit softmax(q k^T / sqrt(d)), the final LayerNorm, CLS pooling and the
head. Token order is `[CLS, REG..., PATCH...]`; registers never carry a position. Where the position embedding
covers CLS (DINO, DINOv2), it is added to `[CLS, PATCH...]` before the registers are inserted; on `no_embed_class`
models (DeiT-III, timm's DINOv2-with-registers) it covers the patches only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitreg

EMBED_DIM = 64
HEADS = 2
DEPTH = 2
CLASSES = 5
GRID = 4  # patches per side
BATCH = 2
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Family:
    name: str  # timm model name
    patch: int
    registers: int
    builtin_registers: bool  # the architecture has them (timm's reg4 DINOv2) rather than vitreg adding them
    position_covers_cls: bool  # else position only on the patches (no_embed_class)
    layer_scale: bool


FAMILIES = [
    Family("deit3_small_patch16_224", 16, 2, False, position_covers_cls=False, layer_scale=True),
    Family("vit_small_patch16_224.dino", 16, 2, False, position_covers_cls=True, layer_scale=False),
    Family("vit_small_patch14_dinov2", 14, 2, False, position_covers_cls=True, layer_scale=True),
    # timm folds the official CLS position into cls_token when it converts these weights, so its layout is
    # position on patches only.
    Family("vit_small_patch14_reg4_dinov2", 14, 4, True, position_covers_cls=False, layer_scale=True),
]


def randomise(model: nn.Module, seed: int) -> None:
    """Weights far from their inits, so registers, positions, LayerScale gammas and biases all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name in {"cls_token", "reg_token"}:
                parameter.copy_(noise)
            elif name == "pos_embed":
                parameter.copy_(0.5 * noise)
            elif name.endswith("gamma"):
                parameter.copy_(0.5 + 0.3 * noise)
            elif parameter.ndim >= 2:  # conv and linear weights: unit-variance outputs
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            else:  # biases
                parameter.copy_(0.2 * noise)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def attention(x: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention from the qkv and proj weights; returns (output, weights (B, H, T, T))."""
    batch, tokens, channels = x.shape
    head_dim = channels // HEADS
    qkv = linear(x, module.qkv).reshape(batch, tokens, 3, HEADS, head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # each (B, H, T, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return linear(out, module.proj), weights


def mlp(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    hidden = linear(x, module.fc1)
    hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # exact GELU
    return linear(hidden, module.fc2)


def gamma(layer_scale: nn.Module, family: Family) -> torch.Tensor | float:
    return layer_scale.gamma if family.layer_scale else 1.0


def oracle(model: nn.Module, images: torch.Tensor, family: Family) -> dict[str, torch.Tensor]:
    """The forward written out from the weights: pre-norm tokens, last-block attention and logits."""
    batch = images.shape[0]
    proj = model.patch_embed.proj
    patches = F.conv2d(images, proj.weight, proj.bias, stride=family.patch)  # (B, C, rows, cols)
    patches = patches.flatten(2).transpose(1, 2)  # (B, N, C), row-major
    cls = model.cls_token.expand(batch, -1, -1)
    registers = model.reg_token.expand(batch, -1, -1)
    if family.position_covers_cls:
        positioned = torch.cat([cls, patches], dim=1) + model.pos_embed
        x = torch.cat([positioned[:, :1], registers, positioned[:, 1:]], dim=1)
    else:
        x = torch.cat([cls, registers, patches + model.pos_embed], dim=1)
    for block in model.blocks:
        attended, weights = attention(layer_norm(x, block.norm1), block.attn)
        x = x + gamma(block.ls1, family) * attended
        x = x + gamma(block.ls2, family) * mlp(layer_norm(x, block.norm2), block.mlp)
    logits = linear(layer_norm(x, model.norm)[:, 0], model.head)
    return {"tokens": x, "attention": weights, "logits": logits}


def build(family: Family) -> nn.Module:
    model = vitreg.build_model(
        family.name, pretrained=False, img_size=GRID * family.patch, registers=family.registers,
        depth=DEPTH, embed_dim=EMBED_DIM, num_heads=HEADS, num_classes=CLASSES,
    )  # fmt: skip
    randomise(model, seed=len(family.name))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_forward_matches_hand_written_oracle(family: Family) -> None:
    plain = vitreg.build_model(family.name, depth=DEPTH, embed_dim=EMBED_DIM, num_heads=HEADS)
    assert vitreg.models.count_registers(plain) == (family.registers if family.builtin_registers else 0)
    model = build(family)
    assert vitreg.models.count_registers(model) == family.registers
    assert model.num_prefix_tokens == 1 + family.registers
    assert model.pos_embed.shape == (1, GRID * GRID + int(family.position_covers_cls), EMBED_DIM)
    assert isinstance(model.blocks[0].ls1, nn.Identity) != family.layer_scale
    images = torch.randn(BATCH, 3, GRID * family.patch, GRID * family.patch, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected = oracle(model, images, family)
        logits = model(images)
        features = model.forward_features(images)  # after the final norm
        taps = vitreg.run_taps(model, images, attention_layers=[DEPTH - 1], keep_block_outputs=[DEPTH - 1])

    tokens = 1 + family.registers + GRID * GRID
    assert expected["tokens"].shape == (BATCH, tokens, EMBED_DIM)
    assert logits.abs().max() > 0.1  # the comparison below is not of near-zero numbers
    assert expected["attention"].max() > 3 / tokens  # attention far from uniform: the token contents matter
    torch.testing.assert_close(logits, expected["logits"], atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(taps.logits, expected["logits"], atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(taps.block_outputs[DEPTH - 1], expected["tokens"], atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(features, layer_norm(expected["tokens"], model.norm), atol=TOLERANCE, rtol=TOLERANCE)
    # run_taps' explicit CLS and register rows of the last block's attention.
    torch.testing.assert_close(taps.cls_attention[0], expected["attention"][:, :, 0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        taps.register_attention[0], expected["attention"][:, :, 1 : 1 + family.registers].transpose(1, 2),
        atol=TOLERANCE, rtol=0,
    )  # fmt: skip
    norms = expected["tokens"].norm(dim=-1)
    torch.testing.assert_close(taps.register_norms[-1], norms[:, 1 : 1 + family.registers], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(taps.patch_norms[-1], norms[:, 1 + family.registers :], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_registers_change_the_output(family: Family) -> None:
    """The registers take part in attention: changing them changes CLS's output (they are not inert)."""
    model = build(family)
    images = torch.randn(BATCH, 3, GRID * family.patch, GRID * family.patch, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(images)
        # Not a constant shift: LayerNorm would erase that.
        model.reg_token.add_(torch.randn(model.reg_token.shape, generator=torch.Generator().manual_seed(3)))
        after = model(images)
        expected = oracle(model, images, family)["logits"]
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, expected, atol=TOLERANCE, rtol=TOLERANCE)
