"""The data layer: a generated toy set, FFCV .beton writing, and one loader interface over two backends.

- `generate_dataset` draws a small image-classification set (JPEG files, ImageNet folder layout) so that every
  path here runs on a laptop without downloads.
- `write_beton` turns an ImageFolder-layout split into an FFCV `.beton`, skipping (and reporting) unreadable images.
- `build_loader` yields `(images, labels)` batches from either backend: `ffcv` (`<path>/<split>.beton`) or
  `imagefolder` (`<path>/<split>/<class>/*.JPEG`, plain torchvision, for users without FFCV). Both yield uint8
  images `(B, 3, img_size, img_size)` and int64 labels on the requested device; `normalize_on_device` turns the
  images into ImageNet-normalised floats there, so only uint8 crosses the host-to-device link.

Evaluation (val) is the study's, DeiT's and timm's: resize the shorter side to floor(img_size / crop_pct) with
Pillow's antialiased bicubic (or bilinear), then centre-crop img_size (`eval_resize_crop`). The imagefolder backend
runs torchvision's Resize + CenterCrop on the PIL image; the FFCV backend runs a numba port of the same Pillow
arithmetic, so both give the same pixels from the same stored image, bit for bit. A .beton's images are only as
large as `write_beton(max_resolution=...)` kept them (default 512); the val loader refuses one stored too small
for its evaluation resize (`check_stored_resolution`).

Train augmentation is the same on both backends and deliberately simple: RandomResizedCrop(img_size,
scale=(min_crop_scale, 1)) + horizontal flip (DeiT's geometric part; colour jitter, RandAugment and random
erasing are not done here). The crop box and flip of a sample are a pure function of (seed, epoch, sample index,
repeated-augmentation copy), `crop_and_flip`, computed with a counter-based hash instead of a random-number
stream: they do not depend on decoding threads, worker processes, rank or what was read before, so a run resumed
from a checkpoint sees the same pixels as an uninterrupted one. Both backends cut the same boxes from images of
the same size (a .beton written with `max_resolution` below an image's size stores it smaller, so its boxes
differ), and resize them with different filters (FFCV: OpenCV's INTER_AREA; imagefolder: bicubic), so their train
pixels differ slightly.

Sharding (same on both backends, `shard_order`): each rank reads its own shard, chosen by explicit
`rank`/`world_size` (or taken from an initialised torch.distributed). Train: one permutation of the whole set per
epoch, each sample repeated `repeated_augmentations` times in a row and the list dealt out to the ranks (DeiT's
RASampler; with 1, torch's DistributedSampler with seed and epoch, drop_last=True), num_samples // world_size per
rank, so every rank takes the same number of steps. Val: rank r reads samples r, r + world_size, ... in file
order, with no padding, so the shards are disjoint and cover the set exactly (ranks may differ by one sample;
reduce metric totals once, after the loop).

Modules: `config` (DataConfig), `sharding` (shard_order, ShardLoader), `crops` (crop_and_flip), `eval_transform`
(eval_resize_crop, timm_eval_settings), `normalize`, `writer` (write_beton, class files, check_stored_resolution),
`ffcv_backend` (with every FFCV 1.0.2 workaround), `imagefolder_backend`, `loader` (build_loader) and `generated`
(the generated data set, not used by the production path). Everything public is importable from `train.data`.
"""

from train.data.config import BACKENDS, SPLITS, DataConfig
from train.data.crops import CROP_ATTEMPTS, CROP_RATIO, crop_and_flip
from train.data.eval_transform import EVAL_INTERPOLATIONS, eval_resize_crop, eval_resize_size, timm_eval_settings
from train.data.ffcv_backend import sample_keys
from train.data.generated import (
    SHAPES,
    GeneratedData,
    draw_image,
    generate_dataset,
    generated_home,
    prepare_generated_data,
)
from train.data.loader import build_loader
from train.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device
from train.data.sharding import ShardLoader, resolve_rank, shard_indices, shard_order
from train.data.writer import (
    DEFAULT_MAX_RESOLUTION,
    WRITE_MODES,
    SkippedImage,
    WriteReport,
    check_image,
    check_stored_resolution,
    classes_path_for,
    read_class_names,
    write_beton,
)

__all__ = [
    "BACKENDS",
    "CROP_ATTEMPTS",
    "CROP_RATIO",
    "DEFAULT_MAX_RESOLUTION",
    "EVAL_INTERPOLATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES",
    "SPLITS",
    "WRITE_MODES",
    "DataConfig",
    "GeneratedData",
    "ShardLoader",
    "SkippedImage",
    "WriteReport",
    "build_loader",
    "check_image",
    "check_stored_resolution",
    "classes_path_for",
    "crop_and_flip",
    "draw_image",
    "eval_resize_crop",
    "eval_resize_size",
    "generate_dataset",
    "generated_home",
    "normalize_on_device",
    "prepare_generated_data",
    "read_class_names",
    "resolve_rank",
    "sample_keys",
    "shard_indices",
    "shard_order",
    "timm_eval_settings",
    "write_beton",
]
