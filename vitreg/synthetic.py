"""A tiny ViT with planted artifacts, and images that trigger them: known answers for tests and probes.

The plant is made of ordinary timm weights (no custom modules), so every code path sees a normal model:
- Patch embedding channel 0 measures `mean(R) - mean(G) - 2` over the patch: 0 on the flat background colour
  (R=1, G=-1), 2 on the flat trigger colour (R=2, G=-2), about -2 on textured (noise) patches.
- In block `plant_block`, hidden unit 0 of the MLP fires on tokens whose normalised channel 0 is high and writes
  a large vector along channel 1: from that block on, exactly the trigger patches have norms ~`artifact_norm`.
- In every later block, the query bias points at the key of that direction, so CLS (and every token) attends to
  the artifacts: they are top-norm and top-attention at once, as in the study.
Trigger patches are flat and sit in the flat background, so they are similar to their neighbours (claim 4).

With `positions` the trigger is the place, not the colour (as DeiT-III's artifacts sit at the image's edges):
channel 0 comes from the position embedding alone, so the tokens at those patch positions become high-norm
in every image, whatever it shows. This is the embedded default's starting model: fine-tuning with the norm
penalty can remove these artifacts (the position embedding and the later blocks train), without it they stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

BACKGROUND_COLOUR = (1.0, -1.0, 0.0)  # normalised RGB
TRIGGER_COLOUR = (2.0, -2.0, 0.0)
MASSIVE_ACTIVATION_GAIN = 300.0


def planted_artifact_vit(
    img_size: int = 64,
    patch_size: int = 8,
    embed_dim: int = 64,
    depth: int = 6,
    num_heads: int = 4,
    num_classes: int = 10,
    plant_block: int = 2,
    artifact_norm: float = 40.0,
    attention_gain: float = 8.0,
    seed: int = 0,
    positions: Sequence[tuple[int, int]] = (),
) -> VisionTransformer:
    """A random tiny ViT (deterministic in `seed`) whose trigger patches become high-norm from `plant_block`.

    Args:
        positions: (row, col) patch positions that are artifacts in every image; when given, colour no longer
            triggers anything.
    """
    if not 0 <= plant_block < depth:
        raise ValueError(f"plant_block={plant_block}: must be in 0..{depth - 1}")
    grid = img_size // patch_size
    for row, col in positions:
        if not (0 <= row < grid and 0 <= col < grid):
            raise ValueError(f"artifact position {(row, col)} outside the {grid}x{grid} patch grid")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        qkv_bias=True,
    )
    torch.random.set_rng_state(generator_state)
    model.eval()
    with torch.no_grad():
        # Channel 0 of the patch embedding: mean(R) - mean(G) - 2; nothing else writes to channel 0 or 1.
        pixels = patch_size * patch_size
        weight = model.patch_embed.proj.weight  # (C, 3, p, p)
        weight[2:] *= 0.25  # keep the random channels small next to channel 0, so LayerNorm sees it
        model.patch_embed.proj.bias[2:] *= 0.25
        weight[0].zero_()
        weight[0, 0] = 1.0 / pixels
        weight[0, 1] = -1.0 / pixels
        model.patch_embed.proj.bias[0] = -2.0
        weight[1].zero_()
        model.patch_embed.proj.bias[1] = 0.0
        model.pos_embed[..., :2] = 0.0
        model.cls_token[..., :2] = 0.0
        if positions:
            # The place is the trigger: channel 0 is 2 at the chosen positions (what the trigger colour gave)
            # and 0 elsewhere; the pixels no longer reach it.
            weight[0].zero_()
            model.patch_embed.proj.bias[0] = 0.0
            for row, col in positions:
                model.pos_embed[0, model.num_prefix_tokens + row * grid + col, 0] = 2.0
        for block in model.blocks:
            block.attn.proj.weight[:2].zero_()
            block.attn.proj.bias[:2].zero_()
            block.mlp.fc2.weight[:2].zero_()
            block.mlp.fc2.bias[:2].zero_()

        # The detector: hidden unit 0 of the plant block reads LayerNorm'd channel 0 (about 5 on trigger
        # patches, 0 on background, negative on texture) and writes along channel 1.
        mlp = model.blocks[plant_block].mlp
        sharpness, firing_point = 4.0, 2.5
        mlp.fc1.weight[0].zero_()
        mlp.fc1.weight[0, 0] = sharpness
        mlp.fc1.bias[0] = -sharpness * firing_point
        mlp.fc2.weight[:, 0] = 0.0
        mlp.fc2.weight[1, 0] = artifact_norm / (sharpness * 2.5)
        if positions:
            # A massive activation read by a small weight, as the artifact neurons of real ViTs: the same
            # function, with a writing weight small enough that a few optimiser steps can shrink it.
            mlp.fc1.weight[0] *= MASSIVE_ACTIVATION_GAIN
            mlp.fc1.bias[0] *= MASSIVE_ACTIVATION_GAIN
            mlp.fc2.weight[1, 0] /= MASSIVE_ACTIVATION_GAIN

        # Later blocks: every query gets a bias along the key of channel 1, so attention goes to the artifacts.
        dim = embed_dim
        for block in model.blocks[plant_block + 1 :]:
            key_of_artifact = block.attn.qkv.weight[dim : 2 * dim, 1].clone()  # (C,) key of unit channel 1
            heads = key_of_artifact.reshape(num_heads, -1)
            heads = heads / heads.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            block.attn.qkv.bias[:dim] = attention_gain * heads.reshape(-1)
            block.attn.qkv.weight[dim : 2 * dim, 1] *= 4.0
    return model


def planted_images(
    artifact_positions: Sequence[tuple[int, int]],
    batch: int = 2,
    img_size: int = 64,
    patch_size: int = 8,
    object_box: tuple[int, int, int, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Normalised images (B, 3, H, W): flat background, a textured object, trigger patches at the positions.

    Args:
        artifact_positions: (row, col) patch positions that get the flat trigger colour; must be background.
        object_box: (row0, col0, row1, col1) patch rectangle of textured noise (default: the central quarter).
    """
    grid = img_size // patch_size
    if object_box is None:
        object_box = (grid // 4, grid // 4, grid - grid // 4, grid - grid // 4)
    row0, col0, row1, col1 = object_box
    generator = torch.Generator().manual_seed(seed)
    images = torch.tensor(BACKGROUND_COLOUR).view(1, 3, 1, 1).repeat(batch, 1, img_size, img_size)
    images[:, :, row0 * patch_size : row1 * patch_size, col0 * patch_size : col1 * patch_size] = torch.randn(
        batch, 3, (row1 - row0) * patch_size, (col1 - col0) * patch_size, generator=generator
    )
    for row, col in artifact_positions:
        if not (0 <= row < grid and 0 <= col < grid):
            raise ValueError(f"artifact position {(row, col)} outside the {grid}x{grid} patch grid")
        if row0 <= row < row1 and col0 <= col < col1:
            raise ValueError(f"artifact position {(row, col)} is inside the object box {object_box}")
        pixels = (
            slice(row * patch_size, (row + 1) * patch_size),
            slice(col * patch_size, (col + 1) * patch_size),
        )
        images[:, :, pixels[0], pixels[1]] = torch.tensor(TRIGGER_COLOUR).view(1, 3, 1, 1)
    return images
