"""Train augmentation parameters (RandomResizedCrop box and flip) as a pure function of (seed, epoch, sample index,
repeated-augmentation copy), shared by both backends."""

from __future__ import annotations

import math

import numpy as np

from train.data.jit import register_jitable

# splitmix64 (Steele, Lea & Flood 2014; the seeder of xoshiro): a bijective 64-bit mixer. Draw k of a sample is
# the mixer of (key + k * golden), computed rather than generated in sequence, so no state is shared between the
# threads and processes that decode in parallel. np.uint64 throughout: numba would turn uint64 arithmetic mixed
# with plain (signed) ints into float64, and the same code must give the same bits as Python and as numba.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)


_MIX2 = np.uint64(0x94D049BB133111EB)


_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11))


_2_POW_M53 = 1.0 / 9007199254740992.0


CROP_ATTEMPTS = 10  # as torchvision's and FFCV's RandomResizedCrop, before the centre-crop fallback


CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


@register_jitable
def _splitmix64(x: np.uint64) -> np.uint64:
    z = x + _GOLDEN  # wraps mod 2**64 (Python callers silence numpy's overflow warning)
    z = (z ^ (z >> _SHIFTS[0])) * _MIX1
    z = (z ^ (z >> _SHIFTS[1])) * _MIX2
    return z ^ (z >> _SHIFTS[2])


@register_jitable
def _uniform(key: np.uint64, k: int) -> float:
    """Draw k of the stream `key`: a double in [0, 1) from the top 53 bits."""
    return float(_splitmix64(key + np.uint64(k) * _GOLDEN) >> _SHIFTS[3]) * _2_POW_M53


def _crop_and_flip(
    seed: int,
    epoch: int,
    index: int,
    copy: int,
    height: int,
    width: int,
    scale_lo: float,
    scale_hi: float,
    ratio_lo: float,
    ratio_hi: float,
) -> tuple[int, int, int, int, bool]:
    # Compiled by numba for FFCV's decoder (see _ffcv_kernels) and run as Python by the imagefolder backend: only
    # operations whose results are bit-identical in both (integer hashing, IEEE +-*/, sqrt, and libm's log/exp).
    key = _splitmix64(_splitmix64(_splitmix64(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(index))
    key = _splitmix64(key ^ np.uint64(copy))
    flip = _uniform(key, 0) < 0.5
    height, width = int(height), int(width)
    area = float(height) * float(width)
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for attempt in range(CROP_ATTEMPTS):  # torchvision's RandomResizedCrop.get_params, draws 1..4 per attempt
        target_area = area * (scale_lo + (scale_hi - scale_lo) * _uniform(key, 4 * attempt + 1))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(key, 4 * attempt + 2))
        w = int(math.sqrt(target_area * aspect) + 0.5)  # >= 0: round half up
        h = int(math.sqrt(target_area / aspect) + 0.5)
        if 0 < w <= width and 0 < h <= height:
            top = min(int(_uniform(key, 4 * attempt + 3) * (height - h + 1)), height - h)
            left = min(int(_uniform(key, 4 * attempt + 4) * (width - w + 1)), width - w)
            return top, left, h, w, flip
    # Fallback: the largest centred box whose aspect ratio is in range.
    if width / height < ratio_lo:
        w = width
        h = min(height, int(w / ratio_lo + 0.5))
    elif width / height > ratio_hi:
        h = height
        w = min(width, int(h * ratio_hi + 0.5))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def crop_and_flip(
    seed: int,
    epoch: int,
    index: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
    copy: int = 0,
) -> tuple[int, int, int, int, bool]:
    """The train crop box and flip of sample `index` in `epoch`: `(top, left, crop_height, crop_width, flip)`.

    RandomResizedCrop's box (area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, up to 10
    tries, then a centre crop) and a fair coin for the horizontal flip, drawn from a splitmix64 hash of
    (seed, epoch, index, copy) instead of a random-number stream. Both backends call this (FFCV's decoder a
    numba build of the same code), so it alone decides the train augmentation.

    Args:
        seed: the run's data seed (`DataConfig.seed`), >= 0.
        epoch: the epoch, >= 0.
        index: the sample's index in its split (.beton / ImageFolder order), >= 0.
        height, width: the stored image's size in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
        copy: which of the sample's repeated-augmentation copies in this epoch (0 .. repeats - 1, see
            `shard_order`); each copy gets its own box and flip.
    """
    with np.errstate(over="ignore"):  # the hash wraps mod 2**64 on purpose
        top, left, h, w, flip = _crop_and_flip(
            seed, epoch, index, copy, height, width, scale[0], scale[1], ratio[0], ratio[1]
        )
    return int(top), int(left), int(h), int(w), bool(flip)
