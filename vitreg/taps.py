"""One forward pass that also returns token norms and attention, for the layers asked for.

Norms are measured on the pre-norm residual stream (each block's output, before the final LayerNorm, where the
outliers live). Attention weights are never materialised by timm's fused kernel, so the tapped layers swap
their `attn` for `TappedAttention`: the same projections, the fused kernel still computes the block's output,
and only the asked-for query rows (CLS and registers) get an explicit softmax(q k^T / sqrt(d)). Memory for those
rows is O(layers x heads x tokens); a full (tokens x tokens) map is computed only for `full_attention_layers`.

Registers that enter at block k (`vitreg.set_register_entry_block`) do not exist in blocks < k: there the taps
hold NaN for every register entry (register norms, register attention rows, attention columns of registers, the
register rows of kept block outputs), so every tensor keeps the model's token order `[CLS, REG..., PATCH...]` and
the patch columns stay aligned at every layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitreg.models import count_registers, register_entry_block


class TapError(ValueError):
    """A tap request that cannot be served (bad layer index, unsupported attention module)."""


class TappedAttention(nn.Module):
    """timm `Attention` that also records the attention weights of some of its queries.

    Args:
        attention: the block's timm Attention module (its weights are shared, not copied).
        queries: an int n records the rows of queries 0..n-1 (CLS and registers), -1 every row; a (B, Q) tensor
            of token indices records those queries' rows, per image.
    """

    def __init__(self, attention: Attention, queries: int | torch.Tensor) -> None:
        super().__init__()
        self.inner = attention
        self.queries = queries
        self.recorded: torch.Tensor | None = None  # (B, H, rows, N)

    def _query_rows(self, q: torch.Tensor) -> torch.Tensor:
        """The asked-for rows of q (B, H, N, D)."""
        if isinstance(self.queries, torch.Tensor):
            index = self.queries.to(q.device)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
            return q.gather(2, index)  # (B, H, Q, D)
        return q if self.queries < 0 else q[:, :, : self.queries]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        inner = self.inner
        batch, tokens, _ = x.shape
        gate = inner.gate(x).sigmoid() if getattr(inner, "gate", None) is not None else None
        qkv = inner.qkv(x).reshape(batch, tokens, 3, inner.num_heads, inner.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        q, k = inner.q_norm(q), inner.k_norm(k)
        logits = (self._query_rows(q) * inner.scale) @ k.transpose(-2, -1)  # (B, H, rows, N)
        if attn_mask is not None:
            if isinstance(self.queries, torch.Tensor):
                raise TapError("tapping chosen queries with an attention mask is not supported")
            logits = logits + attn_mask[..., : logits.shape[2], :]
        self.recorded = logits.float().softmax(dim=-1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=inner.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(batch, tokens, inner.attn_dim)
        out = inner.norm(out)
        if gate is not None:
            out = out * gate
        return inner.proj_drop(inner.proj(out))


@contextmanager
def tapped_attention(
    model: VisionTransformer,
    layers: Sequence[int],
    queries: int | torch.Tensor,
    full_layers: Sequence[int] = (),
    queries_before_entry: int | torch.Tensor | None = None,
) -> Iterator[dict[int, TappedAttention]]:
    """Temporarily swap the attention of `layers` for `TappedAttention(queries)` (every row on `full_layers`);
    restores the originals on exit. Blocks before the model's register entry block (if any) see `[CLS, PATCH...]`
    and record `queries_before_entry` instead (indices into that shorter stream)."""
    taps: dict[int, TappedAttention] = {}
    originals: dict[int, nn.Module] = {}
    entry = register_entry_block(model) or 0
    try:
        for layer in sorted(set(layers) | set(full_layers)):
            block = model.blocks[layer]
            if not isinstance(block.attn, Attention):
                raise TapError(f"layer {layer}: cannot tap attention of type {type(block.attn).__name__}")
            if layer < entry and queries_before_entry is None and layer not in full_layers:
                raise TapError(f"layer {layer} is before the register entry block {entry}: give queries_before_entry")
            originals[layer] = block.attn
            asked = queries_before_entry if layer < entry else queries
            taps[layer] = TappedAttention(block.attn, -1 if layer in full_layers else asked)
            block.attn = taps[layer]
        yield taps
    finally:
        for layer, original in originals.items():
            model.blocks[layer].attn = original


@torch.no_grad()
def query_attention(
    model: VisionTransformer, images: torch.Tensor, layers: Sequence[int], queries: torch.Tensor
) -> torch.Tensor:
    """Attention rows of chosen query tokens (e.g. patches) in chosen blocks, without any full map: (L, B, H, Q, T).

    Args:
        layers: block indices (0-based, non-negative).
        queries: (B, Q) token indices in the model's order `[CLS, REG..., PATCH...]`.

    In blocks before a late register entry, rows of register queries and columns of registers are NaN.
    """
    registers, entry = count_registers(model), register_entry_block(model) or 0
    is_register = (queries >= 1) & (queries < 1 + registers)  # (B, Q)
    before_entry = torch.where(queries > registers, queries - registers, 0)  # the same tokens in [CLS, PATCH...]
    with tapped_attention(model, layers, queries, queries_before_entry=before_entry) as taps:
        model.forward_features(images)
    rows = []
    for layer in layers:
        recorded = taps[layer].recorded  # (B, H, Q, T) or, before the entry, (B, H, Q, T - R)
        if layer < entry:
            recorded = with_register_slots(recorded, registers, dim=3)
            recorded = recorded.masked_fill(is_register.to(recorded.device)[:, None, :, None], float("nan"))
        rows.append(recorded)
    return torch.stack(rows)


def with_register_slots(values: torch.Tensor, registers: int, dim: int) -> torch.Tensor:
    """`values` laid out over `[CLS, PATCH...]` along `dim`, with `registers` NaN slots inserted after CLS, so it
    lines up with `[CLS, REG..., PATCH...]` (a block before a late register entry has no registers)."""
    if registers == 0:
        return values
    shape = list(values.shape)
    shape[dim] = registers
    nan = values.new_full(shape, float("nan"))
    return torch.cat([values.narrow(dim, 0, 1), nan, values.narrow(dim, 1, values.shape[dim] - 1)], dim=dim)


@dataclass
class Taps:
    """What one tapped forward pass returns. Layer `l` means the output of block `l` (0-based).

    Token axes follow the model's order `[CLS, REG..., PATCH...]`; `grid` is the patch grid (rows, cols). With
    registers entering at block `register_entry_block`, layers before it hold NaN wherever a register would be.
    """

    logits: torch.Tensor  # (B, classes), the model's normal output
    layers: list[int]
    num_registers: int
    grid: tuple[int, int]
    cls_norms: torch.Tensor  # (L, B)
    register_norms: torch.Tensor  # (L, B, R)
    patch_norms: torch.Tensor  # (L, B, N)
    attention_layers: list[int] = field(default_factory=list)
    cls_attention: torch.Tensor | None = None  # (La, B, H, T) attention of CLS over all T tokens
    register_attention: torch.Tensor | None = None  # (La, B, R, H, T)
    full_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, T, T)
    patch_embedding: torch.Tensor | None = None  # (B, N, C) patch-embedding output, before positions
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, C) pre-norm tokens
    register_entry_block: int | None = None  # None: the registers are there from the input on

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    def patch_norm_map(self, layer: int) -> torch.Tensor:
        """Patch norms at `layer` as a (B, rows, cols) map."""
        return self.patch_norms[self.layers.index(layer)].reshape(-1, *self.grid)

    def cls_attention_map(self, layer: int, head: int | None = None) -> torch.Tensor:
        """CLS attention over patches at `layer` as (B, rows, cols); head mean unless `head` is given."""
        if self.cls_attention is None or layer not in self.attention_layers:
            raise TapError(f"layer {layer} was not tapped for attention (tapped: {self.attention_layers})")
        rows = self.cls_attention[self.attention_layers.index(layer)]  # (B, H, T)
        rows = rows.mean(dim=1) if head is None else rows[:, head]
        return rows[:, self.num_prefix_tokens :].reshape(-1, *self.grid)

    def register_attention_map(self, layer: int, register: int, head: int | None = None) -> torch.Tensor:
        """Attention of register `register` over patches at `layer` as (B, rows, cols)."""
        if self.register_attention is None or layer not in self.attention_layers:
            raise TapError(f"layer {layer} was not tapped for attention (tapped: {self.attention_layers})")
        rows = self.register_attention[self.attention_layers.index(layer)][:, register]  # (B, H, T)
        rows = rows.mean(dim=1) if head is None else rows[:, head]
        return rows[:, self.num_prefix_tokens :].reshape(-1, *self.grid)


class TokenEdit(Protocol):
    """Edits a block's output during `run_taps` (e.g. `ArtifactRemoval`); its layers get attention taps."""

    layers: list[int]

    def __call__(
        self,
        layer: int,
        tokens: torch.Tensor,
        cls_attention: torch.Tensor,
        prefix: int,
        grid: tuple[int, int],
    ) -> torch.Tensor: ...


