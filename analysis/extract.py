"""Between a model and the probes: batching a split, attention rows of chosen query tokens, token samples.

`query_attention` (from `vitreg.taps`) gives patch tokens as queries: rather than a full (T x T) map per layer,
the tapped blocks compute softmax(q k^T / sqrt(d)) for just the Q chosen query tokens. Memory is
O(layers x heads x Q x T), so it runs on a DINOv2-g at 952 px.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from analysis.data import Batch, Split
from analysis.probes import TokenSample
from vitreg.taps import query_attention

__all__ = ["batches", "figure_queries", "query_attention", "sample_tokens"]


def batches(
    split: Split, batch_size: int, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> Iterator[tuple[np.ndarray, Batch]]:
    """(source indices, batch) over a split, in order."""
    for start in range(0, len(split.indices), batch_size):
        indices = split.indices[start : start + batch_size]
        yield np.asarray(indices), split.source.load(indices, img_size, mean, std)


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
