"""vitreg: find and remove artifact tokens in Vision Transformers with registers."""

from vitreg.artifacts import (
    DETECTION_METHODS,
    ArtifactRemoval,
    ArtifactReport,
    detect_artifacts,
    neighbourhood_minimum,
)
from vitreg.models import (
    ModelBuildError,
    add_registers,
    build_model,
    count_registers,
    depth,
    freeze_blocks,
    trainable_parameter_names,
    trainable_parameters,
)
from vitreg.penalty import BlockOutputCapture, l2_norm_penalty
from vitreg.schedules import SCHEDULES, LambdaSchedule, lambda_at
from vitreg.taps import TapError, Taps, query_attention, run_taps

__all__ = [
    "DETECTION_METHODS",
    "SCHEDULES",
    "ArtifactRemoval",
    "ArtifactReport",
    "BlockOutputCapture",
    "LambdaSchedule",
    "ModelBuildError",
    "TapError",
    "Taps",
    "add_registers",
    "build_model",
    "count_registers",
    "depth",
    "detect_artifacts",
    "freeze_blocks",
    "l2_norm_penalty",
    "lambda_at",
    "neighbourhood_minimum",
    "query_attention",
    "run_taps",
    "trainable_parameter_names",
    "trainable_parameters",
]
