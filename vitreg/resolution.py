"""Input resolution of a ViT: resample the position embedding, DINOv2 models exactly as the official code does.

timm resamples position embeddings with an antialiased bicubic resize to the new grid. facebookresearch/dinov2
(`DinoVisionTransformer.interpolate_pos_encoding`) calls a bicubic resize with a scale factor that carries a 0.1
offset and no antialiasing, every forward. The two differ: at 224 px a DINOv2 model's features moved by up to
~1.5% with timm's. DINOv2 models (timm names with "dinov2") therefore use the official call here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitreg.model_files import ModelBuildError

DINOV2_INTERPOLATE_OFFSET = 0.1  # facebookresearch/dinov2 DinoVisionTransformer(interpolate_offset=0.1)


def is_dinov2(model_or_name: nn.Module | str) -> bool:
    """Whether a timm name (or a model built from one) is a DINOv2 architecture."""
    if isinstance(model_or_name, str):
        return "dinov2" in model_or_name
    pretrained_cfg = getattr(model_or_name, "pretrained_cfg", None) or {}
    return "dinov2" in str(pretrained_cfg.get("architecture", ""))


def dinov2_resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample a position embedding exactly as facebookresearch/dinov2's `interpolate_pos_encoding` does.

    Its call: bicubic `F.interpolate` of the (M, M) patch grid in float32 with `scale_factor=((rows + 0.1) / M,
    (cols + 0.1) / M)` (the "interpolate_offset" kludge: the kernel samples with that scale, not rows / M) and no
    antialiasing; prefix rows (CLS) are kept. The official model recomputes this on every forward from its stored
    grid; for a fixed input size that equals resampling once, which is what is done here.

    Args:
        pos_embed: (1, P + M*M, D) with P prefix rows.
        new_grid: (rows, cols) of patches of the new input.
        num_prefix_tokens: P, the rows that are not patch positions.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side, dim = math.isqrt(patches.shape[1]), patches.shape[2]
    if side * side != patches.shape[1]:
        raise ModelBuildError(f"pos_embed with {patches.shape[1]} patch rows is not a square grid")
    rows, cols = new_grid
    grid = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = ((rows + DINOV2_INTERPOLATE_OFFSET) / side, (cols + DINOV2_INTERPOLATE_OFFSET) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)  # (1, D, rows, cols)
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise ModelBuildError(f"DINOv2 resampling gave a {tuple(grid.shape[-2:])} grid, not {(rows, cols)}")
    patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)  # (1, rows * cols, D)
    return torch.cat([prefix, patches], dim=1)


def set_img_size(model: VisionTransformer, img_size: int) -> VisionTransformer:
    """Change the model's input resolution in place, resampling its position embedding.

    DINOv2 models resample as the official code does (`dinov2_resample_pos_embed`); every other ViT as timm does
    when it loads weights at another size (bicubic, antialiased). Nothing happens if the patch grid is unchanged.
    With `dynamic_img_size=True`, timm resamples again on every forward with its own method.
    """
    if img_size <= 0:
        raise ModelBuildError(f"img_size={img_size}: must be positive")
    old_grid, old_patches = tuple(model.patch_embed.grid_size), model.patch_embed.num_patches
    model.patch_embed.set_input_size(img_size=img_size)
    new_grid = tuple(model.patch_embed.grid_size)
    if new_grid == old_grid or model.pos_embed is None:
        return model
    prefix = model.pos_embed.shape[1] - old_patches  # CLS row on embed-class models, else 0
    with torch.no_grad():
        if is_dinov2(model):
            resampled = dinov2_resample_pos_embed(model.pos_embed, new_grid, prefix)
        else:
            resampled = resample_abs_pos_embed(model.pos_embed, list(new_grid), list(old_grid), prefix)
    model.pos_embed = nn.Parameter(resampled, requires_grad=model.pos_embed.requires_grad)
    return model
