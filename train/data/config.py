"""`DataConfig`: where the data are and how one rank loads them, validated on creation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from train.data.eval_transform import EVAL_INTERPOLATIONS, eval_resize_size

BACKENDS = ("ffcv", "imagefolder")


SPLITS = ("train", "val")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r}: must be a number in (0, 1]")


@dataclass(frozen=True)
class DataConfig:
    """Where the data are and how one rank loads them; validated on creation.

    Attributes:
        backend: "ffcv" reads `<path>/<split>.beton` and `<path>/<split>.classes.json` (see `write_beton`);
            "imagefolder" reads `<path>/<split>/<class>/<image>` with torchvision.
        path: the data directory (required; must exist where the config is made).
        img_size: side of the square images fed to the model.
        batch_size: batch size per rank (Ray Train worker).
        num_workers: decoding threads (ffcv, >= 1) or DataLoader processes (imagefolder, 0 = in the main process).
        min_crop_scale: lower bound of RandomResizedCrop's area fraction (DeiT: 0.08).
        repeated_augmentations: train only: copies of each sample per epoch, spread over the ranks, each with its
            own crop and flip, the epoch still about one pass of samples long (DeiT's RASampler; see
            `shard_order`). 1 = none; the study's recipe (DeiT III) uses 3.
        crop_pct: evaluation resizes the shorter side to floor(img_size / crop_pct), then centre-crops img_size
            (DeiT's and timm's eval transform; the study: 0.875, so 256 -> 224). `timm_eval_settings(model)`
            gives a timm model's own value instead.
        eval_interpolation: the filter of that resize, Pillow's antialiased "bicubic" (the study's) or
            "bilinear"; both backends compute the same pixels (see `eval_resize_crop`).
        hflip: random horizontal flips in training.
        seed: seed of the per-epoch shuffle and of the train augmentation (see `crop_and_flip`).
        batches_ahead: ffcv only: batches decoded in advance.
        os_cache: ffcv only: let the OS page cache hold the .beton (best when it fits in RAM or several ranks
            on a node share it); False uses FFCV's own process cache.
    """

    backend: str = "ffcv"
    path: Path | None = None
    img_size: int = 224
    batch_size: int = 128
    num_workers: int = 4
    min_crop_scale: float = 0.08
    repeated_augmentations: int = 1
    crop_pct: float = 0.875
    eval_interpolation: str = "bicubic"
    hflip: bool = True
    seed: int = 0
    batches_ahead: int = 2
    os_cache: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: allowed {', '.join(BACKENDS)}")
        if self.path is None or str(self.path) == "":
            raise ValueError(f"path={self.path!r}: required, the data directory")
        object.__setattr__(self, "path", Path(self.path))  # accept str (e.g. from JSON); frozen, hence setattr
        if not self.path.is_dir():
            raise ValueError(f"path={str(self.path)!r}: no such directory")
        _check_int("img_size", self.img_size, 8)
        _check_int("batch_size", self.batch_size, 1)
        # FFCV reads num_workers < 1 as "every core", which is never what a config meant.
        _check_int("num_workers", self.num_workers, 1 if self.backend == "ffcv" else 0)
        _check_fraction("min_crop_scale", self.min_crop_scale)
        _check_int("repeated_augmentations", self.repeated_augmentations, 1)
        _check_fraction("crop_pct", self.crop_pct)
        if self.eval_interpolation not in EVAL_INTERPOLATIONS:
            raise ValueError(
                f"eval_interpolation={self.eval_interpolation!r}: allowed {', '.join(EVAL_INTERPOLATIONS)}"
            )
        _check_int("seed", self.seed, 0)
        _check_int("batches_ahead", self.batches_ahead, 1)
        for name in ("hflip", "os_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be true or false")

    @property
    def eval_resize(self) -> int:
        """The shorter side evaluation resizes to before the centre crop (`eval_resize_size`)."""
        return eval_resize_size(self.img_size, self.crop_pct)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """A config from plain data (e.g. JSON); unknown keys are an error that lists the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown DataConfig field(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) that `from_dict` turns back into this config."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}
