"""What the probes are, how they run (`ProbeSettings`), and what a task hands back (`TaskResult`).

Shared by the bank pass (analysis/bank.py), the probe computations (analysis/probe_tasks.py), the passes that need
the model again (analysis/model_passes.py) and the runner. Nothing here knows Ray.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis import probes
from analysis.data import DataSpec
from analysis.segmentation import HeadSettings
from analysis.specs import ModelSpec
from vitreg import DETECTION_METHODS, detect_artifacts

PROBE_GROUPS: dict[str, tuple[str, ...]] = {
    "norms": ("layers",),
    "attention": ("layers", "final"),
    "correspondence": ("final",),
    "neighbours": ("final",),
    "global": ("final",),
    "local": ("layers",),
    "representation": ("final",),
    "segmentation": ("segmentation",),
    "removal": ("final",),
}
PROBES = tuple(PROBE_GROUPS)
GROUPS = ("layers", "final", "segmentation")
NEEDS_LABELS = ("global", "representation")
NEEDS_MASKS = ("segmentation",)
REMOVAL_FIRST_OUTLIER = "first-outlier"
# Probes that read the training images too; the bank records the training split only when one of them runs.
TRAIN_SPLIT_PROBES = ("local", "global", "representation", "removal", "segmentation")
# The last-layer probes cover the training images too when one of these runs (their artifact mask, found by the
# batch-level `auto` detection, and the neighbour statistics cover the same images as before the bank).
FINAL_TRAIN_PROBES = ("global", "representation", "removal")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes run; defaults follow the study (section 3.4).

    Args:
        batch_size: images per forward pass.
        img_size: resolution for every model (None: the dataset protocol's, else the model's own).
        artifact_method, norm_threshold, top_percent: artifact detection (`vitreg.detect_artifacts`).
        seeds, max_iter: logistic-regression seeds and iteration limit.
        figure_images: test images shown in the map figures.
        top_tokens, random_tokens: candidates kept per image and layer for the token probes.
        sample_seed: which random tokens are kept.
        removal_layers: blocks where artifacts are removed (negative: from the end; never the last block);
            empty: from `removal_from` on.
        removal_from: with no `removal_layers`, remove at this block and every later one but the last:
            `first-outlier` (the first block with outliers in the norms probe's detection on the test images, the
            middle block when none has any; the study's choice) or a block index.
        removal_percent: top percent by norm and by attention that removal intersects.
        seg_head, seg_block: training of the linear head and of the last-block variant.
        seg_registers: registers of the last-block variants (for models without registers of their own).
        seg_lrs: head learning rates tried for every segmentation variant (one table row each), all trained
            together (`analysis.seg_heads`); empty: `seg_head.lr` / `seg_block.lr`.
    """

    batch_size: int = 16
    img_size: int | None = None
    artifact_method: str = "auto"
    norm_threshold: float = 100.0
    top_percent: float = 5.0
    seeds: tuple[int, ...] = probes.STUDY_SEEDS
    max_iter: int = 1000
    figure_images: int = 2
    top_tokens: int = 4
    random_tokens: int = 4
    sample_seed: int = 0
    removal_layers: tuple[int, ...] = ()
    removal_from: str = REMOVAL_FIRST_OUTLIER
    removal_percent: float = 5.0
    seg_head: HeadSettings = field(default_factory=lambda: HeadSettings(epochs=20))
    seg_block: HeadSettings = field(default_factory=lambda: HeadSettings(epochs=50))
    seg_registers: tuple[int, ...] = (0, 1, 2, 4)
    seg_lrs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.artifact_method not in DETECTION_METHODS:
            problems.append(f"artifact_method={self.artifact_method!r} (allowed: {', '.join(DETECTION_METHODS)})")
        for name in ("batch_size", "max_iter", "figure_images", "top_tokens", "random_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be at least 1)")
        for name in ("top_percent", "removal_percent"):
            if not 0 < getattr(self, name) <= 100:
                problems.append(f"{name}={getattr(self, name)} (must be in (0, 100])")
        if self.img_size is not None and self.img_size < 1:
            problems.append(f"img_size={self.img_size} (must be positive)")
        if not self.seeds:
            problems.append("seeds=() (give at least one seed)")
        if self.removal_from != REMOVAL_FIRST_OUTLIER and not _is_int(self.removal_from):
            problems.append(f"removal_from={self.removal_from!r} (allowed: {REMOVAL_FIRST_OUTLIER} or a block index)")
        if len(set(self.removal_layers)) != len(self.removal_layers):
            problems.append(f"removal_layers={self.removal_layers} (each block at most once)")
        if any(count < 0 for count in self.seg_registers):
            problems.append(f"seg_registers={self.seg_registers} (counts must be 0 or more)")
        if len(set(self.seg_lrs)) != len(self.seg_lrs) or any(not lr > 0 for lr in self.seg_lrs):
            problems.append(f"seg_lrs={self.seg_lrs} (distinct positive learning rates)")
        if problems:
            raise ValueError(f"probe settings: {'; '.join(problems)}")

    def detect(self, norms: np.ndarray) -> np.ndarray:
        """Artifact mask of (B, N) norms under these settings."""
        report = detect_artifacts(torch.from_numpy(norms), self.artifact_method, self.norm_threshold, self.top_percent)
        return report.mask.numpy()


@dataclass(frozen=True)
class ProbeTask:
    """`probes` of `group` on `model` (for layer chunk `chunk` of `chunks`), run in one process by
    `analysis.tasks.run_task` from a bank of its own; the runner instead plans bank shards and probe jobs."""

    model: ModelSpec
    group: str
    probes: tuple[str, ...]
    data: DataSpec
    settings: ProbeSettings
    chunk: int = 0
    chunks: int = 1


@dataclass
class TaskResult:
    """Table rows per probe, arrays for figures, and the errors of probes that failed."""

    model: str
    group: str
    chunk: int
    info: dict = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    figures: dict[str, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    passes: dict[str, int] = field(default_factory=dict)  # images forwarded by the backbone, by kind of pass

    def add_error(self, probe: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.errors.append(
            {"model": self.model, "probe": probe, "group": self.group, "chunk": self.chunk, "error": text}
        )

    def guard(self, probe: str, run: Callable[[], None]) -> None:
        """Run one probe; a failure becomes an error row, not a lost task."""
        try:
            run()
        except Exception as error:
            self.add_error(probe, error)
            self.errors[-1]["traceback"] = traceback.format_exc(limit=4)
