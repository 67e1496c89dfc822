"""Between a model and the probes: batching a split, attention rows of chosen query tokens, token samples.

`query_attention` extends `vitreg.run_taps` sensibly for patch tokens as queries: rather than a full (T x T) map
per layer, a pre-hook on each asked-for block recomputes softmax(q k^T / sqrt(d)) for just the Q chosen query
tokens, from the block's own input. Memory is O(layers x heads x Q x T), so it runs on a DINOv2-g at 952 px.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from analysis.data import Batch, Split
from analysis.probes import TokenSample


def batches(
    split: Split, batch_size: int, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> Iterator[tuple[np.ndarray, Batch]]:
    """(source indices, batch) over a split, in order."""
    for start in range(0, len(split.indices), batch_size):
        indices = split.indices[start : start + batch_size]
        yield np.asarray(indices), split.source.load(indices, img_size, mean, std)


def _query_rows(block: torch.nn.Module, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention weights of the `queries` (B, Q) token indices in `block`, given its input x (B, T, C)."""
    attention = block.attn
    if not isinstance(attention, Attention):
        raise TypeError(f"cannot read attention of type {type(attention).__name__}")
    batch, tokens, _ = x.shape
    heads, head_dim, width = attention.num_heads, attention.head_dim, attention.attn_dim
    h = block.norm1(x)
    weight, bias = attention.qkv.weight, attention.qkv.bias
    bias = bias if bias is not None else torch.zeros(3 * width, dtype=x.dtype, device=x.device)
    chosen = h.gather(1, queries[..., None].expand(-1, -1, h.shape[-1]))  # (B, Q, C)
    q = F.linear(chosen, weight[:width], bias[:width]).reshape(batch, -1, heads, head_dim).transpose(1, 2)
    k = F.linear(h, weight[width : 2 * width], bias[width : 2 * width])
    k = k.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
    q, k = attention.q_norm(q), attention.k_norm(k)
    return ((q * attention.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, H, Q, T)


@torch.no_grad()
def query_attention(
    model: VisionTransformer, images: torch.Tensor, layers: Sequence[int], queries: torch.Tensor
) -> torch.Tensor:
    """Attention rows of chosen query tokens in chosen blocks: (L, B, H, Q, T).

    Args:
        layers: block indices (0-based, non-negative).
        queries: (B, Q) token indices in the model's order `[CLS, REG..., PATCH...]`.
    """
    recorded: dict[int, torch.Tensor] = {}
    hooks = []
    queries = queries.to(images.device)

    def hook_for(layer: int):
        def record(block: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            recorded[layer] = _query_rows(block, inputs[0], queries)

        return record

    try:
        for layer in layers:
            hooks.append(model.blocks[layer].register_forward_pre_hook(hook_for(layer)))
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([recorded[layer] for layer in layers])


def sample_tokens(
    patches: torch.Tensor, norms: torch.Tensor, image_ids: np.ndarray, top: int, random: int, seed: int
) -> TokenSample:
    """Keep each image's `top` highest-norm patches and `random` other random ones.

    Random picks depend only on (seed, image id), so every task that samples an image picks the same tokens.

    Args:
        patches: (B, N, C) patch tokens of one layer; norms: (B, N) their norms; image_ids: (B,) stable ids.
    """
    count = patches.shape[1]
    top = min(top, count)
    random = min(random, count - top)
    top_index = norms.topk(top, dim=1).indices.cpu().numpy()  # (B, K)
    random_index = np.empty((len(image_ids), random), dtype=np.int64)
    for row, image_id in enumerate(image_ids):
        others = np.setdiff1d(np.arange(count), top_index[row])
        random_index[row] = np.random.default_rng([seed, int(image_id)]).choice(others, random, replace=False)
    gather = lambda index: patches.gather(
        1, torch.from_numpy(index).to(patches.device)[..., None].expand(-1, -1, patches.shape[-1])
    )
    return TokenSample(
        top_index=top_index,
        top_features=gather(top_index).float().cpu().numpy(),
        random_index=random_index,
        random_features=gather(random_index).float().cpu().numpy(),
    )


def figure_queries(last_norms: torch.Tensor, prefix: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Query tokens of the attention-progression figure: CLS, each register, a random normal patch, the
    highest-norm patch (at the last layer). Returns ((B, Q) token indices, Q names).

    Args:
        last_norms: (B, N) patch norms at the last layer; prefix: 1 + registers.
    """
    batch = last_norms.shape[0]
    rng = np.random.default_rng(seed)
    below_median = last_norms <= last_norms.median(dim=1, keepdim=True).values  # "normal" beyond any doubt
    normal = [int(rng.choice(np.flatnonzero(row.numpy()))) for row in below_median]
    highest = last_norms.argmax(dim=1).tolist()
    rows = [[*range(prefix), prefix + normal[b], prefix + highest[b]] for b in range(batch)]
    names = ["cls", *(f"register {r}" for r in range(prefix - 1)), "normal patch", "highest-norm patch"]
    return torch.tensor(rows), names
