"""The feature bank: the backbone runs once per image (per model), and every probe reads what that pass recorded.

Layout: `<bank_dir>/<model slug>/shard-NNNN.npz` and `manifest.json`. A shard holds a contiguous run of batches of
each split, cut from the same batches an unsharded pass makes (so nothing depends on the sharding); its arrays are
named `<split>.<name>` with the images first:

- always: `ids`, `labels`; per layer `patch_norms.<l>` (B, N); `cls_norms` (B, L), `register_norms` (B, L, R);
  of the last block: `attention` (B, N) and `registers` (B, R, N), the head-mean CLS / register attention over the
  patches, `cls` and `mean_patch` (B, C) after the final norm, `predictions` (B,), and `cosines` (B, N), each
  patch's mean cosine to its 4 neighbours in the patch embedding;
- `samples` (local, global): per layer `sample.<l>.{top,random}_{index,features}`, each image's `top_tokens`
  highest-norm and `random_tokens` random other patches (`analysis.extract.sample_tokens`);
- `segmentation`: `seg.patches` (B, N, C) float16 after the final norm, `seg.masks`, and for register-free models
  `seg.block_inputs` (B, T, C) float16, the last block's inputs (what `_segmentation_features` cached before).

The manifest, written only when every shard is in, records the pass settings (`bank_key`: the model spec and its
checkpoint file's size and time, the images (a fingerprint of the sampled items), resolution, batch size, token
sampling, precision, torch/timm versions) and the contents. A bank is reused when its key and contents cover a
run's; anything else (other pass settings, missing contents, no manifest: a build that did not finish, a shard
file missing or of another size) rebuilds it. On a GPU the pass runs under bf16 autocast and `inference_mode`;
on the CPU in float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from analysis import probes
from analysis.bank_key import BANK_FORMAT, key_hash
from analysis.data import DataSpec, open_splits
from analysis.extract import sample_tokens
from analysis.probe_settings import TRAIN_SPLIT_PROBES, ProbeSettings
from analysis.segmentation import has_last_block_variants
from analysis.specs import ModelSpec, load_model, model_info
from vitreg import run_taps

MANIFEST = "manifest.json"
SPLITS = ("train", "test")
TEST_ID_OFFSET = 10**9  # test image ids, so that they stay distinct from the training images' ids
SAMPLE_FIELDS = ("top_index", "top_features", "random_index", "random_features")


class BankError(RuntimeError):
    """A bank that cannot serve a read (no manifest, another pass's shard, contents it does not hold)."""


@dataclass(frozen=True)
class BankContents:
    """What a bank holds beyond the always-recorded arrays.

    Args:
        train: the training split too (else only the test split).
        samples: sampled token embeddings of every layer.
        segmentation: the segmentation features and masks.
    """

    train: bool = False
    samples: bool = False
    segmentation: bool = False

    @classmethod
    def for_probes(cls, probe_names: tuple[str, ...] | list[str]) -> BankContents:
        wanted = set(probe_names)
        return cls(
            train=bool(wanted & set(TRAIN_SPLIT_PROBES)),
            samples=bool(wanted & {"local", "global"}),
            segmentation="segmentation" in wanted,
        )

    def covers(self, other: BankContents) -> bool:
        return all(getattr(self, name) or not getattr(other, name) for name in asdict(self))

    def union(self, other: BankContents) -> BankContents:
        return BankContents(**{name: getattr(self, name) or getattr(other, name) for name in asdict(self)})

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.train else ("test",)


def precision_of(device: torch.device) -> str:
    """How the pass computes on `device`: bf16 autocast on a GPU, float32 elsewhere."""
    return "bfloat16-autocast" if device.type == "cuda" else "float32"


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """The pass's precision on `device` (see `precision_of`): bf16 autocast on a GPU, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class ShardJob:
    """One bank task: shard `shard` of `shards` of one model's pass over its images."""

    spec: ModelSpec
    data: DataSpec
    settings: ProbeSettings
    contents: BankContents
    directory: str
    shard: int
    shards: int
    key: str  # key_hash of the pass settings, stored in the shard and checked on reading


def batch_ranges(images: int, batch_size: int, shards: int) -> list[range]:
    """The batches (by index) of each shard: contiguous runs, as even as possible (some may be empty)."""
    count = -(-images // batch_size)
    return [range(int(part[0]), int(part[-1]) + 1) if len(part) else range(0) for part in _split(count, shards)]


def _split(count: int, shards: int) -> list[np.ndarray]:
    return np.array_split(np.arange(count), shards)


def shard_file(directory: str | Path, shard: int) -> Path:
    return Path(directory, f"shard-{shard:04d}.npz")


def _np(tensor: torch.Tensor) -> np.ndarray:
    """A tapped tensor as a float32 (or integer) array on the host."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def record_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    ids: np.ndarray,
    contents: BankContents,
    settings: ProbeSettings,
    block_inputs: bool,
) -> dict[str, np.ndarray]:
    """One `run_taps` pass over a batch: everything the probes read, as host arrays (see the module docstring)."""
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    last = depth - 1
    grid = (images.shape[-2] // model.patch_embed.patch_size[0], images.shape[-1] // model.patch_embed.patch_size[1])
    samples: dict[int, probes.TokenSample] = {}

    patches = grid[0] * grid[1]

    def keep_sample(layer: int, output: torch.Tensor) -> None:
        # The patches are the last tokens (also before a late register entry, when the stream has no registers);
        # norms as run_taps takes them (all tokens, then the patches), so the top picks are the same.
        norms = output.float().norm(dim=-1)[:, -patches:]
        samples[layer] = sample_tokens(
            output[:, -patches:], norms, ids, settings.top_tokens, settings.random_tokens, settings.sample_seed
        )

    hooks = []
    if contents.samples:  # sampled from each block's output as it passes, so no layer's tokens are all kept
        for layer, block in enumerate(model.blocks):
            hooks.append(block.register_forward_hook(lambda _, __, out, layer=layer: keep_sample(layer, out)))
    kept = (last - 1, last) if block_inputs else (last,)
    try:
        taps = run_taps(
            model, images, layers=None, attention_layers=(last,), keep_patch_embedding=True, keep_block_outputs=kept
        )
    finally:
        for hook in hooks:
            hook.remove()
    normalised = model.norm(taps.block_outputs[last])
    arrays = {
        "ids": ids,
        "cls_norms": _np(taps.cls_norms).T,
        "register_norms": _np(taps.register_norms).transpose(1, 0, 2),
        "attention": _np(taps.cls_attention_map(last).reshape(len(ids), -1)),
        "registers": _np(taps.register_attention[0].mean(dim=2)[..., prefix:]),
        "cosines": probes.neighbour_cosine(_np(taps.patch_embedding), grid),
        "cls": _np(normalised[:, 0]),
        "mean_patch": _np(normalised[:, prefix:].mean(dim=1)),
        "predictions": _np(taps.logits.argmax(dim=-1)),
    }
    arrays |= {f"patch_norms.{layer}": _np(norms) for layer, norms in enumerate(taps.patch_norms)}
    for layer, sample in samples.items():
        arrays |= {f"sample.{layer}.{name}": getattr(sample, name) for name in SAMPLE_FIELDS}
    if contents.segmentation:
        arrays["seg.patches"] = normalised[:, prefix:].half().cpu().numpy()
        if block_inputs:
            arrays["seg.block_inputs"] = taps.block_outputs[last - 1].half().cpu().numpy()
    return arrays


def write_shard(job: ShardJob, device: torch.device | None = None) -> dict:
    """Run the pass over this shard's batches and write them to `shard-NNNN.npz`; returns the shard's report.

    Raises on any failure (the runner turns it into error rows for every probe of the model).
    """
    start = time.perf_counter()
    settings = job.settings
    train, test, protocol = open_splits(job.data, job.spec.name)
    model, mean, std = load_model(job.spec, settings.img_size or protocol.img_size)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    img_size = model.patch_embed.img_size[0]
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    block_inputs = job.contents.segmentation and has_last_block_variants(depth, prefix)
    arrays: dict[str, np.ndarray] = {"meta.key": np.array(job.key)}
    images = {}
    for split_name, split in zip(SPLITS, (train, test), strict=True):
        if split_name not in job.contents.splits:
            continue
        parts: dict[str, list[np.ndarray]] = {}
        for batch_index in batch_ranges(len(split.indices), settings.batch_size, job.shards)[job.shard]:
            indices = split.indices[batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size]
            batch = split.source.load(indices, img_size, mean, std)
            ids = np.asarray(indices) + (TEST_ID_OFFSET if split_name == "test" else 0)
            with torch.inference_mode(), autocast_for(device):
                recorded = record_batch(model, batch.images.to(device), ids, job.contents, settings, block_inputs)
            recorded["labels"] = batch.labels.numpy() if batch.labels is not None else np.full(len(ids), -1)
            if job.contents.segmentation:
                if batch.masks is None:
                    raise BankError("segmentation needs a dataset with masks (ade20k or generated)")
                recorded["seg.masks"] = batch.masks.numpy()
            for name, value in recorded.items():
                parts.setdefault(name, []).append(value)
        images[split_name] = sum(len(ids) for ids in parts.get("ids", []))
        arrays |= {f"{split_name}.{name}": np.concatenate(values) for name, values in parts.items()}
    path = shard_file(job.directory, job.shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".npz.tmp")
    with partial.open("wb") as handle:
        np.savez(handle, **arrays)
    os.replace(partial, path)  # a shard is there whole or not at all
    info = model_info(model)
    return {
        "shard": job.shard,
        "file": path.name,
        "bytes": path.stat().st_size,
        "images": images,
        "info": {**info, "train_images": len(train.indices), "test_images": len(test.indices)},
        "grid": [img_size // model.patch_embed.patch_size[0], img_size // model.patch_embed.patch_size[1]],
        "prefix": prefix,
        "mean": list(mean),
        "std": list(std),
        "precision": precision_of(device),
        "seconds": time.perf_counter() - start,
    }


def write_manifest(directory: str | Path, key: dict, contents: BankContents, reports: list[dict]) -> dict:
    """Seal a bank whose shards are all written: the manifest is what makes it readable and reusable."""
    reports = sorted(reports, key=lambda report: report["shard"])
    precisions = {report["precision"] for report in reports}
    if precisions != {key["precision"]}:
        raise BankError(f"bank {directory}: shards ran in {sorted(precisions)}, the run asked {key['precision']!r}")
    manifest = {
        "format": BANK_FORMAT,
        "key": key,
        "key_hash": key_hash(key),
        "contents": asdict(contents),
        "shards": [{name: report[name] for name in ("shard", "file", "bytes", "images")} for report in reports],
        "info": reports[0]["info"],
        "grid": reports[0]["grid"],
        "prefix": reports[0]["prefix"],
        "mean": reports[0]["mean"],
        "std": reports[0]["std"],
        "backbone_passes": {split: sum(r["images"].get(split, 0) for r in reports) for split in contents.splits},
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(directory, MANIFEST)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, path)
    return manifest


def bank_status(directory: str | Path, key: dict, contents: BankContents) -> str | None:
    """None when the bank in `directory` can be reused for a run with `key` and `contents`, else why not."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        partial = any(directory.glob("shard-*"))
        return "a partial bank (no manifest: its build did not finish)" if partial else "no bank yet"
    try:
        manifest = json.loads(path.read_text())
        recorded = BankContents(**manifest["contents"])
        shards = manifest["shards"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({error})"
    if manifest.get("key_hash") != key_hash(key):
        changed = sorted(name for name in key if manifest.get("key", {}).get(name) != key[name])
        return f"pass settings changed: {', '.join(changed) or 'format'}"
    if not recorded.covers(contents):
        missing = [name for name, wanted in asdict(contents).items() if wanted and not getattr(recorded, name)]
        return f"the bank lacks {', '.join(missing)}"
    for shard in shards:
        file = directory / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            return f"shard {shard['file']} missing or changed"
    return None


def clear_bank(directory: str | Path) -> None:
    """Remove a bank's files (shards, manifest, leftovers of an interrupted write), nothing else."""
    for path in Path(directory).glob("*"):
        if path.name == MANIFEST or path.name.startswith("shard-") or path.name.endswith(".json.tmp"):
            path.unlink()


class Bank:
    """Read access to a sealed bank: arrays of one or both splits, the training images first."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise BankError(f"no bank in {self.directory} (no {MANIFEST}: never built, or its build did not finish)")
        self.manifest = json.loads(path.read_text())
        self.contents = BankContents(**self.manifest["contents"])
        self._files: dict[str, np.lib.npyio.NpzFile] = {}

    @property
    def info(self) -> dict:
        return self.manifest["info"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])

    @property
    def prefix(self) -> int:
        return self.manifest["prefix"]

    @property
    def depth(self) -> int:
        return self.info["depth"]

    def _file(self, name: str) -> np.lib.npyio.NpzFile:
        if name not in self._files:
            handle = np.load(self.directory / name)
            if str(handle["meta.key"]) != self.manifest["key_hash"]:
                raise BankError(f"{self.directory / name} belongs to another pass than its manifest (stale shard)")
            self._files[name] = handle
        return self._files[name]

    def load(self, name: str, splits: tuple[str, ...] = SPLITS) -> np.ndarray:
        """Array `name` over the images of `splits` (in that order; shards in order within a split)."""
        missing = [split for split in splits if split not in self.contents.splits]
        if missing:
            raise BankError(f"bank {self.directory} holds no {missing} images (built for other probes)")
        try:
            parts = [
                self._file(shard["file"])[f"{split}.{name}"]
                for split in splits
                for shard in self.manifest["shards"]
                if shard["images"].get(split, 0)
            ]
        except KeyError:
            raise BankError(f"bank {self.directory} has no {name!r} (it holds {self.contents})") from None
        return np.concatenate(parts)

    @property
    def precision(self) -> str:
        return self.manifest["key"]["precision"]

    def is_train(self, splits: tuple[str, ...] = SPLITS) -> np.ndarray:
        """(B,) True for the training images of `splits`."""
        counts = self.manifest["backbone_passes"]
        return np.concatenate([np.full(counts[split], split == "train") for split in splits])

    def sample(self, layer: int, splits: tuple[str, ...] = SPLITS) -> probes.TokenSample:
        return probes.TokenSample(*(self.load(f"sample.{layer}.{name}", splits) for name in SAMPLE_FIELDS))

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
