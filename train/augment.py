"""The study's training augmentation, done on the device per batch: RandAugment, colour jitter, random erasing.

What the study ran (vit-reg/vit-reg `DEIT-III/datasets.py`, timm 1.0.13): timm's `create_transform(224,
is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
re_mode="pixel", re_count=1)`: crop + flip, RandAugment on the PIL image, Normalize, RandomErasing on the
normalised tensor. timm (1.0.13 and 1.0.29 alike) sets `disable_color_jitter` whenever `auto_augment` is given, so
the study's colour jitter 0.3 was never applied. `AugmentConfig()` is the pipeline the study really had.

FFCV's CPU pipeline cannot run RandAugment, so the loaders deliver cropped and flipped uint8 batches and
`DeviceAugment(config)(images, seed)` does the rest where the batch is: uint8 (B, 3, H, W) -> normalised floats.

Design:
- Parsing: timm's own `rand_augment_transform` reads the string (m, n, p, mstd, mmax, inc); we keep its op names,
  probability, magnitude and noise, and replace its PIL ops by tensor ops.
- Randomness: every choice of a batch (per image and layer: op, whether it applies, magnitude, sign; jitter
  factors and order; erasing boxes) is drawn up front on the CPU from a `torch.Generator` seeded from `seed`, the
  erasing noise from a generator on the device seeded from `seed`. No global RNG is read or advanced: a batch is a
  pure function of (images, seed), and `augment_seed(seed, epoch, rank, step)` makes resume bit-identical.
- Execution: grouped, not a loop over images. Per RandAugment layer, all images that drew a geometric op are
  warped in one `grid_sample` with per-image matrices, and each pixel op runs once on the images that drew it,
  with per-image magnitudes as tensors: at most 11 grouped calls per layer whatever the batch size. The plan
  reaches the device in one non-blocking copy and nothing waits for the device.
- Ops: timm's magnitude mapping (`level_to_arg`, tested against timm's `LEVEL_TO_ARG`); torchvision's uint8
  kernels and formulas (equalize and invert are its functions; the blends equal its kernels bit for bit, and PIL's
  within one grey level). Geometric ops use PIL's affine convention and hard edge filled with timm's `img_mean`,
  but torch's bicubic kernel (a = -0.75; PIL's a = -0.5): they differ from timm's by interpolation only.
- Random erasing draws boxes as timm's `RandomErasing` does (area 2-33%, log-uniform aspect 0.3-3.3, ten tries)
  and fills them after normalisation with N(0, 1) per pixel ("pixel"), per box and channel ("rand") or zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import _LEVEL_DENOM, rand_augment_transform

from train.data import IMAGENET_MEAN, normalize_on_device

ERASING_MODES = ("const", "rand", "pixel")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# timm's fill for pixels a geometric op uncovers: hparams img_mean = the normalisation mean in 0..255.
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_ERASE_TRIES = 10  # timm's RandomErasing tries ten boxes per erasure


@dataclass(frozen=True)
class AugmentConfig:
    """What to apply after crop and flip. The defaults are the study's pipeline as timm ran it.

    rand_augment: a timm RandAugment string ("rand-m9-mstd0.5-inc1"), or None for none.
    color_jitter: brightness, contrast and saturation factors drawn from [max(0, 1 - x), 1 + x] in random order
        (torchvision's ColorJitter, no hue). timm drops it when RandAugment is on; so do we, by refusing the pair
        unless force_color_jitter (timm's flag of the same name) asks for both.
    random_erasing: probability of erasing an image (after normalisation); erasing_mode and erasing_count as
        timm's re_mode and re_count (boxes per erased image: 1..count).
    interpolation: of the geometric ops (the study: bicubic).
    """

    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.0
    force_color_jitter: bool = False
    random_erasing: float = 0.25
    erasing_mode: str = "pixel"
    erasing_count: int = 1
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.rand_augment is not None:
            parse_rand_augment(self.rand_augment)  # raises on a bad string
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter={self.color_jitter}: must be >= 0")
        if self.color_jitter > 0 and self.rand_augment is not None and not self.force_color_jitter:
            raise ValueError(
                f"color_jitter={self.color_jitter} with rand_augment={self.rand_augment!r}: timm's create_transform "
                "ignores colour jitter when RandAugment is on (the study's run had none); set color_jitter=0 to "
                "reproduce it, or force_color_jitter=True to apply both"
            )
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing={self.random_erasing}: must be a probability in [0, 1]")
        if self.erasing_mode not in ERASING_MODES:
            raise ValueError(f"erasing_mode={self.erasing_mode!r}: allowed {', '.join(ERASING_MODES)}")
        if self.erasing_count < 1:
            raise ValueError(f"erasing_count={self.erasing_count}: must be >= 1")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}: allowed {', '.join(INTERPOLATIONS)}")


@dataclass(frozen=True)
class RandAugmentSpec:
    """A RandAugment config string as timm reads it: `num_layers` ops per image, drawn with replacement from
    `ops`, each applied with probability `prob` at magnitude N(magnitude, magnitude_std) clipped to
    [0, magnitude_max] (magnitude_std = inf: uniform in [0, magnitude])."""

    ops: tuple[str, ...]
    num_layers: int
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float


def parse_rand_augment(config_str: str) -> RandAugmentSpec:
    """Read a RandAugment string with timm's own parser; an op we do not implement or a weighted op set
    ("t..." sections) is an error."""
    try:
        policy = rand_augment_transform(config_str, {})
    except (AssertionError, ValueError) as error:
        raise ValueError(
            f"rand_augment={config_str!r} is not a timm RandAugment string ('rand-m9-mstd0.5-inc1')"
        ) from error
    if policy.choice_weights is not None:
        raise ValueError(f"rand_augment={config_str!r}: weighted op sets ('t' sections) are not supported")
    names = tuple(op.name for op in policy.ops)
    unknown = sorted(set(names) - set(_PIXEL_OPS) - set(GEOMETRIC_OPS))
    if unknown:
        raise ValueError(f"rand_augment={config_str!r}: ops {unknown} are not implemented on the device")
    op = policy.ops[0]
    return RandAugmentSpec(
        ops=names,
        num_layers=policy.num_layers,
        prob=float(op.prob),
        magnitude=float(op.magnitude),
        magnitude_std=float(op.magnitude_std),
        magnitude_max=float(op.magnitude_max or _LEVEL_DENOM),
    )


def level_to_arg(name: str, magnitude: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    """timm's LEVEL_TO_ARG for op `name`, vectorised: float64 magnitudes (k,) -> op arguments (k,).
    `negate` (k,) bool says where timm's `_randomly_negate` flips the sign."""
    level = magnitude.double() / _LEVEL_DENOM
    sign = 1.0 - 2.0 * negate.double()
    if name == "Rotate":
        return level * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return level * 0.45 * sign  # timm's default translate_pct (create_transform sets no other for RandAugment)
    if name == "Posterize":
        return torch.floor(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(level * 4)
    if name == "PosterizeOriginal":
        return torch.floor(level * 4) + 4
    if name == "Solarize":
        return torch.floor(level * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(level * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.floor(level * 110).clamp(max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return (1.0 + level * 0.9 * sign).clamp(min=0.1)
    return torch.zeros_like(level)  # AutoContrast, Equalize, Invert take no argument


# Pixel ops: uint8 (k, 3, H, W) and float64 arguments (k,) -> uint8, with torchvision's formulas per image


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision's _blend: image * f + degenerate * (1 - f), its scalars the float32 of the float64 values, and
    # its fused add(alpha=) matched by addcmul, so the truncation to uint8 agrees bit for bit.
    ratio, rest = _per_image(factor.float()), _per_image((1.0 - factor).float())
    return torch.addcmul(images.float().mul_(ratio), degenerate, rest).clamp_(0, 255).to(torch.uint8)


def _grayscale_floor(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.float().unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)  # (k, 1, H, W)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.float().mul(_per_image(factor.float())).clamp_(0, 255).to(torch.uint8)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale_floor(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale_floor(images), factor)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision's adjust_sharpness: blend with a 3x3 smoothing (5 in the middle), border pixels unchanged.
    out = images.float()
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=images.device).expand(3, 1, 3, 3)
    blurred = F.conv2d(out, kernel, groups=3).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred.sub_(inner), _per_image((1.0 - factor).float()))
    return out.clamp_(0, 255).to(torch.uint8)


def _autocontrast(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    # torchvision's autocontrast (per image and channel, min..max -> 0..255), with torch.where instead of its
    # boolean-mask assignment, which would wait for the device.
    low, high = images.float().amin(dim=(-2, -1), keepdim=True), images.float().amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return images.float().sub_(torch.where(flat, 0.0, low)).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    mask = (255 << (8 - bits.long())) & 255  # keep the top `bits` bits (bits 0: black, 8: unchanged)
    return images & _per_image(mask.to(torch.uint8))


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(images.long() >= _per_image(threshold.long()), 255 - images, images)


def _solarize_add(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    added = (images.long() + _per_image(add.long())).clamp_(max=255).to(torch.uint8)
    return torch.where(images < 128, added, images)  # timm: pixels below 128 get `add`, capped at 255


_PIXEL_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "AutoContrast": _autocontrast,
    "Equalize": lambda images, _: TF.equalize(images),
    "Invert": lambda images, _: TF.invert(images),
    **dict.fromkeys(("Posterize", "PosterizeIncreasing", "PosterizeOriginal"), _posterize),
    **dict.fromkeys(("Solarize", "SolarizeIncreasing"), _solarize),
    "SolarizeAdd": _solarize_add,
    **dict.fromkeys(("Color", "ColorIncreasing"), _saturation),
    **dict.fromkeys(("Contrast", "ContrastIncreasing"), _contrast),
    **dict.fromkeys(("Brightness", "BrightnessIncreasing"), _brightness),
    **dict.fromkeys(("Sharpness", "SharpnessIncreasing"), _sharpness),
}


# Geometric ops: PIL affine matrices (output point -> input point, pixel edges at integers), one warp per group


def pil_affine_matrices(names: list[str], args: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (k, 3, 3) float64 matrices timm passes to PIL's `Image.transform(AFFINE)` for ops `names` with
    arguments `args` (k,): rotate about the centre, shear about the top-left corner, translate by a fraction."""
    k = len(names)
    matrices = torch.eye(3, dtype=torch.float64).repeat(k, 1, 1)
    for i, (name, arg) in enumerate(zip(names, args.tolist(), strict=True)):
        if name == "Rotate":  # PIL's Image.rotate: counter-clockwise by `arg` degrees about (W/2, H/2)
            angle = -math.radians(arg)
            cos, sin = math.cos(angle), math.sin(angle)
            cx, cy = width / 2.0, height / 2.0
            matrices[i, :2] = torch.tensor(
                [[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy]]
            )
        elif name == "ShearX":
            matrices[i, 0, 1] = arg
        elif name == "ShearY":
            matrices[i, 1, 0] = arg
        elif name == "TranslateXRel":
            matrices[i, 0, 2] = arg * width
        elif name == "TranslateYRel":
            matrices[i, 1, 2] = arg * height
        else:
            raise ValueError(f"{name!r} is not a geometric op ({', '.join(GEOMETRIC_OPS)})")
    return matrices


def unit_theta(matrices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL-convention affine matrices (k, 3, 3) -> the (k, 2, 3) `theta` of `F.affine_grid` ([-1, 1] coordinates,
    align_corners=False, whose -1 and 1 are the outer pixel edges, as PIL's 0 and W)."""
    to_unit = torch.tensor([[2.0 / width, 0, -1], [0, 2.0 / height, -1], [0, 0, 1]], dtype=torch.float64)
    from_unit = torch.tensor([[width / 2.0, 0, width / 2.0], [0, height / 2.0, height / 2.0], [0, 0, 1]])
    return (to_unit @ matrices.double() @ from_unit.double())[:, :2]


def warp(images: torch.Tensor, theta: torch.Tensor, fill: tuple[int, ...], mode: str) -> torch.Tensor:
    """Warp uint8 images (k, 3, H, W) by `theta` (k, 2, 3, from `unit_theta`) as PIL does: an output pixel whose
    source point lies outside the image gets `fill`, the others are interpolated (edge pixels replicated)."""
    k, channels, height, width = images.shape
    theta = theta.to(device=images.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [k, channels, height, width], align_corners=False)  # (k, H, W, 2) source points
    sampled = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(dim=-1).unsqueeze(1)  # (k, 1, H, W)
    fill_colour = torch.tensor(fill, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return torch.where(inside, sampled.round_().clamp_(0, 255), fill_colour).to(torch.uint8)


# Planning (CPU, from one generator) and execution (on the batch's device)


def augment_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The augmentation seed of one training batch: a hash of (seed, epoch, rank, step), never of the past."""
    return int(np.random.SeedSequence([seed, epoch, rank, step]).generate_state(1, dtype=np.uint64)[0])


def _generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    # Independent streams from one seed: the plan's draws and the erasing noise must not be correlated.
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]))
    return generator


@dataclass(frozen=True)
class Step:
    """One grouped op: `name` ("warp", a pixel op, or "erase") on the images `index` (k,) with `params` (k, ...)."""

    name: str
    index: torch.Tensor
    params: torch.Tensor


def _upload(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Small CPU tensors to `device` in one non-blocking copy (a pageable copy per tensor waits for the device)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


class DeviceAugment:
    """RandAugment, colour jitter and random erasing of uint8 batches on their device; see the module docstring.

    `augment(images, seed)` = `erase(normalize(augment_uint8(images, seed)), seed)`: uint8 (B, 3, H, W) in, the
    normalised float batch out, a pure function of (images, seed).
    """

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config
        self.spec = parse_rand_augment(config.rand_augment) if config.rand_augment is not None else None
        self._geometric = [i for i, name in enumerate(self.spec.ops if self.spec else ()) if name in GEOMETRIC_OPS]

    def __call__(
        self, images: torch.Tensor, seed: int, normalize: Callable[[torch.Tensor], torch.Tensor] = normalize_on_device
    ) -> torch.Tensor:
        return self.erase(normalize(self.augment_uint8(images, seed)), seed)

    def plan_uint8(self, batch: int, height: int, width: int, seed: int) -> list[Step]:
        """The grouped RandAugment and colour-jitter ops of a batch, in the order they apply (CPU tensors)."""
        generator, steps = _generator(seed, 0), []
        if self.spec is not None:
            spec, shape = self.spec, (batch, self.spec.num_layers)
            choice = torch.randint(len(spec.ops), shape, generator=generator)
            applied = torch.rand(shape, generator=generator, dtype=torch.float64) <= spec.prob
            noise = torch.randn(shape, generator=generator, dtype=torch.float64)
            uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
            negate = torch.rand(shape, generator=generator, dtype=torch.float64) > 0.5
            if math.isinf(spec.magnitude_std):
                magnitude = spec.magnitude * uniform
            else:
                magnitude = spec.magnitude + spec.magnitude_std * noise
            magnitude = magnitude.clamp(0.0, spec.magnitude_max)
            for layer in range(spec.num_layers):
                ops, on, args = choice[:, layer], applied[:, layer], torch.zeros(batch, dtype=torch.float64)
                for op, name in enumerate(spec.ops):
                    rows = ops == op
                    args[rows] = level_to_arg(name, magnitude[rows, layer], negate[rows, layer])
                # All geometric ops of a layer in one warp (one matrix per image), each pixel op on its own subset.
                index = (torch.isin(ops, torch.tensor(self._geometric)) & on).nonzero()[:, 0]
                if len(index):
                    matrices = pil_affine_matrices([spec.ops[i] for i in ops[index]], args[index], height, width)
                    steps.append(Step("warp", index, unit_theta(matrices, height, width)))
                for op, name in enumerate(spec.ops):
                    index = ((ops == op) & on).nonzero()[:, 0]
                    if name not in GEOMETRIC_OPS and len(index):
                        steps.append(Step(name, index, args[index]))
        if self.config.color_jitter > 0:  # torchvision's ColorJitter(b, c, s): factors in [1 - x, 1 + x], random order
            low, high = max(0.0, 1.0 - self.config.color_jitter), 1.0 + self.config.color_jitter
            factors = low + (high - low) * torch.rand((batch, 3), generator=generator, dtype=torch.float64)
            order = torch.rand((batch, 3), generator=generator).argsort(dim=1)
            for position in range(3):
                for op, name in enumerate(("Brightness", "Contrast", "Color")):
                    index = (order[:, position] == op).nonzero()[:, 0]
                    if len(index):
                        steps.append(Step(name, index, factors[index, op]))
        return steps

    def augment_uint8(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """RandAugment (and colour jitter) of uint8 images (B, 3, H, W), each image with its own draws."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        steps = self.plan_uint8(images.shape[0], images.shape[2], images.shape[3], seed)
        if not steps:
            return images
        indices = _upload([s.index for s in steps], torch.int64, images.device)
        params = _upload([s.params for s in steps], torch.float64, images.device)
        out = images.clone()
        # Called inside a mixed-precision region, affine_grid's bmm and sharpness's conv2d would run in half
        # precision (source points off by a fraction of a pixel): the ops are defined in float32.
        with torch.autocast(images.device.type, enabled=False):
            for step, index, param in zip(steps, indices, params, strict=True):
                if step.name == "warp":
                    out[index] = warp(out[index], param, FILL, self.config.interpolation)
                else:
                    out[index] = _PIXEL_OPS[step.name](out[index], param)
        return out

    def plan_erasing(self, batch: int, height: int, width: int, seed: int) -> list[Step]:
        """timm RandomErasing's boxes for a batch: one Step per box slot, params (k, 4) = top, left, h, w."""
        config, generator = self.config, _generator(seed, 1)
        count = config.erasing_count
        erased = torch.rand(batch, generator=generator, dtype=torch.float64) <= config.random_erasing
        counts = torch.randint(1, count + 1, (batch, 1), generator=generator) if count > 1 else torch.ones(batch, 1)
        shape = (batch, count, _ERASE_TRIES)
        area = 0.02 + (1 / 3 - 0.02) * torch.rand(shape, generator=generator, dtype=torch.float64)
        log_low, log_high = math.log(0.3), math.log(1 / 0.3)
        aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(shape, generator=generator, dtype=torch.float64))
        top_u, left_u = torch.rand((2, *shape), generator=generator, dtype=torch.float64)
        target = area * (height * width) / counts.unsqueeze(-1)
        h, w = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
        fits = (w < width) & (h < height)
        first = fits.int().argmax(dim=-1, keepdim=True)  # timm keeps the first try that fits
        h, w, top_u, left_u = (t.gather(-1, first)[..., 0] for t in (h, w, top_u, left_u))  # (B, count)
        top, left = torch.floor(top_u * (height - h + 1)), torch.floor(left_u * (width - w + 1))
        slots = torch.arange(count).unsqueeze(0) < counts
        valid = erased.unsqueeze(1) & slots & fits.any(dim=-1)
        steps = []
        for slot in range(count):
            index = valid[:, slot].nonzero()[:, 0]
            if len(index):
                boxes = torch.stack([top[:, slot], left[:, slot], h[:, slot], w[:, slot]], dim=1)[index]
                steps.append(Step("erase", index, boxes))
        return steps

    def erase(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """timm's RandomErasing of a normalised float batch (B, C, H, W), drawn from `seed`."""
        batch, channels, height, width = images.shape
        steps = self.plan_erasing(batch, height, width, seed) if self.config.random_erasing > 0 else []
        if not steps:
            return images
        device = images.device
        noise = _generator(seed, 2, device)
        indices = _upload([s.index for s in steps], torch.int64, device)
        boxes = _upload([s.params for s in steps], torch.int64, device)
        rows = torch.arange(height, device=device).view(1, 1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, 1, width)
        out = images.clone()
        for index, box in zip(indices, boxes, strict=True):
            top, left, h, w = (v.view(-1, 1, 1, 1) for v in box.unbind(dim=1))
            inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (k, 1, H, W)
            k = len(index)
            if self.config.erasing_mode == "pixel":
                fill = torch.randn((k, channels, height, width), generator=noise, device=device, dtype=images.dtype)
            elif self.config.erasing_mode == "rand":
                fill = torch.randn((k, channels, 1, 1), generator=noise, device=device, dtype=images.dtype)
            else:
                fill = torch.zeros((k, channels, 1, 1), device=device, dtype=images.dtype)
            out[index] = torch.where(inside, fill, out[index])
        return out
