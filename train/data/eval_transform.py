"""The evaluation transform (timm's, DeiT's and the study's): resize the shorter side to floor(img_size /
crop_pct) with Pillow's antialiased filter, then centre-crop img_size; a numba port of Pillow's arithmetic for
the FFCV backend, and a timm model's own settings."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from train.data.jit import register_jitable
from train.data.normalize import IMAGENET_MEAN, IMAGENET_STD

EVAL_INTERPOLATIONS = ("bicubic", "bilinear")


# Pillow's fixed-point resampling (src/libImaging/Resample.c): 8-bit pixels, weights with 22 fraction bits.
_PRECISION_BITS = 22


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """The shorter side the evaluation resizes to before the centre crop: floor(img_size / crop_pct).

    As DeiT's `int(input_size / eval_crop_ratio)` and timm's `math.floor(img_size / crop_pct)`: 224 / 0.875
    = 256, 64 / 0.875 -> 73.
    """
    return math.floor(img_size / crop_pct)


def timm_eval_settings(model_name: str) -> dict[str, Any]:
    """`crop_pct` and `eval_interpolation` of a timm model's pretrained data config, for `DataConfig(**...)`.

    E.g. {"crop_pct": 1.0, "eval_interpolation": "bicubic"} for deit3_small_patch16_224.fb_in22k_ft_in1k
    (the study evaluates it at 0.875 instead). Raises when timm's config asks for what our pipeline does not do:
    another normalisation than ImageNet's mean and std, a crop mode other than "center", another filter.
    """
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"model={model_name!r}: not a timm model name")
    pretrained = timm.models.get_pretrained_cfg(model_name)
    if pretrained is None:
        raise ValueError(f"model={model_name!r}: timm has no pretrained data config for it")
    config = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    if tuple(config["mean"]) != IMAGENET_MEAN or tuple(config["std"]) != IMAGENET_STD:
        raise ValueError(
            f"model={model_name!r}: timm normalises with mean {config['mean']} and std {config['std']}; "
            f"normalize_on_device uses ImageNet's {IMAGENET_MEAN}, {IMAGENET_STD}"
        )
    if config.get("crop_mode", "center") != "center":
        raise ValueError(f"model={model_name!r}: timm's crop_mode={config['crop_mode']!r}; we only centre-crop")
    if config["interpolation"] not in EVAL_INTERPOLATIONS:
        raise ValueError(
            f"model={model_name!r}: timm's interpolation={config['interpolation']!r}; allowed: "
            f"{', '.join(EVAL_INTERPOLATIONS)}"
        )
    return {"crop_pct": float(config["crop_pct"]), "eval_interpolation": config["interpolation"]}


@register_jitable
def _filter_weight(x: float, bicubic: bool) -> float:
    # Pillow's bicubic (a = -0.5, support 2) and bilinear (triangle, support 1), in its order of operations.
    if x < 0.0:
        x = -x
    if bicubic:
        if x < 1.0:
            return (1.5 * x - 2.5) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        return 0.0
    if x < 1.0:
        return 1.0 - x
    return 0.0


@register_jitable
def _resample_weights(
    in_size: int, out_size: int, first: int, count: int, bicubic: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for outputs first .. first + count - 1 of a
    resize from in_size to out_size: (first input, number of inputs, int64 weights (count, taps))."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)  # antialiasing: the filter widens by the downscaling factor
    support = (2.0 if bicubic else 1.0) * filter_scale
    taps = math.ceil(support) * 2 + 1
    starts = np.empty(count, np.int64)
    lengths = np.empty(count, np.int64)
    weights = np.zeros((count, taps), np.int64)
    raw = np.empty(taps, np.float64)
    inverse_scale = 1.0 / filter_scale
    one = float(1 << _PRECISION_BITS)
    for j in range(count):
        center = (first + j + 0.5) * scale
        low = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        n = min(int(center + support + 0.5), in_size) - low
        total = 0.0
        for t in range(n):
            raw[t] = _filter_weight((t + low - center + 0.5) * inverse_scale, bicubic)
            total += raw[t]
        for t in range(n):
            w = raw[t] / total if total != 0.0 else raw[t]
            weights[j, t] = int(w * one - 0.5) if w < 0 else int(w * one + 0.5)
        starts[j] = low
        lengths[j] = n
    return starts, lengths, weights


@register_jitable
def _clip8(accumulator: int) -> int:
    value = accumulator >> _PRECISION_BITS
    return min(max(value, 0), 255)


@register_jitable
def _resample_two_pass(
    src: np.ndarray,
    dst: np.ndarray,
    row_start: np.ndarray,
    row_length: np.ndarray,
    row_weights: np.ndarray,
    col_start: np.ndarray,
    col_length: np.ndarray,
    col_weights: np.ndarray,
) -> None:
    """Along axis 1 first (only the rows the second pass needs, into uint8 as Pillow), then along axis 0."""
    out_rows, out_cols = dst.shape[0], dst.shape[1]
    first_row = row_start[0]
    last_row = row_start[out_rows - 1] + row_length[out_rows - 1]
    half = 1 << (_PRECISION_BITS - 1)
    between = np.empty((last_row - first_row, out_cols, 3), np.uint8)
    for r in range(last_row - first_row):
        for j in range(out_cols):
            for c in range(3):
                acc = half
                for t in range(col_length[j]):
                    acc += np.int64(src[first_row + r, col_start[j] + t, c]) * col_weights[j, t]
                between[r, j, c] = _clip8(acc)
    for i in range(out_rows):
        for j in range(out_cols):
            for c in range(3):
                acc = half
                for t in range(row_length[i]):
                    acc += np.int64(between[row_start[i] - first_row + t, j, c]) * row_weights[i, t]
                dst[i, j, c] = _clip8(acc)


def _resize_center_crop(src: np.ndarray, dst: np.ndarray, resize_short: int, bicubic: bool) -> None:
    """dst (c, c, 3) = CenterCrop(c)(Resize(resize_short, bicubic or bilinear)(src)), as torchvision on a PIL image.

    torchvision's Resize(int) sizes the longer side int(resize_short * long / short) and hands the image to
    Pillow's antialiased resampling; CenterCrop offsets by Python's round(), which rounds halves to even. Only
    the crop window is computed: every resampled pixel depends on its own weights only, so the window equals
    the same window of the whole resized image. Pillow 13 runs the vertical pass first when the height shrinks
    by more than twice what the width does (otherwise horizontal first); the 8-bit rounding between the passes
    makes the order visible, so we follow it.
    """
    height, width = src.shape[0], src.shape[1]
    out_h, out_w = dst.shape[0], dst.shape[1]
    if width <= height:
        new_w, new_h = resize_short, int(resize_short * height / width)
    else:
        new_w, new_h = int(resize_short * width / height), resize_short
    spare_h, spare_w = new_h - out_h, new_w - out_w
    top = spare_h // 2 + (spare_h % 2) * ((spare_h // 2) % 2)  # round(spare_h / 2), halves to even
    left = spare_w // 2 + (spare_w % 2) * ((spare_w // 2) % 2)
    row_start, row_length, row_weights = _resample_weights(height, new_h, top, out_h, bicubic)
    col_start, col_length, col_weights = _resample_weights(width, new_w, left, out_w, bicubic)
    if height - new_h > 0 and height - new_h > 2 * (width - new_w):  # vertical pass first: transpose
        _resample_two_pass(
            src.transpose(1, 0, 2),
            dst.transpose(1, 0, 2),
            col_start,
            col_length,
            col_weights,
            row_start,
            row_length,
            row_weights,
        )
    else:
        _resample_two_pass(src, dst, row_start, row_length, row_weights, col_start, col_length, col_weights)


@functools.cache
def _eval_kernel() -> Callable[[np.ndarray, np.ndarray, int, bool], None]:
    """The numba build of `_resize_center_crop` (no fastmath: the weights must be Pillow's to the bit), cached on
    disk by numba (compiling it takes seconds, once per machine instead of once per process)."""
    import numba

    return numba.njit(nogil=True, cache=True)(_resize_center_crop)


def eval_resize_crop(image: np.ndarray, img_size: int, crop_pct: float, interpolation: str = "bicubic") -> np.ndarray:
    """The evaluation transform of one HWC uint8 RGB image, as the FFCV backend computes it: (img_size, img_size, 3).

    Equals `CenterCrop(img_size)(Resize(eval_resize_size(img_size, crop_pct), interpolation)(PIL image))` bit
    for bit (tests/test_data.py checks it over random sizes).
    """
    if interpolation not in EVAL_INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: allowed {', '.join(EVAL_INTERPOLATIONS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC uint8 RGB image, got {image.dtype} {image.shape}")
    out = np.empty((img_size, img_size, 3), dtype=np.uint8)
    _eval_kernel()(np.ascontiguousarray(image), out, eval_resize_size(img_size, crop_pct), interpolation == "bicubic")
    return out
