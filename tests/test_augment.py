"""train.augment: each op against timm's PIL op and torchvision's kernel, the grouped batch against a per-image
reference, the plan's statistics against timm's RandAugment and RandomErasing, seeds, identity, errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing

from train.augment import (
    _PIXEL_OPS,
    FILL,
    GEOMETRIC_OPS,
    AugmentConfig,
    DeviceAugment,
    augment_seed,
    level_to_arg,
    parse_rand_augment,
    pil_affine_matrices,
    unit_theta,
    warp,
)
from train.data import draw_image, normalize_on_device


def _photo(seed: int = 0, size: int = 48) -> Image.Image:
    """A generated picture: a coloured shape on a noisy gradient."""
    return draw_image(seed % 4, np.random.default_rng(seed), size)


def _smooth(height: int = 48, width: int = 64) -> Image.Image:
    """A smooth picture with one sharp-edged box, so that interpolation kernels differ by little."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
    pixels[10:30, 20:40] = (230, 40, 90)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W) uint8


def _batch(count: int, size: int = 32) -> torch.Tensor:
    return torch.cat([_tensor(_photo(i, size)) for i in range(count)])


def _ours(name: str, image: torch.Tensor, arg: float) -> torch.Tensor:
    return _PIXEL_OPS[name](image, torch.tensor([arg], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Single ops against timm's PIL ops and torchvision
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_lut_ops_equal_timm_pil_exactly(seed: int) -> None:
    pil = _photo(seed)
    image = _tensor(pil)
    cases = [("Invert", 0, timm_aa.invert(pil)), ("Equalize", 0, timm_aa.equalize(pil))]
    cases += [("PosterizeIncreasing", bits, timm_aa.posterize(pil, bits)) for bits in range(1, 9)]
    cases += [("SolarizeIncreasing", t, timm_aa.solarize(pil, t)) for t in (0, 1, 77, 128, 200, 255, 256)]
    cases += [("SolarizeAdd", add, timm_aa.solarize_add(pil, add)) for add in (0, 30, 99, 110)]
    cases += [("Brightness", f, timm_aa.brightness(pil, f)) for f in (0.1, 0.55, 1.0, 1.37, 1.9)]
    cases += [("Sharpness", f, timm_aa.sharpness(pil, f)) for f in (0.1, 0.55, 1.0, 1.37, 1.9)]
    for name, arg, expected in cases:
        assert torch.equal(_ours(name, image, arg), _tensor(expected)), (name, arg)
    # Pillow 13 refuses posterize(0); older Pillow (and torchvision, and we) give black, as timm's level 10 asks.
    assert not _ours("PosterizeIncreasing", image, 0).any()


@pytest.mark.parametrize("factor", [0.1, 0.37, 1.0, 1.63, 1.9])
def test_blend_ops_equal_torchvision_and_pil_within_one(factor: float) -> None:
    pil = _photo(2)
    image = _tensor(pil)
    for name, torchvision_op, pil_op in (
        ("Color", TF.adjust_saturation, timm_aa.color),
        ("Contrast", TF.adjust_contrast, timm_aa.contrast),
        ("Brightness", TF.adjust_brightness, timm_aa.brightness),
        ("Sharpness", TF.adjust_sharpness, timm_aa.sharpness),
        ("AutoContrast", lambda x, _: TF.autocontrast(x), lambda x, _: timm_aa.auto_contrast(x)),
    ):
        ours = _ours(name, image, factor)
        assert torch.equal(ours, torchvision_op(image, factor)), name
        # PIL rounds its grayscale (torchvision floors it): off by at most one grey level.
        assert (ours.int() - _tensor(pil_op(pil, factor)).int()).abs().max() <= 1, name
    flat = image.clone()
    flat[:, 1] = 77  # a constant channel: autocontrast leaves it alone
    assert torch.equal(_ours("AutoContrast", flat, 0), TF.autocontrast(flat))
    assert torch.equal(_ours("AutoContrast", flat, 0)[:, 1], flat[:, 1])


_TIMM_GEOMETRIC = {
    "Rotate": timm_aa.rotate,
    "ShearX": timm_aa.shear_x,
    "ShearY": timm_aa.shear_y,
    "TranslateXRel": timm_aa.translate_x_rel,
    "TranslateYRel": timm_aa.translate_y_rel,
}


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("Rotate", 23.0),
        ("Rotate", -9.3),
        ("ShearX", 0.23),
        ("ShearY", -0.27),
        ("TranslateXRel", 0.31),
        ("TranslateYRel", -0.17),
    ],
)
def test_geometric_ops_match_timm_pil(name: str, arg: float) -> None:
    pil = _smooth()
    image = _tensor(pil)
    height, width = image.shape[2:]
    theta = unit_theta(
        pil_affine_matrices([name], torch.tensor([arg], dtype=torch.float64), height, width), height, width
    )
    for mode, resample in (("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        expected = _tensor(_TIMM_GEOMETRIC[name](pil, arg, resample=resample, fillcolor=FILL)).int()
        diff = (warp(image, theta, FILL, mode).int() - expected).abs()
        if mode == "nearest":  # same source pixel except at rare exact ties
            assert (diff > 0).float().mean() < 0.002, (mode, diff.float().mean())
        elif mode == "bilinear":  # same kernel, rounding only: so the geometry and the fill edge agree
            assert diff.max() <= 1, mode
        else:  # torch's bicubic kernel (a=-0.75) vs PIL's (a=-0.5)
            assert diff.float().mean() < 1.0 and (diff > 3).float().mean() < 0.01 and diff.max() <= 8, mode


# ---------------------------------------------------------------------------------------------------------------
# Parsing and magnitudes
# ---------------------------------------------------------------------------------------------------------------


def test_parse_rand_augment_reads_timm_strings() -> None:
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec.ops == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert (spec.num_layers, spec.prob, spec.magnitude, spec.magnitude_std, spec.magnitude_max) == (2, 0.5, 9, 0.5, 10)
    spec = parse_rand_augment("rand-m7-n3-p0.8-mstd101-mmax12")
    assert spec.ops == tuple(timm_aa._RAND_TRANSFORMS)
    assert (spec.num_layers, spec.prob, spec.magnitude, spec.magnitude_std, spec.magnitude_max) == (
        3,
        0.8,
        7,
        math.inf,
        12,
    )


@pytest.mark.parametrize("bad", ["rand-x9", "auto-m9", "rand-m9-tweights", "rand-m9-t3a"])
def test_bad_configs_are_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="rand_augment"):
        AugmentConfig(rand_augment=bad)
    with pytest.raises(ValueError, match="colour jitter"):
        AugmentConfig(color_jitter=0.3)  # with the default RandAugment, as timm ran the study
    with pytest.raises(ValueError, match="erasing_mode"):
        AugmentConfig(erasing_mode="noise")
    with pytest.raises(ValueError, match="random_erasing"):
        AugmentConfig(random_erasing=1.5)


def test_level_to_arg_equals_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    magnitudes = torch.linspace(0, 10, 101, dtype=torch.float64)
    hparams = {"translate_const": 100, "img_mean": FILL}
    names = set(timm_aa._RAND_TRANSFORMS) | set(timm_aa._RAND_INCREASING_TRANSFORMS) | {"PosterizeOriginal"}
    for negate in (False, True):
        # timm's _randomly_negate flips the sign when random.random() > 0.5
        monkeypatch.setattr(timm_aa.random, "random", lambda negate=negate: 0.9 if negate else 0.1)
        for name in sorted(names):
            ours = level_to_arg(name, magnitudes, torch.full_like(magnitudes, negate, dtype=torch.bool))
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            expected = [level_fn(m, hparams)[0] if level_fn else 0.0 for m in magnitudes.tolist()]
            assert ours.tolist() == expected, (name, negate)


def _plan_args(augment: DeviceAugment, batch: int, seed: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for step in augment.plan_uint8(batch, 32, 32, seed):
        if step.name != "warp":
            out.setdefault(step.name, []).extend(step.params.tolist())
    return out


def test_mstd_zero_gives_the_magnitude_itself() -> None:
    args = _plan_args(DeviceAugment(AugmentConfig(rand_augment="rand-m7-mstd0-inc1")), 600, seed=3)
    assert set(args["SolarizeIncreasing"]) == {256 - int(0.7 * 256)}
    assert set(args["PosterizeIncreasing"]) == {4 - int(0.7 * 4)}
    assert set(args["SolarizeAdd"]) == {int(0.7 * 110)}
    assert set(args["BrightnessIncreasing"]) == {1 + 0.7 * 0.9, 1 - 0.7 * 0.9}  # both signs


def test_plan_statistics_follow_timm_rand_augment() -> None:
    augment = DeviceAugment(AugmentConfig(rand_augment="rand-m9-mstd0.5-inc1"))
    batch = 6000
    steps = augment.plan_uint8(batch, 32, 32, seed=11)
    ops_per_image = torch.zeros(batch)
    for step in steps:
        ops_per_image[step.index] += 1
    # Two layers, each applied with probability 0.5: 0, 1, 2 ops with probability 1/4, 1/2, 1/4.
    shares = [(ops_per_image == k).float().mean().item() for k in range(3)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
    # Magnitude = clip(N(9, 0.5), 0, 10): read it back from the contrast factors, 1 +- m / 10 * 0.9.
    contrast = torch.tensor(_plan_args(augment, batch, seed=11)["ContrastIncreasing"])
    magnitude = (contrast - 1).abs() / 0.09
    reference = np.clip(np.random.default_rng(0).normal(9, 0.5, 200_000), 0, 10)
    assert magnitude.mean().item() == pytest.approx(reference.mean(), abs=0.06)
    assert magnitude.std().item() == pytest.approx(reference.std(), abs=0.05)
    assert magnitude.max().item() == pytest.approx(10.0)  # clipped at timm's magnitude_max
    assert 0.4 < (contrast > 1).float().mean().item() < 0.6  # signs are fair coins
    # Every op of the set is drawn about equally often (1/15 of 2 x 0.5 x batch).
    counts = {name: 0 for name in augment.spec.ops}
    for step in steps:
        if step.name in counts:
            counts[step.name] += len(step.index)
    geometric = sum(len(s.index) for s in steps if s.name == "warp")
    assert geometric == pytest.approx(batch * len(GEOMETRIC_OPS) / 15, rel=0.1)
    for name, count in counts.items():
        if name not in GEOMETRIC_OPS:
            assert count == pytest.approx(batch / 15, rel=0.2), name


# ---------------------------------------------------------------------------------------------------------------
# The grouped batch equals a per-image reference; seeds; identity; RNG
# ---------------------------------------------------------------------------------------------------------------


def _reference_op(name: str, image: torch.Tensor, arg: float) -> torch.Tensor:
    """One image's op the plain way: torchvision's kernels with scalar arguments, timm's PIL op for SolarizeAdd."""
    if name in ("Invert", "Equalize", "AutoContrast"):
        return {"Invert": TF.invert, "Equalize": TF.equalize, "AutoContrast": TF.autocontrast}[name](image)
    if name.startswith("Posterize"):
        return TF.posterize(image, int(arg))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return TF.solarize(image, arg) if arg <= 255 else image
    if name == "SolarizeAdd":
        return _tensor(timm_aa.solarize_add(Image.fromarray(image[0].permute(1, 2, 0).numpy()), int(arg)))
    kernels = {"Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast, "Brightness": TF.adjust_brightness}
    kernels["Sharpness"] = TF.adjust_sharpness
    return kernels[name.removesuffix("Increasing")](image, arg)


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(random_erasing=0.0),
        AugmentConfig(rand_augment="rand-m10-n3-mstd1", random_erasing=0.0),
        AugmentConfig(rand_augment=None, color_jitter=0.4, random_erasing=0.0),
        AugmentConfig(color_jitter=0.3, force_color_jitter=True, random_erasing=0.0),
    ],
)
def test_grouped_batch_equals_per_image_reference(config: AugmentConfig) -> None:
    images = _batch(16)
    augment = DeviceAugment(config)
    for seed in (0, 1):
        expected = images.clone()
        for step in augment.plan_uint8(*images.shape[:1], *images.shape[2:], seed):
            for row, i in enumerate(step.index.tolist()):
                one = expected[i : i + 1]
                if step.name == "warp":
                    expected[i : i + 1] = warp(one, step.params[row : row + 1], FILL, config.interpolation)
                else:
                    expected[i : i + 1] = _reference_op(step.name, one, step.params[row].item())
        out = augment.augment_uint8(images, seed)
        assert torch.equal(out, expected)
        assert (out != images).flatten(1).any(dim=1).float().mean() > 0.5  # most images changed


def test_same_seed_same_batch_other_seed_other_batch_and_no_global_rng() -> None:
    images = _batch(16)
    augment = DeviceAugment()
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = augment(images, seed=augment_seed(0, 3, 1, 7))
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(augment(images, seed=augment_seed(0, 3, 1, 7)), first)
    for other in (
        augment_seed(0, 3, 1, 8),
        augment_seed(0, 4, 1, 7),
        augment_seed(0, 3, 0, 7),
        augment_seed(1, 3, 1, 7),
    ):
        assert not torch.equal(augment(images, seed=other), first)
    assert first.dtype == torch.float32 and first.shape == images.shape


def test_mixed_precision_region_does_not_change_the_ops() -> None:
    images = torch.cat([_tensor(_photo(i, 96)) for i in range(8)])
    rotate = unit_theta(
        pil_affine_matrices(["Rotate"] * 8, torch.full((8,), 17.0, dtype=torch.float64), 96, 96), 96, 96
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the hazard: affine_grid in bfloat16 moves the pixels
        unguarded = warp(images, rotate, FILL, "bicubic")
    assert not torch.equal(unguarded, warp(images, rotate, FILL, "bicubic"))
    augment = DeviceAugment(AugmentConfig(rand_augment="rand-m9-n4-p1", random_erasing=0.0))
    expected = augment.augment_uint8(images, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(augment.augment_uint8(images, seed=1), expected)


def test_disabled_config_is_identity() -> None:
    images = _batch(8)
    augment = DeviceAugment(AugmentConfig(rand_augment=None, random_erasing=0.0))
    assert augment.augment_uint8(images, 5) is images
    assert torch.equal(augment(images, seed=5), normalize_on_device(images))
    with pytest.raises(ValueError, match="uint8"):
        augment(images.float(), seed=5)


# ---------------------------------------------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------------------------------------------


def _erased_boxes(erased: torch.Tensor) -> list[tuple[int, int] | None]:
    """(h, w) of each image's erased rectangle (nonzero pixels of an erased zero batch), None if untouched."""
    boxes = []
    for mask in erased.ne(0).any(dim=1):
        rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        boxes.append(None if len(rows) == 0 else (len(rows), len(cols)))
    return boxes


def test_erasing_follows_timm_random_erasing() -> None:
    batch, size = 2000, 32
    zeros = torch.zeros(batch, 3, size, size)
    ours = _erased_boxes(DeviceAugment(AugmentConfig(rand_augment=None)).erase(zeros, seed=4))
    random.seed(4)
    torch.manual_seed(4)
    timm_boxes = _erased_boxes(RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")(zeros.clone()))
    for boxes in (ours, timm_boxes):
        assert sum(b is not None for b in boxes) / batch == pytest.approx(0.25, abs=0.03)
    areas = [np.array([h * w / size**2 for h, w in filter(None, boxes)]) for boxes in (ours, timm_boxes)]
    assert areas[0].mean() == pytest.approx(areas[1].mean(), abs=0.02)  # both ~ uniform(0.02, 1/3): 0.18
    assert areas[0].min() >= 0.015 and areas[0].max() <= 0.36
    ratios = [np.array([math.log(h / w) for h, w in filter(None, boxes)]) for boxes in (ours, timm_boxes)]
    assert ratios[0].mean() == pytest.approx(0.0, abs=0.1) and ratios[0].std() == pytest.approx(
        ratios[1].std(), rel=0.1
    )


def test_erasing_fills_a_rectangle_with_unit_normal_noise_and_keeps_the_rest() -> None:
    images = normalize_on_device(_batch(64))
    out = DeviceAugment(AugmentConfig(rand_augment=None, random_erasing=1.0)).erase(images, seed=9)
    changed = (out != images).any(dim=1)  # (B, H, W)
    assert changed.flatten(1).any(dim=1).all()  # probability 1: every image erased
    for mask in changed:  # the changed pixels fill their bounding box (a rectangle)
        rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.float().mean() > 0.98
    noise = out[changed.unsqueeze(1).expand_as(out)]
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02) and noise.std().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(out[~changed.unsqueeze(1).expand_as(out)], images[~changed.unsqueeze(1).expand_as(images)])
    rand = DeviceAugment(AugmentConfig(rand_augment=None, random_erasing=1.0, erasing_mode="rand")).erase(images, 9)
    for image, mask in zip(rand, (rand != images).any(dim=1), strict=True):  # one colour per box and channel
        assert image[:, mask].unique(dim=1).shape[1] == 1