def _resolve_layers(layers: Sequence[int] | None, depth: int, what: str) -> list[int]:
    if layers is None:
        return list(range(depth))
    resolved = []
    for layer in layers:
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise TapError(f"{what}: layer {layer} out of range for a model of depth {depth}")
        resolved.append(index)
    return sorted(set(resolved))


def patch_grid(model: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """Patch grid (rows, cols) of `images` (B, C, H, W) for this model."""
    patch_height, patch_width = model.patch_embed.patch_size
    return images.shape[-2] // patch_height, images.shape[-1] // patch_width


@torch.no_grad()
def run_taps(
    model: VisionTransformer,
    images: torch.Tensor,
    layers: Sequence[int] | None = None,
    attention_layers: Sequence[int] | None = (-1,),
    full_attention_layers: Sequence[int] = (),
    keep_patch_embedding: bool = False,
    keep_block_outputs: Sequence[int] = (),
    token_edit: TokenEdit | None = None,
) -> Taps:
    """Forward `images` through `model` once, recording norms and attention on the way.

    Args:
        model: a timm VisionTransformer (with or without registers), in eval mode for deterministic taps.
        images: (B, 3, H, W) normalised images.
        layers: blocks whose output norms are recorded (None: all). Negative indices count from the end.
        attention_layers: blocks whose CLS and register attention rows are recorded (None: all).
        full_attention_layers: blocks whose full (T x T) attention map is also recorded.
        keep_patch_embedding: also return the patch-embedding output (for neighbour similarity).
        keep_block_outputs: blocks whose whole pre-norm token tensor is returned (for probes on embeddings).
        token_edit: called on the output of each of its `layers` with that block's CLS attention; the forward
            continues from the edited tokens through every later block. Norms are recorded after the edit. Before
            a late register entry it gets the register-free stream `[CLS, PATCH...]` and prefix 1.

    A model whose registers enter at block k (`vitreg.set_register_entry_block`) is walked as its forward does
    (the registers inserted after CLS at block k's input); its layers before k record NaN for the registers.
    """
    blocks = len(model.blocks)
    layers = _resolve_layers(layers, blocks, "layers")
    attention_layers = _resolve_layers(attention_layers, blocks, "attention_layers")
    full_layers = _resolve_layers(full_attention_layers, blocks, "full_attention_layers")
    kept_layers = _resolve_layers(keep_block_outputs, blocks, "keep_block_outputs")
    edit_layers = _resolve_layers(token_edit.layers, blocks, "token_edit") if token_edit else []
    registers = count_registers(model)
    prefix = 1 + registers
    grid = patch_grid(model, images)
    entry = register_entry_block(model)
    first_with_registers = entry or 0

    def aligned(values: torch.Tensor, index: int, dims: Sequence[int]) -> torch.Tensor:
        """Before the entry block: NaN register slots inserted along `dims`, so token axes stay aligned."""
        if index >= first_with_registers:
            return values
        for dim in dims:
            values = with_register_slots(values, registers, dim)
        return values

    tapped_layers = sorted(set(attention_layers) | set(edit_layers))
    with tapped_attention(model, tapped_layers, prefix, full_layers, queries_before_entry=1) as attention_taps:
        tokens = model.patch_embed(images)
        patch_embedding = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]) if keep_patch_embedding else None
        if entry is None:
            x = model.norm_pre(model.patch_drop(model._pos_embed(tokens)))  # (B, T, C)
        else:
            x = model.tokens_before_entry(tokens)  # (B, 1 + N, C): the registers join at block `entry`
        norms: list[torch.Tensor] = []
        block_outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(model.blocks):
            if index == entry:
                x = model.insert_registers(x)  # (B, T, C)
            x = block(x)
            if index in edit_layers:
                stream_prefix = prefix if index >= first_with_registers else 1
                x = token_edit(index, x, attention_taps[index].recorded[:, :, 0], stream_prefix, grid)
            if index in layers:
                norms.append(aligned(x.float().norm(dim=-1), index, [1]))  # (B, T)
            if index in kept_layers:
                block_outputs[index] = aligned(x, index, [1])
        logits = model.forward_head(model.norm(x))

    token_norms = torch.stack(norms)  # (L, B, T)
    taps = Taps(
        logits=logits,
        layers=layers,
        num_registers=registers,
        grid=grid,
        cls_norms=token_norms[:, :, 0],
        register_norms=token_norms[:, :, 1:prefix],
        patch_norms=token_norms[:, :, prefix:],
        patch_embedding=patch_embedding,
        block_outputs=block_outputs,
        register_entry_block=entry,
    )
    if any(tap.recorded is None for tap in attention_taps.values()):
        raise TapError("tapped attention returned no weights; was the block bypassed?")
    # (B, H, rows, T): rows [CLS, REG...] (all T rows on full layers); NaN register rows/columns before the entry
    recorded = {layer: aligned(tap.recorded, layer, [2, 3]) for layer, tap in attention_taps.items()}
    if attention_layers:
        rows = [recorded[layer] for layer in attention_layers]
        taps.attention_layers = attention_layers
        taps.cls_attention = torch.stack([row[:, :, 0] for row in rows])  # (La, B, H, T)
        taps.register_attention = torch.stack([row[:, :, 1:prefix].transpose(1, 2) for row in rows])
    taps.full_attention = {layer: recorded[layer] for layer in full_layers}
    return taps
