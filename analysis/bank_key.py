"""What a bank's pass depends on: `bank_key` (JSON, stored in the manifest) and its hash (stored in every shard).

Anything that changes what the pass records is in the key; probe settings that only change what is computed from
the records (seeds, detection, thresholds, removal, segmentation heads) are not, so they reuse the bank.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import timm
import torch

from analysis.data import Split
from analysis.probe_settings import ProbeSettings
from analysis.specs import ModelSpec

BANK_FORMAT = 1  # the layout of shards and manifest; a change rebuilds every bank


def split_fingerprint(split: Split) -> str:
    """A hash of the sampled items: their pixels (and labels, masks) when in memory, else path, size and time."""
    digest = hashlib.sha256(np.asarray(split.indices, dtype=np.int64).tobytes())
    source, indices = split.source, list(split.indices)
    for name in ("images", "labels", "masks", "annotations"):
        items = getattr(source, name, None)
        if items is None:
            continue
        if isinstance(items, torch.Tensor | np.ndarray):
            digest.update(np.ascontiguousarray(np.asarray(items[indices])).tobytes())
        else:  # files on disk
            for path in (Path(items[index]) for index in indices):
                stat = path.stat()
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _file_stamp(path: str | None) -> dict | None:
    if path is None:
        return None
    stat = Path(path).stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def bank_key(
    spec: ModelSpec, train: Split, test: Split, img_size: int | None, settings: ProbeSettings, precision: str
) -> dict:
    """Everything that changes what the pass records (the label only names the model, so it is left out)."""
    model = {key: value for key, value in asdict(spec).items() if key not in ("label", "training_run_id")}
    return {
        "format": BANK_FORMAT,
        "model": json.loads(json.dumps(model, default=str)),
        "checkpoint_file": _file_stamp(spec.checkpoint),
        "images": {"train": split_fingerprint(train), "test": split_fingerprint(test)},
        "img_size": img_size,
        "batch_size": settings.batch_size,
        "token_sampling": [settings.top_tokens, settings.random_tokens, settings.sample_seed],
        "precision": precision,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
